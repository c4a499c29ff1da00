"""Unit level: framing, parameter checking, the device worker's scheduling, the watcher's timing rules."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path

import pytest

from sdrepl.daemon import protocol
from sdrepl.daemon.params import Params
from sdrepl.daemon.protocol import BadRequest, Cancelled
from sdrepl.daemon.watcher import MAX_WAIT_S, QUIET_S, FolderWatcher
from sdrepl.daemon.worker import DeviceWorker

# --- framing ---------------------------------------------------------------------------------------


def test_encode_is_one_line_and_round_trips() -> None:
    message = protocol.request(7, "tokens", prompt="a\nb ☃")
    line = protocol.encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert protocol.decode(line) == message


@pytest.mark.parametrize("line, match", [(b"{nope", "not JSON"), (b"[1, 2]", "a list, not an object"),
                                         (b"\xff\xfe", "not UTF-8")])
def test_decode_rejects(line: bytes, match: str) -> None:
    with pytest.raises(BadRequest, match=match):
        protocol.decode(line)


@pytest.mark.parametrize("value, ok", [(1, True), ("a", True), (True, False), (1.5, False), (None, False),
                                       ([1], False)])
def test_valid_id(value: object, ok: bool) -> None:
    assert protocol.valid_id(value) is ok


# --- parameters ------------------------------------------------------------------------------------


def test_params_defaults_and_types() -> None:
    p = Params({"steps": 4, "cfg": 5, "seed": None, "prompt": "x"}, "generate")
    assert (p.text("prompt"), p.integer("steps", 20), p.number("cfg", 7.0), p.integer("seed", None, nullable=True),
            p.text("negative", "")) == ("x", 4, 5.0, None, "")
    p.finish()


@pytest.mark.parametrize("params, read, match", [
    ({}, lambda p: p.text("prompt"), "generate: missing parameter 'prompt'"),
    ({"steps": "20"}, lambda p: p.integer("steps", 20), "parameter 'steps' must be an integer, got a string"),
    ({"steps": True}, lambda p: p.integer("steps", 20), "parameter 'steps' must be an integer, got a boolean"),
    ({"steps": 0}, lambda p: p.integer("steps", 20, lo=1, hi=1000), "'steps' must be between 1 and 1000, got an integer"),
    ({"cfg": float("nan")}, lambda p: p.number("cfg", 7.0), "'cfg' must be a finite number"),
    ({"to": "gif"}, lambda p: p.text("to", choices=("pt", "safetensors")), "'to' must be one of pt, safetensors"),
])
def test_params_errors_name_the_parameter(params: dict, read, match: str) -> None:
    with pytest.raises(BadRequest, match=match):
        read(Params(params, "generate"))


def test_params_unknown_parameter_is_an_error() -> None:
    p = Params({"prompt": "x", "stpes": 3}, "generate")
    p.text("prompt")
    p.integer("steps", 20)
    with pytest.raises(BadRequest, match=r"unknown parameter\(s\) 'stpes'; this request takes: prompt, steps"):
        p.finish()


# --- the device worker -----------------------------------------------------------------------------


class CountingJob:
    label = "train"

    def __init__(self, steps: int, log: list[str]) -> None:
        self.left = steps
        self.log = log

    def run_step(self) -> bool:
        self.log.append("step")
        time.sleep(0.01)
        self.left -= 1
        return self.left > 0


def test_worker_runs_foreground_fifo_and_between_background_steps() -> None:
    log: list[str] = []
    changes: list[tuple[int, str | None]] = []
    worker = DeviceWorker(on_change=lambda pending, running: changes.append((pending, running)))
    worker.start()
    try:
        hold, inside, release = threading.Event(), threading.Event(), threading.Event()

        class HeldJob(CountingJob):
            """Holds the device thread inside one step, so that all three items are queued together."""

            def run_step(self) -> bool:
                if hold.is_set() and not release.is_set():
                    inside.set()
                    release.wait(10)
                return super().run_step()

        job = HeldJob(30, log)
        worker.set_background(job)
        wait_until(lambda: "step" in log)  # the background job is stepping
        hold.set()
        assert inside.wait(10)

        async def scenario() -> list[int]:
            def item(i: int):
                def fn() -> int:
                    log.append(f"fg{i}")
                    return i
                return fn
            tasks = [asyncio.ensure_future(worker.run(item(i), label="generate")) for i in range(3)]
            while worker.pending < 3:
                await asyncio.sleep(0.001)
            release.set()
            return list(await asyncio.gather(*tasks))

        assert asyncio.run(scenario()) == [0, 1, 2]
        first = log.index("fg0")
        assert log[first:first + 3] == ["fg0", "fg1", "fg2"]  # all pending items ran before the next step
        assert "step" in log[:first] and "step" in log[first + 3:]
        deadline = time.monotonic() + 5
        while worker.background is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.background is None and worker.idle
        assert (0, "train") in changes and changes[-1] == (0, None)
    finally:
        worker.stop()


def test_worker_cancel_before_start_and_discard() -> None:
    worker = DeviceWorker()
    worker.start()
    gate = threading.Event()
    try:
        async def scenario() -> None:
            blocker = asyncio.ensure_future(worker.run(lambda: gate.wait(5), label="block"))
            await asyncio.sleep(0.05)
            ev = threading.Event()
            queued = asyncio.ensure_future(worker.run(lambda: "ran", cancel_event=ev, label="generate"))
            await asyncio.sleep(0.01)
            assert worker.pending == 1 and worker.running == "block"
            ev.set()
            assert worker.discard(ev) == 1
            with pytest.raises(Cancelled):
                await queued
            already = threading.Event()
            already.set()
            with pytest.raises(Cancelled):
                await worker.run(lambda: "ran", cancel_event=already)
            gate.set()
            assert await blocker is True
            boom = asyncio.ensure_future(worker.run(lambda: 1 / 0))
            with pytest.raises(ZeroDivisionError):
                await boom

        asyncio.run(scenario())
    finally:
        gate.set()
        worker.stop()


# --- watcher timing (a recording library, no daemon) ----------------------------------------------


class RecordingLibrary:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float]] = []

    def update_paths(self, paths, *, force: bool = False):
        assert force, "the watcher must force a re-read: an event means the file changed"
        self.calls += [("update", path.name, time.monotonic()) for path in paths]
        return None

    def remove_paths(self, paths):
        self.calls += [("remove", path.name, time.monotonic()) for path in paths]
        return None


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_watcher_close_is_immediate_open_writer_waits_for_quiet(tmp_path: Path) -> None:
    lib = RecordingLibrary()
    watcher = FolderWatcher([tmp_path / "emb"], lib, on_change=lambda change: None)
    watcher.start()
    try:
        assert watcher.mode == "inotify"
        folder = tmp_path / "emb"
        (folder / "closed.pt").write_bytes(b"x" * 100)
        wait_until(lambda: any(c[1] == "closed.pt" for c in lib.calls))
        # A writer that keeps its file open: read after QUIET_S without writes, and only then.
        with open(folder / "open.pt", "wb") as fh:
            fh.write(b"a")
            fh.flush()
            wrote = time.monotonic()
            wait_until(lambda: any(c[1] == "open.pt" for c in lib.calls))
            seen = [c[2] for c in lib.calls if c[1] == "open.pt"][0]
            assert QUIET_S * 0.9 <= seen - wrote < QUIET_S + 1.0
            # Writes that never pause are still read within MAX_WAIT_S.
            lib.calls.clear()
            started = time.monotonic()
            while not lib.calls and time.monotonic() - started < MAX_WAIT_S + 2:
                fh.write(b"b")
                fh.flush()
                time.sleep(QUIET_S / 4)
            assert lib.calls and lib.calls[0][2] - started <= MAX_WAIT_S + 0.5
        # Hidden files, atomic temporaries and hidden folders are ignored; deletes are immediate.
        lib.calls.clear()
        (folder / ".hidden.pt").write_bytes(b"x")
        (folder / ".x.pt.sdrepl-abc.tmp").write_bytes(b"x")
        (folder / ".git").mkdir()
        (folder / ".git" / "y.pt").write_bytes(b"x")
        (folder / "closed.pt").unlink()
        wait_until(lambda: ("remove", "closed.pt") in [(c[0], c[1]) for c in lib.calls])
        # Events are handled in order: once a file written after them is seen, the ignored ones were skipped.
        (folder / "sentinel.pt").write_bytes(b"x")
        wait_until(lambda: any(c[1] == "sentinel.pt" for c in lib.calls))
        assert {c[1] for c in lib.calls} <= {"closed.pt", "open.pt", "sentinel.pt"}
    finally:
        watcher.stop()


def test_watcher_falls_back_to_polling(tmp_path: Path) -> None:
    lib = RecordingLibrary()
    watcher = FolderWatcher([tmp_path / "emb"], lib, on_change=lambda change: None, polling=True)
    watcher.start()
    try:
        assert watcher.mode == "polling"
        (tmp_path / "emb" / "a.pt").write_bytes(b"x" * 10)
        wait_until(lambda: any(c[1] == "a.pt" for c in lib.calls), timeout=5)
    finally:
        watcher.stop()


# --- the server in-process: internal errors and events from other threads ---------------------------


@pytest.fixture
def test_handlers():
    """Register the test-only request types, and take them out again after the test."""
    from sdrepl.daemon.registry import HANDLERS, handler

    @handler("_test_boom")
    async def boom(ctx, params, req):
        raise RuntimeError("kaboom")

    @handler("_test_thread_event")
    async def thread_event(ctx, params, req):
        thread = threading.Thread(target=lambda: ctx.broadcast("hello_from_thread", n=1))
        thread.start()
        thread.join()
        return {}

    yield
    for name in ("_test_boom", "_test_thread_event"):
        HANDLERS.pop(name, None)


def serve_in_process(scenario) -> None:
    """Run ``scenario(client)`` against a server in this process (no model, no library)."""
    import tempfile

    from sdrepl.config import Settings
    from sdrepl.daemon.client import DaemonClient
    from sdrepl.daemon.context import DaemonContext
    from sdrepl.daemon.server import DaemonServer

    sock = Path(tempfile.mkdtemp(prefix="sdu-", dir="/tmp")) / "u.sock"

    async def main() -> None:
        ctx = DaemonContext(Settings(socket=sock), library=None, worker=DeviceWorker(),  # type: ignore[arg-type]
                            loop=asyncio.get_running_loop(), log_hint="/var/log/x.log")
        server = DaemonServer(ctx)
        await server.listen(sock)
        import sdrepl.daemon.handlers  # noqa: F401  (hello)

        client = await DaemonClient.connect(sock)
        try:
            await scenario(client)
        finally:
            await client.close()
            server.stop_accepting()
            await server.close_connections()

    try:
        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        shutil.rmtree(sock.parent, ignore_errors=True)


def test_internal_error_reply_names_the_log_not_the_traceback(test_handlers) -> None:
    from sdrepl.daemon.client import RemoteError

    async def scenario(client) -> None:
        with pytest.raises(RemoteError) as info:
            await client.request("_test_boom")
        assert info.value.type_name == "InternalError"
        assert info.value.message == ("_test_boom: internal error (RuntimeError: kaboom); the traceback is in "
                                      "/var/log/x.log")

    serve_in_process(scenario)


def test_an_event_broadcast_from_another_thread_reaches_the_client(test_handlers) -> None:
    async def scenario(client) -> None:
        got: list[dict] = []
        client.add_event_listener(got.append)
        await client.request("_test_thread_event")
        while not got:  # the event was queued onto the loop before the reply; wait for it, not a fixed time
            await asyncio.sleep(0.005)
        assert got == [{"type": "event", "event": "hello_from_thread", "n": 1}]

    serve_in_process(scenario)


def test_params_null_means_default() -> None:
    p = Params({"sampler": None, "steps": None, "prompt": None}, "generate")
    assert (p.text("sampler", "Euler a"), p.integer("steps", 20)) == ("Euler a", 20)
    with pytest.raises(BadRequest, match="'prompt' must be a string, got null"):
        p.text("prompt")


def test_socket_lock_is_exclusive_and_names_its_holder(tmp_path: Path) -> None:
    import os

    from sdrepl.daemon.runtime import SocketLock

    sock = tmp_path / "s.sock"
    first, second = SocketLock(sock), SocketLock(sock)
    assert first.holder() is None
    assert first.acquire()
    try:
        assert not second.acquire()
        assert second.holder() == os.getpid()
    finally:
        first.release()
    assert second.holder() is None and second.acquire()
    second.release()



def test_an_inotify_queue_overflow_makes_the_watcher_rescan(tmp_path):
    """Events lost to a kernel queue overflow are recovered by a full rescan (watchdog only rebuilds its
    watches): a file that arrived unseen is loaded."""
    import threading

    from sdrepl.daemon.watcher import FolderWatcher

    class Library:
        def __init__(self) -> None:
            self.scans = threading.Event()

        def scan(self):
            self.scans.set()
            return None

        def update_paths(self, paths, *, force=False):
            return None

        def remove_paths(self, paths):
            return None

    library = Library()
    watcher = FolderWatcher([tmp_path], library, lambda change: None)
    watcher.start()
    try:
        if watcher.mode != "inotify":
            pytest.skip("needs inotify")
        groups = [e._inotify for e in watcher._observer.emitters]
        assert groups and all("on_queue_overflow" in vars(g) for g in groups)  # the hook is installed
        groups[0].on_queue_overflow()  # what watchdog's reader calls when the kernel says IN_Q_OVERFLOW
        assert library.scans.wait(5)
    finally:
        watcher.stop()
