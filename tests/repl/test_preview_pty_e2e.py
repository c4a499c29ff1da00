"""The bytes a real REPL writes for a preview (pexpect pty, real daemon): detected kitty, forced sixel and iTerm2."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import pytest
from PIL import Image
from repl_testing import PROMPT, close_repl, repl_env, spawn_repl

pexpect = pytest.importorskip("pexpect")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def generate(child, line: str) -> bytes:
    """Run ``line``; the bytes from its result's line to the next prompt (the picture is in between)."""
    child.send(line + "\r")
    child.expect(rb"\.png  \(seed \d+")
    child.expect_exact(PROMPT.encode())
    return child.before


def test_kitty_detected_from_the_environment_then_forced_protocols(live_daemon):
    root = Path(live_daemon["root"])
    env = {**repl_env(root), "TERM": "xterm-kitty", "KITTY_WINDOW_ID": "1"}
    child = spawn_repl(live_daemon["options"], env, root, encoding=None, log=root / "pty-preview.log")
    try:
        shown = generate(child, "a fox --steps 2 --size 64x64 --seed 5")
        escapes = re.findall(rb"\x1b_G([^;]*);([A-Za-z0-9+/=]*)\x1b\\", shown)
        assert escapes and escapes[0][0] in (b"a=T,f=100,q=2,m=0", b"a=T,f=100,q=2,m=1")
        with Image.open(io.BytesIO(base64.b64decode(b"".join(p for _, p in escapes)))) as picture:
            assert picture.size == (64, 64)  # native size: a thumbnail never enlarges
        child.send("!set preview sixel\r")
        child.expect_exact(b"preview = sixel")
        child.expect_exact(PROMPT.encode())
        shown = generate(child, "a fox --steps 2 --size 64x64 --seed 5")
        assert re.search(rb'\x1bPq"1;1;64;64#\d+;2;[^\x1b]+\x1b\\\r\r\n', shown)  # ST, then a new line
        child.send("!set preview iterm\r")
        child.expect_exact(PROMPT.encode())
        shown = generate(child, "a fox --steps 2 --size 64x64 --seed 5")
        assert re.search(rb"\x1b\]1337;File=inline=1;size=\d+;width=64px;height=64px;preserveAspectRatio=1:"
                         rb"[A-Za-z0-9+/=]+\x07", shown)
        child.send("!set preview off\r")
        child.expect_exact(PROMPT.encode())
        shown = generate(child, "a fox --steps 2 --size 64x64 --seed 5")
        assert b"\x1b_G" not in shown and b"\x1bP" not in shown and b"1337" not in shown
    finally:
        close_repl(child)
