"""``sdrepl serve [--detach]``, ``sdrepl status``, ``sdrepl stop``, and auto-start for the REPL.

A detached daemon is a new session (``start_new_session``) whose stdout and stderr go to
``<socket>.log``; the starting command waits until the daemon answers on its socket, or until it exits,
in which case the daemon's own one-line error (a bad ``--model``, a socket already in use) is shown and
the command exits with the daemon's status. :func:`ensure_daemon` is that, for the REPL: reuse a daemon
that answers, otherwise start one with the REPL's settings and wait for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sdrepl.config import Settings
from sdrepl.core.display import visible
from sdrepl.core.errors import ModelError
from sdrepl.core.model_spec import check_model_path
from sdrepl.core.status_text import format_status
from sdrepl.daemon.client import DaemonUnavailable, RemoteError, request_sync
from sdrepl.daemon.runtime import LOG_FILE_ENV, SocketLock, run_daemon
from sdrepl.daemon.runtime_dir import UnsafeRuntime, ensure_folder, open_private

#: How long ``serve --detach`` waits for its daemon to become ready.
START_TIMEOUT_S = 300.0
#: How long ``stop`` waits for the daemon to exit (a training job may be writing a checkpoint).
STOP_TIMEOUT_S = 120.0


def serve_command(settings: Settings, detach: bool = False) -> int:
    try:
        check_model_path(settings.model)  # before torch is imported: a typo'd path is answered at once
    except ModelError as exc:
        print(f"sdrepl: {exc}", file=sys.stderr, flush=True)
        return 2
    if not detach:
        return run_daemon(settings)
    code, message = start_detached(settings)
    print(message, file=sys.stdout if code == 0 else sys.stderr, flush=True)
    return code


def start_detached(settings: Settings, timeout: float = START_TIMEOUT_S) -> tuple[int, str]:
    """Start a daemon in the background and wait until it is ready: (exit status, a line for the user)."""
    log_file = settings.log_file
    try:
        ensure_folder(log_file.parent)
        fd = open_private(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    except UnsafeRuntime as exc:
        return 2, f"sdrepl: {exc}"
    except OSError as exc:
        return 2, f"sdrepl: cannot open the daemon's log {log_file}: {exc.strerror or exc}"
    offset = os.lseek(fd, 0, os.SEEK_END)
    env = dict(os.environ, **{LOG_FILE_ENV: str(log_file), "PYTHONUNBUFFERED": "1"})
    try:
        proc = subprocess.Popen([sys.executable, "-m", "sdrepl", "serve", *settings.daemon_args()],
                                stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, env=env,
                                start_new_session=True, close_fds=True)
    finally:
        os.close(fd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            return (code or 2), _daemon_error(log_file, offset, code)
        try:
            info = request_sync(settings.socket, "status", timeout=2.0)
        except (DaemonUnavailable, RemoteError, OSError, ValueError):
            info = None
        if info is not None and info.get("pid") == proc.pid:
            model = info.get("model") or {}
            remote = (f"; remote clients: sdrepl --connect {settings.remote_connection_file}"
                      if settings.listen else "")
            return 0, (f"sdrepl: daemon ready on {settings.socket} (pid {proc.pid}, model {model.get('model')} on "
                       f"{model.get('device')}; log {log_file}{remote})")
        time.sleep(0.05)
    return 2, (f"sdrepl: the daemon (pid {proc.pid}) was not ready after {timeout:g} s; it may still be loading: "
               f"see {log_file}, or `sdrepl stop` it")


def _daemon_error(log_file: Path, offset: int, code: int) -> str:
    """The daemon's own error line from its log (the last ``sdrepl:`` line it wrote), else its last line."""
    try:
        with os.fdopen(open_private(log_file, os.O_RDONLY), "rb") as fh:
            fh.seek(offset)
            lines = [ln.strip() for ln in fh.read().decode(errors="replace").splitlines() if ln.strip()]
    except (OSError, UnsafeRuntime):
        lines = []
    for line in reversed(lines):
        if line.startswith("sdrepl: "):
            return line
    last = lines[-1] if lines else "no output"
    return f"sdrepl: the daemon exited with status {code} before it was ready ({last}); see {log_file}"


