"""One daemon process from start to exit: claim the socket, load the model, serve, shut down cleanly.

Startup order matters: the socket is claimed (a lock file held for the daemon's life, so two daemons can
never share a socket, even while one is still loading), then the model is loaded (a bad ``--model``
ends the process with one line and exit status 2 before anything else happens), then the library is
scanned with the watcher already running (nothing written during the scan is missed), and only then does
the socket listen and the connection file appear: a daemon that answers is ready.

Shutdown (``shutdown`` request, SIGTERM, SIGINT): stop accepting, tell the clients, let a training job
checkpoint, drop queued work (it replies ``Cancelled``), give running work a grace period, reply to
everything, remove the socket and connection file. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sdrepl import __version__
from sdrepl.config import Settings
from sdrepl.core.display import VisibleFormatter
from sdrepl.core.errors import SdreplError
from sdrepl.daemon import protocol
from sdrepl.daemon.protocol import PROTOCOL_VERSION
from sdrepl.daemon.runtime_dir import UnsafeRuntime, ensure_folder, open_private

log = logging.getLogger("sdrepl.daemon")

#: Seconds running device work may take to finish after a shutdown starts, before it is cancelled.
GRACE_S = 10.0
#: The environment variable through which a detached daemon learns where its log goes.
LOG_FILE_ENV = "SDREPL_LOG_FILE"
SOCKET_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL


class SocketLock:
    """``<socket>.lock``, flock-ed for the daemon's life and holding its pid (kernel releases it on exit)."""

    def __init__(self, socket: Path) -> None:
        self.path = socket.with_name(socket.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock (False when another daemon holds it); :class:`UnsafeRuntime` for a planted file."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = open_private(self.path, os.O_RDWR | os.O_CREAT)
        for attempt in range(5):  # a `holder()` probe holds a shared lock for an instant: try again
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if attempt == 4:
                    os.close(fd)
                    return False
                time.sleep(0.02)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def holder(self) -> int | None:
        """The pid of the daemon holding the lock (starting or running), or None when nobody holds it."""
        try:
            fd = open_private(self.path, os.O_RDONLY)
        except (OSError, UnsafeRuntime):
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                text = os.read(fd, 64).decode(errors="replace").strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def configure_logging() -> None:
    """Log to stderr (a detached daemon's stderr is its log file); keep library chatter out of it."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(VisibleFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    for name in ("diffusers", "transformers", "urllib3", "huggingface_hub", "py.warnings"):
        logging.getLogger(name).setLevel(logging.ERROR)


def quiet_model_libraries() -> None:
    """diffusers' and transformers' own verbosity and progress bars off (imports them: call before a load,
    not at start-up, so that refusals come before seconds of imports)."""
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:  # quieter logs are a nicety
        pass


def log_hint() -> str:
    path = os.environ.get(LOG_FILE_ENV)
    return f"the daemon's log {path}" if path else "the daemon's log (stderr of `sdrepl serve`)"


def write_connection_file(settings: Settings) -> None:
    """``<socket>.json``, owner-only from its first byte, replaced atomically."""
    data = {"pid": os.getpid(), "socket": str(settings.socket), "protocol": PROTOCOL_VERSION,
            "version": __version__, "started": time.time(), "model": settings.model}
    path = settings.connection_file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # a leftover (or a planted symlink: unlink removes the link, not its target)
    fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)
        fh.write("\n")
    os.replace(tmp, path)


def remove_files(settings: Settings) -> None:
    for path in (settings.socket, settings.connection_file):
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove %s: %s", path, exc)


def _fail(message: str, code: int) -> int:
    print(f"sdrepl: {message}", file=sys.stderr, flush=True)
    return code


def run_daemon(settings: Settings) -> int:
    """The foreground daemon (``sdrepl serve``); returns the exit status."""
    from sdrepl.daemon.client import DaemonUnavailable, RemoteError, request_sync

    if len(os.fsencode(str(settings.socket))) > SOCKET_PATH_MAX:
        return _fail(f"--socket {settings.socket} is too long for a Unix socket ({SOCKET_PATH_MAX} bytes at most); "
                     "choose a shorter path", 2)
    from sdrepl.core.dependencies import torch_problem

    unsafe = torch_problem()
    if unsafe is not None:
        return _fail(unsafe, 2)
    from sdrepl.daemon.transport import prepare_listeners

    try:
        listeners = prepare_listeners(settings)  # a bad --listen or certificate fails before the model loads
    except SdreplError as exc:
        return _fail(str(exc), 2)
    from sdrepl.daemon.workers import parse_devices

    try:
        devices = parse_devices(settings.device)  # --device cuda:0,cuda:1 / all / cpu,cpu: one worker each
    except SdreplError as exc:
        return _fail(str(exc), 2)
    fleet = None
    if settings.ray:
        from sdrepl.daemon.fleet import RayFleet, parse_replicas, ray_problem

        try:
            replicas = parse_replicas(settings.ray_replicas)
        except SdreplError as exc:
            return _fail(str(exc), 2)
        problem = ray_problem() or (len(devices) > 1 and "--ray and a --device list do not go together: the "
                                    "replicas are the workers (give --ray-replicas N)") or None
        if problem:
            return _fail(problem, 2)
        fleet = RayFleet(settings.ray, replicas, settings)
    if len(devices) > 1:
        settings = dataclasses.replace(settings, device=devices[0])  # worker 0: the residency's device
    configure_logging()
    lock = SocketLock(settings.socket)
    try:
        ensure_folder(settings.socket.parent)
        acquired = lock.acquire()
    except UnsafeRuntime as exc:
        return _fail(str(exc), 2)
    except OSError as exc:
        return _fail(f"cannot create the socket folder {settings.socket.parent}: {exc.strerror or exc}; give "
                     "--socket a path in a folder you can write to", 2)
    if not acquired:
        holder = lock.holder()
        return _fail(f"a daemon is already running on {settings.socket} (pid {holder}); `sdrepl stop` stops it, "
                     "or give another --socket", 1)
    try:
        try:
            info = request_sync(settings.socket, "status", timeout=1.0)
        except (DaemonUnavailable, RemoteError, OSError, ValueError):
            info = None
        if info is not None:
            return _fail(f"a daemon is already running on {settings.socket} (pid {info.get('pid')}); "
                         "`sdrepl stop` stops it, or give another --socket", 1)
        model = _load_initial_model(settings)
        if isinstance(model, int):
            return model
        # Hand the model over in a box and drop this frame's reference: residency must own the only
        # reference, or keep-alive's first unload frees nothing and a reload makes two models resident.
        box = [model]
        del model
        try:
            return asyncio.run(_serve(settings, box, listeners, devices[1:], fleet))
        except SdreplError as exc:  # --ray: no cluster at that address
            return _fail(str(exc), 2)
        except OSError as exc:  # a folder that cannot be created or watched, a socket that cannot be bound
            log.debug("start-up failed", exc_info=True)
            where = f" ({exc.filename})" if exc.filename else ""
            return _fail(f"cannot start the daemon: {exc.strerror or exc}{where}; check the --socket, --embeddings "
                         "and --outputs paths", 2)
    finally:
        lock.release()


def _load_initial_model(settings: Settings) -> Any:
    quiet_model_libraries()
    from sdrepl.core.models import load_model

    notice = threading.Timer(1.0, lambda: log.info("loading model %s on %s ...", settings.model, settings.device))
    notice.daemon = True
    notice.start()
    started = time.monotonic()
    try:
        model = load_model(settings.model, settings.device, settings.dtype,
                           prediction_type=settings.prediction_type, compile=settings.compile)
    except SdreplError as exc:
        return _fail(str(exc), 2)
    except Exception as exc:
        log.exception("loading model %s failed", settings.model)
        return _fail(f"--model {settings.model}: cannot load it ({type(exc).__name__}: {exc})", 2)
    finally:
        notice.cancel()
    log.info("model %s (%s) loaded on %s %s in %.1f s", model.name, model.label, model.device,
             model.describe()["dtype"], time.monotonic() - started)
    return model


async def _serve(settings: Settings, box: list[Any], listeners: Any = None, extra_devices: list[str] | None = None,
                 fleet: Any = None) -> int:
    """Serve until shutdown; ``box`` holds the start-up model, which is taken out (see ``run_daemon``)."""
    from sdrepl.core.library import EmbeddingLibrary
    from sdrepl.daemon.context import DaemonContext
    from sdrepl.daemon.residency import ModelResidency
    from sdrepl.daemon.server import DaemonServer, load_handlers
    from sdrepl.daemon.watcher import FolderWatcher
    from sdrepl.daemon.worker import DeviceWorker

    model = box.pop()
    loop = asyncio.get_running_loop()
    holder: dict[str, DaemonContext] = {}
    worker = DeviceWorker(on_change=lambda pending, running: holder["ctx"].broadcast(
        "queue", pending=pending, running=running))
    library = EmbeddingLibrary(settings.embeddings, model.encoder_widths, model_label=model.label)
    ctx = DaemonContext(settings, library, worker, loop, log_hint=log_hint())
    holder["ctx"] = ctx
    ctx.residency = ModelResidency(settings, worker, model, announce=lambda state, desc, message: ctx.broadcast(
        "model", state=state, model=desc, message=message))
    del model  # residency owns it now (keep-alive must be able to free it)
    watcher = FolderWatcher(settings.embeddings, library, ctx.apply_library_change)
    from sdrepl.daemon.networks import start_networks

    network_watchers: list[Any] = []
    worker.start()
    server = DaemonServer(ctx)
    try:
        watcher.start()
        change = await asyncio.to_thread(library.scan)
        log.info("embeddings: %d loaded, %d skipped in %s (watching: %s)", len(library.embeddings()),
                 len(library.skipped()), ", ".join(map(str, library.folders)), watcher.mode)
        for warning in change.warnings:
            log.warning("embeddings: %s", warning)
        network_watchers = await asyncio.to_thread(start_networks, ctx, ctx.residency.model)
        if extra_devices:
            await _start_workers(ctx, server, settings, extra_devices)
        if fleet is not None:  # serve --ray: deploy the replicas before serving (daemon/fleet.py)
            fleet.start_model_name = ctx.residency.model.name
            await asyncio.to_thread(fleet.start)
            ctx.fleet = fleet
            server.admission.workers = max(1, fleet.replicas.maximum)
        load_handlers()
        remove_files(settings)  # stale ones: we hold the lock and nobody answered
        await server.listen(settings.socket)
        write_connection_file(settings)
        if listeners is not None:
            await _listen_remote(server, settings, listeners)
        _install_signals(loop, server, settings)
        ctx.residency.start_keep_alive()
        log.info("sdrepl daemon %s ready on %s (pid %d)", __version__, settings.socket, os.getpid())
        await server.stopped.wait()
        await _shutdown(ctx, server, watcher)
    finally:
        remove_files(settings)
        watcher.stop()
        for extra in network_watchers:
            extra.stop()
        worker.stop(timeout=1.0)
        if ctx.pool is not None:
            ctx.pool.stop(timeout=1.0)
        if fleet is not None:
            fleet.close()  # the deployment goes with the daemon (and the local Ray it started)
    log.info("stopped")
    return 0


async def _start_workers(ctx: Any, server: Any, settings: Settings, devices: list[str]) -> None:
    """Load the model on every further ``--device`` (one worker thread each; see daemon/workers.py)."""
    from sdrepl.core.models import load_model
    from sdrepl.daemon.workers import WorkerPool

    def loader(spec: str, device: str) -> Any:  # also what !model loads on every further device
        return load_model(spec, device, settings.dtype, prediction_type=settings.prediction_type,
                          compile=settings.compile)

    pool = WorkerPool(ctx.worker, settings.device, spec=settings.model, loader=loader)
    for device in devices:
        started = time.monotonic()
        model = await asyncio.to_thread(loader, settings.model, device)
        slot = pool.add(device, model)
        log.info("worker %s: model %s loaded in %.1f s", slot.label, model.name, time.monotonic() - started)
    ctx.pool = pool
    server.admission.workers = pool.size


async def _listen_remote(server: Any, settings: Settings, plan: Any) -> None:
    """Open the TLS listeners, then write the remote connection file (with the bound ports) and say where."""
    from sdrepl.daemon.auth import write_connection_file as write_remote_file

    bound = [await server.listen_tcp(host, port, plan.ssl_context, plan.key) for host, port in plan.addresses]
    write_remote_file(plan.connection_file, listeners=bound, fingerprint=plan.fingerprint, key=plan.key,
                      socket=settings.socket)
    server.ctx.listening = [f"{host}:{port}" for host, port in bound]
    where = ", ".join(f"tls://{host}:{port}" for host, port in bound)
    log.info("listening on %s (certificate %s)", where, plan.fingerprint)
    print(f"sdrepl: listening on {where}; remote clients: sdrepl --connect {plan.connection_file} (copy that file, "
          "0600, to the client machine)", file=sys.stderr, flush=True)


def _install_signals(loop: asyncio.AbstractEventLoop, server: Any, settings: Settings) -> None:
    def on_signal(name: str) -> None:
        if server.shutdown_reason is None:
            server.request_shutdown(f"signal {name}")
            return
        log.warning("second %s: exiting now without waiting", name)
        remove_files(settings)
        logging.shutdown()
        os._exit(1)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)


async def _shutdown(ctx: Any, server: Any, watcher: Any) -> None:
    server.stop_accepting()
    ctx.worker.close()  # queued work replies Cancelled now; only what is running may finish
    if ctx.pool is not None:
        ctx.pool.close()
    server.broadcast(protocol.event("shutdown", reason=server.shutdown_reason))
    if ctx.training is not None:
        log.info("asking the training job to checkpoint before stopping")
        try:
            await asyncio.to_thread(ctx.training.shutdown)
        except Exception:
            log.exception("the training job's shutdown failed")
    await ctx.residency.stop()
    watcher.stop()
    finished = await asyncio.to_thread(ctx.worker.stop, GRACE_S)
    if not finished:
        log.warning("running device work did not end within %.0f s; cancelling it", GRACE_S)
        for conn in list(server.connections):
            conn.cancel_all(abandon=False)
        await asyncio.to_thread(ctx.worker.stop, 5.0)
    await server.drain_requests(2.0)
    await asyncio.sleep(0)  # let the last replies reach the transports
    await server.close_connections()
