"""The interactive REPL in a real pseudo-terminal (pexpect) against a real daemon on the ``tiny`` model.

One daemon for the module (temp socket, embeddings and outputs folders), one REPL per test. Each test is
one thing a user does: complete a trigger, generate a picture, see a new embedding file without a
restart, interrupt a long generation with Ctrl-C and carry on. Results are checked through what the REPL
prints (``!tokens`` output is distinct from the toolbar: it says ``embeddings: NAME``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pexpect = pytest.importorskip("pexpect")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPT = "sd> "


def clean_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDREPL_")}
    env.update(XDG_STATE_HOME=str(tmp / "state"), XDG_DATA_HOME=str(tmp / "data"),
               SDREPL_HISTORY=str(tmp / "history"), TOKENIZERS_PARALLELISM="false", TERM="xterm",
               PYTHONUNBUFFERED="1", PROMPT_TOOLKIT_NO_CPR="1")
    return env


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, fixtures_dir):
    tmp = tmp_path_factory.mktemp("e2e")
    embeddings, outputs = tmp / "embeddings", tmp / "outputs"
    embeddings.mkdir()
    for name in ("bad-hands-5.pt", "bad-prompt.pt"):
        shutil.copy(fixtures_dir / "a1111" / name, embeddings / name)
    socket = Path(f"/tmp/sdrepl-e2e-{os.getpid()}") / "d.sock"  # short: Unix socket paths are limited
    shutil.rmtree(socket.parent, ignore_errors=True)
    socket.parent.mkdir(mode=0o700)
    env = clean_env(tmp)
    args = ["--socket", str(socket), "--model", "tiny", "--embeddings", str(embeddings), "--outputs",
            str(outputs), "--device", "cpu"]
    log = open(tmp / "daemon.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen([sys.executable, "-m", "sdrepl", "serve", *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=tmp)
    try:
        wait_ready(socket, proc, tmp / "daemon.log")
        yield SimpleNamespace(socket=socket, embeddings=embeddings, outputs=outputs, env=env, args=args, tmp=tmp)
    finally:
        from sdrepl.daemon.client import request_sync

        try:
            request_sync(socket, "shutdown", timeout=5)
            proc.wait(30)
        except Exception:
            proc.kill()
            proc.wait(10)
        log.close()
        shutil.rmtree(socket.parent, ignore_errors=True)


def wait_ready(socket: Path, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    from sdrepl.daemon.client import request_sync

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the daemon exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if request_sync(socket, "status", timeout=2).get("state") == "ready":
                return
        except Exception:
            pass
        time.sleep(0.2)
    pytest.fail(f"the daemon was not ready within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def repl(daemon):
    child = pexpect.spawn(sys.executable, ["-m", "sdrepl", *daemon.args], env=daemon.env, cwd=str(daemon.tmp),
                          dimensions=(40, 160), encoding="utf-8", timeout=60, codec_errors="replace")
    child.logfile_read = open(daemon.tmp / "repl-screen.log", "a")  # noqa: SIM115 - for post-mortems
    try:
        child.expect("sdrepl · model tiny")
        child.expect_exact(PROMPT)
        yield child
    finally:
        if child.isalive():
            child.sendcontrol("d")
            try:
                child.expect(pexpect.EOF, timeout=10)
            except pexpect.TIMEOUT:
                child.terminate(force=True)
        child.logfile_read.close()


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