def ensure_daemon(settings: Settings, *, on_status: Callable[[str], None] | None = None,
                  timeout: float = START_TIMEOUT_S, retry: bool = True) -> None:
    """Make sure a daemon answers on ``settings.socket``: reuse one, wait for one starting, or start one.

    Raises :class:`DaemonUnavailable` with the daemon's own error (e.g. a bad ``--model``) when it cannot
    start, or when nothing is ready within ``timeout``.
    """
    notify = on_status or (lambda text: print(text, file=sys.stderr, flush=True))
    if settings.connect is not None:  # a remote daemon: it answers or it does not; none is started from here
        request_sync(settings.connect, "ping", timeout=10.0)
        return
    if _answers(settings.socket):
        return
    holder = SocketLock(settings.socket).holder()
    if holder is None:
        notify(f"starting the daemon: loading model {settings.model} ...")
        try:
            proc = subprocess.run([sys.executable, "-m", "sdrepl", "serve", "--detach", *settings.daemon_args()],
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise DaemonUnavailable(f"the daemon on {settings.socket} was not ready after {timeout:g} s; see "
                                    f"{settings.log_file}") from exc
        if proc.returncode == 0:
            return
        line = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        if proc.returncode != 1:  # 1: another daemon got the socket first (e.g. a second REPL): wait for it
            raise DaemonUnavailable(line.removeprefix("sdrepl: "))
    else:
        notify(f"waiting for the daemon that is starting on {settings.socket} (pid {holder}) ...")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _answers(settings.socket):
            return
        if SocketLock(settings.socket).holder() is None and not _answers(settings.socket):
            if retry:  # the holder was a daemon dying (killed: its socket closes before its lock): start one
                return ensure_daemon(settings, on_status=on_status, timeout=timeout, retry=False)
            raise DaemonUnavailable(f"the daemon starting on {settings.socket} exited; see {settings.log_file}")
        time.sleep(0.1)
    raise DaemonUnavailable(f"no daemon became ready on {settings.socket} within {timeout:g} s")


def _answers(socket: Path) -> bool:
    try:
        request_sync(socket, "ping", timeout=5.0)
        return True
    except DaemonUnavailable:
        return False
    except RemoteError as exc:  # e.g. ProtocolMismatch: a daemon of another version holds the socket
        raise DaemonUnavailable(exc.message) from exc


def status_command(settings: Settings, as_json: bool = False) -> int:
    try:
        result = request_sync(settings.target, "status", timeout=10.0 if settings.connect else 5.0)
    except DaemonUnavailable as exc:
        if settings.connect is not None:
            if as_json:
                print(json.dumps({"running": False, "host": str(settings.connect), "error": str(exc)}))
            else:
                print(f"sdrepl: {exc}", file=sys.stderr)
            return 1
        holder = SocketLock(settings.socket).holder()
        if as_json:
            print(json.dumps({"running": False, "socket": str(settings.socket), "starting_pid": holder,
                              "error": str(exc)}))
        elif holder:
            print(f"sdrepl: a daemon is starting on {settings.socket} (pid {holder}); not ready yet",
                  file=sys.stderr)
        else:
            print(f"sdrepl: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps({"running": True, **result}))
    else:
        print(visible(format_status(result), newlines=True))  # folders and model names may hold anything
    return 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is gone for our purpose
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _stop_remote(endpoint: object, timeout: float) -> int:
    """``stop`` of a daemon on another machine: ask it to shut down, wait until it no longer answers."""
    try:
        pid = request_sync(endpoint, "status", timeout=10.0).get("pid")
        request_sync(endpoint, "shutdown", timeout=10.0)
    except DaemonUnavailable as exc:
        print(f"sdrepl: {exc}; nothing to stop")
        return 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            request_sync(endpoint, "ping", timeout=2.0)
        except (DaemonUnavailable, RemoteError):  # gone, or refusing new requests while it stops
            print(f"sdrepl: daemon at {endpoint} stopped (pid {pid} there)")
            return 0
        time.sleep(0.1)
    print(f"sdrepl: the daemon at {endpoint} is still stopping after {timeout:g} s", file=sys.stderr)
    return 1


def stop_command(settings: Settings, timeout: float = STOP_TIMEOUT_S) -> int:
    if settings.connect is not None:
        return _stop_remote(settings.connect, timeout)
    try:
        info = request_sync(settings.socket, "status", timeout=5.0)
        pid = int(info["pid"])
        request_sync(settings.socket, "shutdown", timeout=10.0)
    except DaemonUnavailable:
        holder = SocketLock(settings.socket).holder()
        if holder:
            print(f"sdrepl: the daemon on {settings.socket} (pid {holder}) is still starting; stop it once it is "
                  f"ready, or `kill {holder}`", file=sys.stderr)
            return 1
        print(f"sdrepl: no daemon running on {settings.socket}; nothing to stop")  # the goal holds: exit 0
        return 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            print(f"sdrepl: daemon stopped (pid {pid})")
            return 0
        time.sleep(0.05)
    print(f"sdrepl: the daemon (pid {pid}) is still stopping after {timeout:g} s (a training job may be saving); "
          f"`kill {pid}` forces it", file=sys.stderr)
    return 1
