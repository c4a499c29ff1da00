"""What every handler gets: the daemon's long-lived parts, and thread-safe ways to tell the clients.

One :class:`DaemonContext` per daemon. Handlers run on the event loop; device work runs on the worker
thread; the watcher runs on its own thread. Anything they want the clients to know goes through
:meth:`DaemonContext.broadcast`, which is safe from every thread.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sdrepl.config import Settings
from sdrepl.core.models import LoadedModel
from sdrepl.daemon import protocol
from sdrepl.daemon.worker import DeviceWorker

if TYPE_CHECKING:
    from sdrepl.core.library import EmbeddingLibrary
    from sdrepl.daemon.residency import ModelResidency
    from sdrepl.daemon.training_job import TrainingJob


#: Most entries an ``embeddings`` event carries; a bigger change (a folder copied in) tells clients to fetch.
EVENT_ENTRIES_MAX = 1000


@dataclass
class DaemonContext:
    """The daemon's state as handlers see it (the training handlers keep their job in ``training``)."""

    settings: Settings
    library: EmbeddingLibrary
    worker: DeviceWorker
    loop: asyncio.AbstractEventLoop
    #: The running training job (set by the training handlers); its ``shutdown()`` runs on daemon stop.
    training: TrainingJob | None = None
    residency: ModelResidency | None = None
    #: The LoRA and hypernetwork libraries (``core.networks.NetworkLibrary``; set by ``daemon.networks``).
    loras: Any = None
    hypernetworks: Any = None
    #: Where tracebacks of internal errors go, as a phrase for error messages ("see ...").
    log_hint: str = "the daemon's log"
    started: float = field(default_factory=time.time)
    #: ``daemon.workers.WorkerPool`` when ``--device`` names several devices (else None: one worker).
    pool: Any = None
    #: ``daemon.fleet.RayFleet`` with ``serve --ray`` (generations run on its replicas), else None.
    fleet: Any = None
    #: The TLS listeners' ``host:port`` (``serve --listen``), shown by ``status``.
    listening: list[str] = field(default_factory=list)
    #: ``fn(message)`` sends an event message to every subscribed connection; set by the server (loop only).
    _broadcast: Callable[[dict[str, Any]], None] | None = field(default=None, repr=False)
    #: ``fn(reason)`` starts a graceful shutdown; set by the server.
    _request_shutdown: Callable[[str], None] | None = field(default=None, repr=False)
    #: ``fn() -> int``: how many clients are connected; set by the server.
    _client_count: Callable[[], int] | None = field(default=None, repr=False)
    _loop_thread: int | None = field(default=None, repr=False)

    def bind(self, *, broadcast: Callable[[dict[str, Any]], None], request_shutdown: Callable[[str], None],
             client_count: Callable[[], int]) -> None:
        """Called by the server once, on the loop thread, before it accepts connections."""
        self._broadcast = broadcast
        self._request_shutdown = request_shutdown
        self._client_count = client_count
        self._loop_thread = threading.get_ident()

    def _on_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        elif not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # the loop closed between the check and the call (shutdown)
                pass

    def broadcast(self, event: str, **fields: Any) -> None:
        """Send ``event`` to every connection that subscribed to events (thread-safe)."""
        if self._broadcast is not None:
            self._on_loop(self._broadcast, protocol.event(event, **fields))

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the event loop (thread-safe)."""
        self._on_loop(fn, *args)

    async def get_model(self) -> LoadedModel:
        """The resident model; loads it when keep-alive unloaded it, waits while it loads. Counts as use."""
        assert self.residency is not None
        return await self.residency.get()

    def touch(self) -> None:
        """Count now as use of the model (restarts the keep-alive countdown)."""
        if self.residency is not None:
            self.residency.touch()

    def apply_library_change(self, change: Any) -> None:
        """Tell the clients about a library change (thread-safe); nothing when the change is empty.

        The event carries the change's own version and, unless the change is huge, the entries of what
        was added or updated and the paths of what was removed, so clients apply it without a re-fetch.
        """
        if change:
            fields: dict[str, Any] = {"change": change.describe(),
                                      "version": getattr(change, "version", 0) or self.library.version}
            entries = getattr(change, "entries", None)
            if entries is not None and len(entries) + len(change.removed_paths) <= EVENT_ENTRIES_MAX:
                fields["embeddings"] = [e.describe() for e in entries]
                fields["removed_paths"] = [str(p) for p in change.removed_paths]
            self.broadcast("embeddings", **fields)

    def request_shutdown(self, reason: str) -> None:
        """Start a graceful shutdown (thread-safe)."""
        if self._request_shutdown is not None:
            self._on_loop(self._request_shutdown, reason)

    @property
    def clients(self) -> int:
        return self._client_count() if self._client_count is not None else 0

    @property
    def model_state(self) -> str:
        return self.residency.state if self.residency is not None else "loading"
