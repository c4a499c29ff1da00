"""Helpers of the daemon tests: real daemon processes: ``tiny`` on the CPU, a private socket, private folders.

A daemon is a ``python -m sdrepl serve`` subprocess; it is ready when its ``status`` answers with its own
pid, and it is always torn down (SIGTERM, then SIGKILL) even when a test fails. Sockets live in short
``/tmp`` folders because a Unix socket path is limited to 107 bytes. Torch gets one thread: the test
machines are shared, and OpenMP threads fighting over busy cores make a tiny model ten times slower.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from sdrepl.config import Settings

START_TIMEOUT = 120.0


def daemon_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1"})
    return env


def short_dir(prefix: str = "sdt-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@dataclass
class DaemonProcess:
    """A daemon subprocess and the settings that reach it."""

    settings: Settings
    root: Path
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    #: The daemon's environment; ``daemon_env()`` when None.
    env: dict[str, str] | None = None

    @property
    def socket(self) -> Path:
        return self.settings.socket

    @property
    def embeddings(self) -> Path:
        return self.settings.embeddings[0]

    @property
    def outputs(self) -> Path:
        return self.settings.outputs

    @property
    def log_path(self) -> Path:
        return self.root / "daemon.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, cwd: Path | None = None) -> DaemonProcess:
        """Start the daemon (in ``cwd``, where default training logs go) and wait until it answers."""
        from sdrepl.daemon.client import DaemonUnavailable, request_sync

        args = [sys.executable, "-m", "sdrepl", "serve", *self.settings.daemon_args(), *self.extra_args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=self.env or daemon_env(),
                                         cwd=cwd)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if request_sync(self.socket, "status", timeout=2.0).get("pid") == self.proc.pid:
                    return self
            except DaemonUnavailable:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the daemon was not ready within {START_TIMEOUT} s:\n{self.log()}")

    def wait_remote(self, timeout: float = 30.0) -> Path:
        """A ``--listen`` daemon's remote connection file, once written (after the Unix socket answers:
        ``start`` does not wait for it)."""
        path = self.settings.remote_connection_file
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert time.monotonic() < deadline, f"no {path} after {timeout} s:\n{self.log()}"
            time.sleep(0.05)
        return path

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def client(self, **kwargs):
        """An async context manager: a connected DaemonClient."""
        from sdrepl.daemon.client import DaemonClient

        return _Connected(DaemonClient.connect(self.socket, **kwargs))


class _Connected:
    def __init__(self, connecting) -> None:
        self._connecting = connecting
        self.client = None

    async def __aenter__(self):
        self.client = await self._connecting
        return self.client

    async def __aexit__(self, *exc) -> None:
        await self.client.close()


def make_daemon(root: Path, *, keep_alive: float | None = None, embeddings: list[Path] | None = None,
                extra_args: list[str] | None = None, model: str = "tiny") -> DaemonProcess:
    """Settings for a daemon under ``root`` (not started)."""
    emb = root / "embeddings"
    emb.mkdir(parents=True, exist_ok=True)
    settings = Settings(socket=root / "d.sock", model=model, embeddings=embeddings or [emb],
                        loras=[root / "loras"], hypernetworks=[root / "hypernetworks"],
                        outputs=root / "outputs", device="cpu", dtype="fp32", keep_alive=keep_alive)
    return DaemonProcess(settings, root, extra_args or [])


def run(coro, timeout: float = 120.0):
    """Run one async test scenario with an overall deadline."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


class EventLog:
    """Collects a client's events and lets a test wait for one that matches."""

    def __init__(self, client) -> None:
        self.events: list[dict] = []
        self._changed = asyncio.Event()
        client.add_event_listener(self._on_event)

    def _on_event(self, event: dict) -> None:
        self.events.append(event)
        self._changed.set()

    async def wait_for(self, predicate, timeout: float = 10.0, start: int = 0) -> dict:
        deadline = time.monotonic() + timeout
        index = start
        while True:
            while index < len(self.events):
                event = self.events[index]
                index += 1
                if predicate(event):
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching event within {timeout} s; got {self.events[start:]}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    def mark(self) -> int:
        return len(self.events)


def raw_exchange(sock_path: Path, lines: list[bytes], replies: int, timeout: float = 30.0) -> list[dict]:
    """Send raw protocol lines on one Unix-socket connection and collect ``replies`` replies (events are
    skipped); fails if the daemon closes the connection first. For tests of malformed input."""
    import json
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))
        s.sendall(b"".join(line + b"\n" for line in lines))
        buffer = b""
        out: list[dict] = []
        while len(out) < replies:
            chunk = s.recv(65536)
            assert chunk, f"the daemon closed the connection after {out}"
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                message = json.loads(line)
                if message["type"] == "reply":
                    out.append(message)
        return out
