"""The REPL survives its daemon (issue 11, item 1): killed with SIGKILL and restarted under an open REPL,
which says so at once, reconnects and generates; killed again, the next line starts a new one; a scripted
line that fails because the daemon went away is an error (exit status 1) and the next line reconnects.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
from daemon_testing import daemon_env, make_daemon, short_dir
from repl_testing import PROMPT, repl_env

pexpect = pytest.importorskip("pexpect")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def daemon(fixtures_dir):
    root = short_dir("sdr-rc-")
    proc = make_daemon(root)
    shutil.copy(fixtures_dir / "a1111" / "bad-hands-5.pt", proc.embeddings / "bad-hands-5.pt")
    try:
        yield proc.start(cwd=root)
    finally:
        proc.stop()
        # a daemon the REPL started itself (detached): stop it through its socket
        subprocess.run([sys.executable, "-m", "sdrepl", "stop", *proc.settings.daemon_args()], env=daemon_env(),
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def test_sigkill_restart_and_autostart_under_an_open_repl(daemon):
    child = pexpect.spawn(sys.executable, ["-m", "sdrepl", *daemon.settings.daemon_args()], env=repl_env(daemon.root, daemon_env()),
                          cwd=str(daemon.root), dimensions=(40, 160), encoding="utf-8", timeout=60)
    child.logfile_read = open(daemon.root / "screen.log", "a")  # noqa: SIM115 - for post-mortems
    try:
        child.expect_exact(PROMPT)
        child.send("!set steps 2")
        child.send("\r")
        child.expect_exact("steps = 2")
        os.kill(daemon.proc.pid, signal.SIGKILL)
        daemon.proc.wait(10)
        child.expect_exact("went away", timeout=20)  # at once, without a line typed
        daemon.start(cwd=daemon.root)  # restarted by hand, on the same socket
        child.expect_exact("reconnected to the daemon", timeout=30)
        child.expect_exact("1 embeddings")  # re-synced
        child.send("a red fox --size 64x64\r")  # the session's !set steps survived
        child.expect(r"\.png\s+\(seed \d+", timeout=120)
        child.expect_exact(PROMPT)

        os.kill(daemon.proc.pid, signal.SIGKILL)
        daemon.proc.wait(10)
        child.expect_exact("went away", timeout=20)
        child.send("a blue boat --size 64x64\r")  # the next line starts a daemon, as at start-up
        child.expect_exact("starting the daemon", timeout=30)
        child.expect(r"\.png\s+\(seed \d+", timeout=180)
        child.expect_exact(PROMPT)
        child.send("!history\r")
        child.expect_exact("!set steps 2")  # history kept
        child.expect_exact(PROMPT)
        child.sendcontrol("d")
        child.expect(pexpect.EOF, timeout=20)
    finally:
        child.terminate(force=True)
        child.logfile_read.close()
    pictures = list(daemon.outputs.rglob("*.png"))
    assert len(pictures) == 2


def test_a_scripted_line_lost_with_the_daemon_fails_and_the_next_reconnects(daemon):
    proc = subprocess.Popen([sys.executable, "-m", "sdrepl", "--json", *daemon.settings.daemon_args()],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=repl_env(daemon.root, daemon_env()), cwd=daemon.root)
    try:
        proc.stdin.write("a long one --steps 1000 --size 64x64\n")
        proc.stdin.flush()
        while "generating" not in proc.stderr.readline():  # progress on stderr: it is running
            pass
        os.kill(daemon.proc.pid, signal.SIGKILL)
        import json

        first = json.loads(proc.stdout.readline())
        assert first["ok"] is False and first["error"]["type"] == "DaemonUnavailable"
        assert "the next line reconnects" in first["error"]["message"]
        proc.stdin.write("a short one --steps 2 --size 64x64\n")
        proc.stdin.close()
        second = json.loads(proc.stdout.readline())
        assert second["ok"] is True and second["images"], (second, proc.stderr.read() if False else "")
        assert proc.wait(120) == 1
    finally:
        proc.kill()
        proc.wait()
