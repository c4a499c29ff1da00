"""Hostile file names end to end: a real daemon, a piped session and the interactive REPL in a pty.

The embeddings folder holds ``bad\\xffname.pt`` (not UTF-8) and ``x\\x1b]2;PWNED\\x07.pt`` (an OSC
sequence that retitles a terminal). A piped ``!embeddings`` must answer and list both escaped; in the
interactive REPL the raw escape sequence must never reach the pty, and a file whose name holds a newline,
dropped while the REPL runs, must not print a fake ``embeddings new:`` line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from daemon_testing import make_daemon, short_dir
from repl_testing import repl_env

pexpect = pytest.importorskip("pexpect")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NOT_UTF8 = b"bad\xffname.pt"
TITLE = "x\x1b]2;PWNED\x07.pt"
FAKE_LINE = "a\nembeddings new: <evil>.pt"



@pytest.fixture(scope="module")
def daemon(fixtures_dir):
    tmp = short_dir("sdh-")
    proc = make_daemon(tmp)
    shutil.copy(fixtures_dir / "a1111" / "bad-hands-5.pt", os.fsencode(proc.embeddings) + b"/" + NOT_UTF8)
    shutil.copy(fixtures_dir / "a1111" / "bad-artist.pt", proc.embeddings / TITLE)
    proc.env = repl_env(tmp)
    try:
        proc.start(cwd=tmp)
        yield SimpleNamespace(embeddings=proc.embeddings, env=proc.env, args=proc.settings.daemon_args(), tmp=tmp,
                              fixtures=fixtures_dir, log_path=proc.log_path)
    finally:
        proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def piped(daemon, *args: str, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdrepl", *daemon.args, *args], input=stdin.encode(),
                          capture_output=True, cwd=daemon.tmp, env=daemon.env, timeout=40)


def test_piped_embeddings_answers_and_lists_the_names_escaped(daemon) -> None:
    done = piped(daemon, stdin="!embeddings\n")
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode("utf-8")  # valid UTF-8, whatever the names
    assert "bad\\xffname" in out and "x\\x1b]2;PWNED\\x07" in out
    assert "\x1b" not in out and "\x07" not in out


def test_piped_json_keeps_the_exact_names(daemon) -> None:
    done = piped(daemon, "--json", stdin="!embeddings\n")
    assert done.returncode == 0, done.stderr
    [result] = [json.loads(line) for line in done.stdout.decode("ascii").splitlines()]
    names = {e["name"] for e in result["embeddings"]}
    assert {"bad\udcffname", "x\x1b]2;PWNED\x07"} <= names
    [bad] = [e for e in result["embeddings"] if e["name"] == "bad\udcffname"]
    assert os.fsencode(bad["path"]).endswith(b"/" + NOT_UTF8)  # the real bytes, reversibly


def test_interactive_repl_never_passes_the_escape_sequence_to_the_terminal(daemon) -> None:
    child = pexpect.spawn(sys.executable, ["-m", "sdrepl", *daemon.args], env=daemon.env, cwd=str(daemon.tmp),
                          dimensions=(40, 160), timeout=60)
    seen = bytearray()
    fake = daemon.embeddings / FAKE_LINE
    try:
        child.expect(b"sdrepl \xc2\xb7 model tiny")
        child.expect_exact(b"sd> ")
        seen += child.before + child.after
        child.send(b"!embeddings\r")
        child.expect_exact(b"x\\x1b]2;PWNED\\x07")
        seen += child.before + child.after
        child.expect_exact(b"sd> ")
        seen += child.before + child.after
        shutil.copy(daemon.fixtures / "a1111" / "bad-artist.pt", fake)  # announced above the prompt
        child.expect_exact(b"embeddings new: <a\\nembeddings new: <evil>>")
        seen += child.before + child.after
        time.sleep(0.5)  # let a redraw after the notification arrive, then read what is there
        try:
            seen += child.read_nonblocking(1 << 16, timeout=1)
        except pexpect.TIMEOUT:
            pass
        child.sendcontrol("d")
        child.expect(pexpect.EOF, timeout=15)
        seen += child.before
    finally:
        if child.isalive():
            child.terminate(force=True)
        if fake.exists():
            fake.unlink()
    screen = bytes(seen)
    assert b"\x1b]2;" not in screen and b"PWNED\x07" not in screen  # the title is never set
    assert b"bad\\xffname" in screen and b"\xff" not in screen
    assert re.search(rb"[\r\n](?:\x1b\[[0-9;?]*[A-Za-z])*embeddings new: <evil>", screen) is None


def test_the_daemon_log_shows_a_dropped_file_name_escaped(daemon) -> None:
    name = "y\x1b]2;LOGGED\x07\nfake log line.pt"
    shutil.copy(daemon.fixtures / "a1111" / "bad-artist.pt", daemon.embeddings / name)
    try:
        deadline = time.monotonic() + 30
        while b"LOGGED" not in daemon.log_path.read_bytes():
            assert time.monotonic() < deadline, "the daemon never logged the new file"
            time.sleep(0.1)
        log = daemon.log_path.read_bytes()
        assert b"\x1b]2;LOGGED" not in log and b"\nfake log line" not in log
        assert b"y\\x1b]2;LOGGED\\x07\\nfake log line" in log
    finally:
        (daemon.embeddings / name).unlink()
