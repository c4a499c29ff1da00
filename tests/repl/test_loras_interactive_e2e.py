"""The interactive REPL in a real pseudo-terminal with LoRAs: Tab after <lora: completes a file's name, and a
LoRA file dropped while the REPL runs is announced on screen and completes at once (no restart)."""

from __future__ import annotations

import shutil
import time

import pytest
from repl_testing import repl_daemon

pexpect = pytest.importorskip("pexpect")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def daemon():
    from lora_files import kohya_file

    from sdrepl.core.tiny import build_tiny

    def prepare(proc) -> None:
        (proc.root / "loras").mkdir()
        pipe = build_tiny("tiny")
        kohya_file(proc.root / "loras" / "watercolor.safetensors", pipe, seed=1)
        kohya_file(proc.root / "later.safetensors", pipe, seed=2)

    with repl_daemon("sdrepl-lo-", prepare) as served:
        yield served


def test_tab_completes_a_lora_and_tokens_show_it(repl):
    repl.send("!tokens a cat <lora:waterc")
    time.sleep(0.5)
    repl.send("\t")
    time.sleep(0.3)
    repl.send("\r")
    repl.expect("loras: watercolor:1")


def test_a_dropped_lora_is_announced_and_completes(repl, daemon):
    shutil.copy(daemon.tmp / "later.safetensors", daemon.tmp / "loras" / "later.safetensors")
    repl.expect_exact("LoRAs new: <lora:later>")
    repl.send("!tokens <lora:lat")
    time.sleep(0.5)
    repl.send("\t")
    time.sleep(0.3)
    repl.send("\r")
    repl.expect("loras: later:1")
