"""The interactive REPL in a real pseudo-terminal (pexpect) against a real daemon on the ``tiny`` model.

One daemon for the module (temp socket, embeddings and outputs folders), one REPL per test. Each test is
one thing a user does: complete a trigger, generate a picture, see a new embedding file without a
restart, interrupt a long generation with Ctrl-C and carry on. Results are checked through what the REPL
prints (``!tokens`` output is distinct from the toolbar: it says ``embeddings: NAME``).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from repl_testing import PROMPT, repl_daemon

pexpect = pytest.importorskip("pexpect")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]



@pytest.fixture(scope="module")
def daemon(fixtures_dir):
    def prepare(proc) -> None:
        for name in ("bad-hands-5.pt", "bad-prompt.pt"):
            shutil.copy(fixtures_dir / "a1111" / name, proc.embeddings / name)

    with repl_daemon("sdrepl-e2e-", prepare) as served:
        yield served


def complete(child, typed: str) -> None:
    """Type, let the completion menu appear (it runs in the background), press Tab."""
    child.send(typed)
    time.sleep(0.5)
    child.send("\t")


def test_tab_completes_a_trigger(repl):
    complete(repl, "!tokens a <bad-ha")
    repl.send("\r")
    # printed by !tokens for the line as sent: <bad-ha> alone would be an unknown-embedding error
    repl.expect_exact("tokens 3/75 · neg 0/75 · embeddings: bad-hands-5")
    repl.expect_exact(PROMPT)


def test_generate_shows_the_picture_path(repl, daemon):
    repl.send("a cat --steps 2 --size 64x64\r")
    repl.expect(r"(?:\x1b\[K|\s)([\w./~-]+\.png)\s+\(seed \d+", timeout=120)
    path = Path(repl.match.group(1))
    path = path if path.is_absolute() else daemon.tmp / path
    assert path.is_file() and path.parent.is_relative_to(daemon.outputs)
    repl.expect_exact(PROMPT)


def test_a_new_embedding_file_completes_without_a_restart(repl, daemon, fixtures_dir):
    shutil.copy(fixtures_dir / "a1111" / "eyeliner2.pt", daemon.embeddings / "eyeliner2.pt")
    try:
        repl.expect_exact("embeddings new: <eyeliner2>", timeout=30)
        complete(repl, "!tokens <eyel")
        repl.send("\r")
        repl.expect_exact("embeddings: eyeliner2")
        repl.expect_exact(PROMPT)
    finally:
        (daemon.embeddings / "eyeliner2.pt").unlink()
    repl.expect_exact("embeddings removed: <eyeliner2>", timeout=30)


def test_ctrl_c_cancels_a_long_generation_and_the_session_stays(repl):
    repl.send("a dog --steps 1000 --size 64x64\r")
    repl.expect_exact("generating", timeout=60)
    repl.sendintr()
    repl.expect_exact("cancelled", timeout=30)
    repl.expect_exact(PROMPT)
    repl.send("!tokens cat\r")
    repl.expect_exact("tokens 1/75 · neg 0/75")
    repl.expect_exact(PROMPT)


def test_ctrl_d_leaves_with_status_zero(repl):
    repl.sendcontrol("d")
    repl.expect(pexpect.EOF)
    repl.close()
    assert repl.exitstatus == 0
