"""``sdrepl serve [--detach]``, ``status``, ``stop``, auto-start, keep-alive: the daemon's life as users see it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemon_testing import DaemonProcess, EventLog, daemon_env, make_daemon, run, short_dir

from sdrepl.daemon.client import DaemonClient, DaemonUnavailable, request_sync
from sdrepl.daemon.lifecycle import _pid_alive, ensure_daemon

pytestmark = pytest.mark.e2e


def sdrepl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdrepl", *args], capture_output=True, text=True,
                          timeout=timeout, env=daemon_env())


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@dataclass
class Detached:
    """A daemon started with ``serve --detach`` over a dead daemon's leftovers (shared by the tests below,
    which run in file order: the last one stops it)."""

    d: DaemonProcess
    args: list[str]
    started: subprocess.CompletedProcess
    info: dict

    @property
    def pid(self) -> int:
        return self.info["pid"]


@pytest.fixture(scope="module")
def detached() -> Iterator[Detached]:
    root = short_dir()
    d = make_daemon(root, keep_alive=1.0)
    args = d.settings.daemon_args()
    # Leftovers of a daemon that died without cleaning up: a stale socket file and connection file.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(d.socket))
    stale.close()
    d.settings.connection_file.write_text(json.dumps({"pid": dead_pid(), "socket": str(d.socket)}))
    started = sdrepl("serve", "--detach", *args)
    assert started.returncode == 0, started.stderr
    info = json.loads(d.settings.connection_file.read_text())
    try:
        yield Detached(d, args, started, info)
    finally:
        if _pid_alive(info["pid"]):
            os.kill(info["pid"], 15)
        shutil.rmtree(root, ignore_errors=True)


def test_detach_replaces_a_dead_daemons_files_and_says_ready(detached: Detached) -> None:
    d = detached.d
    assert detached.started.stdout.startswith("sdrepl: daemon ready on") and detached.started.stderr == ""
    assert detached.info["protocol"] == 2 and detached.info["model"] == "tiny" and _pid_alive(detached.pid)
    assert stat.S_IMODE(os.stat(d.settings.connection_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o600
    assert d.settings.log_file.exists()


def test_status_human_and_json(detached: Detached) -> None:
    human = sdrepl("status", *detached.args)
    assert human.returncode == 0 and "model:      tiny" in human.stdout and f"pid {detached.pid}" in human.stdout
    as_json = json.loads(sdrepl("status", "--json", *detached.args).stdout)
    assert as_json["running"] is True and as_json["pid"] == detached.pid and as_json["keep_alive_s"] == 1.0


def test_a_second_daemon_is_refused_and_auto_start_uses_the_first(detached: Detached) -> None:
    second = sdrepl("serve", *detached.args)
    assert second.returncode == 1
    assert second.stderr.strip().splitlines() == [
        f"sdrepl: a daemon is already running on {detached.d.socket} (pid {detached.pid}); `sdrepl stop` stops "
        "it, or give another --socket"]
    ensure_daemon(detached.d.settings, on_status=lambda text: pytest.fail(f"started another daemon: {text}"))


def test_keep_alive_unloads_and_the_next_generation_reloads(detached: Detached) -> None:
    async def keep_alive() -> None:
        async with await DaemonClient.connect(detached.d.socket) as c:
            events = EventLog(c)
            if (await c.request("status"))["state"] != "unloaded":  # 1 s may have passed already
                await events.wait_for(lambda e: e["event"] == "model" and e["state"] == "unloaded", timeout=15)
            assert (await c.request("status"))["state"] == "unloaded"
            assert (await c.request("tokens", prompt="a cat"))["count"] == 2  # no model needed for this
            mark = events.mark()
            result = await c.request("generate", prompt="wake up", seed=1, width=64, height=64, steps=2)
            assert result["images"][0]["seed"] == 1
            states = [e["state"] for e in events.events[mark:] if e["event"] == "model"]
            assert states[:2] == ["loading", "ready"]
            unloaded = await events.wait_for(lambda e: e["event"] == "model" and e["state"] == "unloaded",
                                             timeout=15, start=mark)  # idle again: unloaded again
            assert unloaded["model"]["model"] == "tiny" and "unloaded" in unloaded["message"]
            states = [e["state"] for e in events.events[mark:] if e["event"] == "model"]
            assert states[:4] == ["loading", "ready", "unloading", "unloaded"]

    run(keep_alive())


def test_stop_removes_the_socket_and_connection_file(detached: Detached) -> None:
    d, pid = detached.d, detached.pid
    stopped = sdrepl("stop", *detached.args)
    assert stopped.returncode == 0 and f"daemon stopped (pid {pid})" in stopped.stdout
    assert not _pid_alive(pid)
    assert not d.socket.exists() and not d.settings.connection_file.exists()
    down = sdrepl("status", *detached.args)
    assert down.returncode == 1 and "no daemon on" in down.stderr
    assert json.loads(sdrepl("status", "--json", *detached.args).stdout)["running"] is False


def test_bad_model_is_one_line_and_status_2(short_tmp: Path) -> None:
    d = make_daemon(short_tmp, model="/nope")
    result = sdrepl("serve", *d.settings.daemon_args())
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdrepl: --model /nope: no such file or folder"), result.stderr
    assert not d.socket.exists()
    # Through auto-start (serve --detach underneath), the caller gets the daemon's own line.
    notes: list[str] = []
    with pytest.raises(DaemonUnavailable) as info:
        ensure_daemon(d.settings, on_status=notes.append, timeout=120)
    assert str(info.value).startswith("--model /nope: no such file or folder")
    assert notes == ["starting the daemon: loading model /nope ..."]


def test_signal_stops_gracefully_and_replies_to_everything(short_tmp: Path) -> None:
    d = make_daemon(short_tmp).start()
    try:
        async def scenario() -> None:
            async with await DaemonClient.connect(d.socket) as c:
                events = EventLog(c)
                rid, running = c.start("generate", prompt="x", steps=30, seed=1, width=64, height=64)
                _, queued = c.start("generate", prompt="y", steps=30, seed=2, width=64, height=64)
                await events.wait_for(lambda e: e["event"] == "progress" and e["request"] == rid, timeout=30)
                d.proc.terminate()
                await events.wait_for(lambda e: e["event"] == "shutdown", timeout=10)
                assert (await running)["images"][0]["seed"] == 1  # the running one finishes
                with pytest.raises(Exception) as info:
                    await queued
                assert getattr(info.value, "type_name", "") == "Cancelled"

        run(scenario())
        assert d.proc.wait(20) == 0
        assert not d.socket.exists() and not d.settings.connection_file.exists()
        with pytest.raises(DaemonUnavailable, match="no daemon on"):
            request_sync(d.socket, "ping", timeout=2)
    finally:
        d.stop()
    assert "Traceback" not in d.log()
