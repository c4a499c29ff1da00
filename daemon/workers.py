"""One worker per device: ``--device cuda:0,cuda:1`` (or ``all``, or ``cpu,cpu`` for tests) in one daemon.

InvokeAI's multi-GPU design is the anchor: the model is loaded on every device, each device has its own
:class:`~sdrepl.daemon.worker.DeviceWorker` thread, and generations come from one queue, first free device
first (a FIFO of free workers: the waiting request that came first gets the worker that frees first).
Worker 0 is the daemon's usual device (its residency: keep-alive, ``!model``, training); the others keep
their model loaded for the daemon's life. Training runs on worker 0 only (``status`` says so), and a
generation sent to worker 0 while it trains waits at most one training step, as before.

``!model`` switches worker 0 first (validated there: a bad spec changes nothing anywhere), then every
further device loads the same spec on its own thread, after the generation it is running (each worker
runs its queue in order, so a generation already on a device finishes on the old model). A generation
always checks, on the device thread, that the device holds the daemon's current model, loading it there
first if not, so every picture comes from the model the daemon reports. A device that cannot load it
(out of memory, say) is retired with a logged reason and ``status`` shows it; the others go on serving.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sdrepl.core.errors import UsageError
from sdrepl.daemon.protocol import Cancelled
from sdrepl.daemon.worker import DeviceWorker

log = logging.getLogger(__name__)


def parse_devices(text: str) -> list[str]:
    """``--device``: one device, a comma list (``cuda:0,cuda:1``, ``cpu,cpu``) or ``all`` (every CUDA device)."""
    value = (text or "auto").strip()
    if value.lower() == "all":
        try:
            import torch

            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except Exception:
            count = 0
        if count == 0:
            raise UsageError("--device all: no CUDA device is visible; give --device cpu, or list devices "
                             "(cuda:0,cuda:1)")
        return [f"cuda:{i}" for i in range(count)]
    devices = [part.strip() for part in value.split(",")]
    if any(not part for part in devices):
        raise UsageError(f"--device {text!r}: an empty entry in the list; write e.g. cuda:0,cuda:1")
    if len(devices) > 1 and "auto" in (d.lower() for d in devices):
        raise UsageError(f"--device {text!r}: 'auto' cannot be one of several devices; name them (cuda:0,cuda:1)")
    if len(devices) > 64:
        raise UsageError(f"--device {text!r}: {len(devices)} devices; at most 64")
    return devices


@dataclass
class Slot:
    """One device: its worker thread, its model (None for worker 0, whose model is the residency's)."""

    index: int
    device: str
    worker: DeviceWorker
    model: Any = None
    #: The ``--model`` / ``!model`` spec ``model`` was loaded from (worker 0: unused).
    spec: str | None = None
    #: Why this device serves no more generations (it could not load the daemon's model), or None.
    retired: str | None = None

    @property
    def label(self) -> str:
        return f"{self.index}:{self.device}"


class WorkerPool:
    """The devices of one daemon and the FIFO of free ones (see the module docstring)."""

    def __init__(self, primary: DeviceWorker, primary_device: str, spec: str | None = None,
                 loader: Callable[[str, str], Any] | None = None) -> None:
        self.slots = [Slot(0, primary_device, primary)]
        self._free: asyncio.Queue[Slot] | None = None
        #: The daemon's model spec (what every device must hold); ``loader(spec, device)`` loads it.
        self.spec = spec
        self.loader = loader
        self._reloads: set[asyncio.Future] = set()

    @property
    def size(self) -> int:
        return len(self.slots)

    def add(self, device: str, model: Any, on_change: Callable[[int, str | None], None] | None = None) -> Slot:
        """A further device whose ``model`` (loaded from ``self.spec``) is loaded (call before serving)."""
        worker = DeviceWorker(on_change=on_change, name=f"sdrepl-device-{len(self.slots)}")
        slot = Slot(len(self.slots), device, worker, model, self.spec)
        self.slots.append(slot)
        worker.start()
        return slot

    def _queue(self) -> asyncio.Queue[Slot]:
        if self._free is None:  # made on the loop that uses it
            self._free = asyncio.Queue()
            for slot in self.slots:
                self._free.put_nowait(slot)
        return self._free

    @property
    def waiting(self) -> int:
        """Generations waiting for a free worker."""
        queue = self._queue()
        return len(getattr(queue, "_getters", ()))

    @property
    def ahead(self) -> int:
        """Requests a new generation would wait behind: 0 while a worker is free."""
        queue = self._queue()
        return 0 if queue.qsize() else self.waiting + 1

    async def _acquire(self, cancel_event: threading.Event) -> Slot:
        """The next free worker, in the order the requests came (one getter each, kept while waiting);
        ``cancel_event`` (a protocol ``cancel``) is looked at every 0.1 s."""
        queue = self._queue()
        getter = asyncio.ensure_future(queue.get())
        try:
            while not getter.done():
                await asyncio.wait({getter}, timeout=0.1)
                if cancel_event.is_set() and not getter.done():
                    raise Cancelled("cancelled while waiting for a free device")
            return getter.result()
        except BaseException:
            if getter.done() and not getter.cancelled():
                queue.put_nowait(getter.result())  # got a worker just as we gave up: hand it on
            else:
                getter.cancel()
            raise

    async def run(self, fn: Callable[[Any], Any], primary_model: Any, cancel_event: threading.Event,
                  label: str = "generate") -> tuple[Any, Slot]:
        """Run ``fn(model)`` on the first free device's thread; returns its result and the slot used.

        Worker 0 uses ``primary_model`` (the residency's, held by the caller); another worker first makes
        sure it holds the daemon's current model (see the module docstring). A worker that cannot load it
        is retired (not put back; worker 0 always is, so a request never waits forever) and the request
        goes to the next free one."""
        queue = self._queue()
        while True:
            slot = await self._acquire(cancel_event)
            if slot.index == 0:
                try:
                    result = await slot.worker.run(lambda: fn(primary_model), cancel_event=cancel_event,
                                                   label=label)
                finally:
                    queue.put_nowait(slot)
                return result, slot
            try:
                result = await slot.worker.run(lambda s=slot: fn(self._current(s)), cancel_event=cancel_event,
                                               label=label)
            except _Retired:
                continue  # not put back: the next free worker takes the request
            except BaseException:
                queue.put_nowait(slot)
                raise
            queue.put_nowait(slot)
            return result, slot

    def _current(self, slot: Slot) -> Any:
        """On ``slot``'s thread: its model, loaded first if the daemon switched since (``!model``)."""
        if slot.retired is not None:  # its background load failed: one try per switch
            raise _Retired(slot.retired)
        if slot.spec != self.spec:
            self._reload(slot)
        return slot.model

    def _reload(self, slot: Slot) -> None:
        """On ``slot``'s thread: drop its model, load ``self.spec``; retire the slot if that fails."""
        from sdrepl.daemon.residency import free_device_memory

        spec = self.spec
        if slot.spec == spec or spec is None or self.loader is None:
            return
        device = getattr(slot.model, "device", slot.device)
        slot.model, slot.spec = None, None  # the old model leaves the device first (two rarely fit)
        free_device_memory(device)
        started = time.monotonic()
        try:
            slot.model = self.loader(spec, slot.device)
        except Exception as exc:
            slot.retired = f"could not load model {spec}: {exc}"
            log.warning("worker %s retired: %s", slot.label, slot.retired)
            raise _Retired(slot.retired) from exc
        slot.spec = spec
        log.info("worker %s: model %s loaded in %.1f s", slot.label, spec, time.monotonic() - started)

    def switched(self, spec: str) -> None:
        """Worker 0 now holds ``spec`` (``!model``): every further device loads it next, in the background."""
        self.spec = spec
        for slot in self.slots[1:]:
            if slot.retired is None:
                task = asyncio.ensure_future(slot.worker.run(lambda s=slot: self._reload(s), label="load model"))
                self._reloads.add(task)
                task.add_done_callback(self._reload_done)

    def _reload_done(self, task: asyncio.Future) -> None:
        self._reloads.discard(task)
        if not task.cancelled() and task.exception() is not None and not isinstance(task.exception(), _Retired):
            log.warning("a worker's model load failed: %s", task.exception())

    def discard(self, cancel_event: threading.Event) -> None:
        for slot in self.slots[1:]:
            slot.worker.discard(cancel_event)

    def close(self) -> None:
        for slot in self.slots[1:]:
            slot.worker.close()

    def stop(self, timeout: float) -> bool:
        return all([slot.worker.stop(timeout) for slot in self.slots[1:]])

    def describe(self) -> list[dict[str, Any]]:
        rows = []
        for s in self.slots:
            row = {"index": s.index, "device": s.device, "pending": s.worker.pending, "running": s.worker.running}
            if s.index:
                row["model"] = s.spec  # None while it loads the daemon's new model
                if s.retired is not None:
                    row["retired"] = s.retired
            rows.append(row)
        return rows


class _Retired(Exception):
    """A worker that could not load the daemon's model; its request goes to another worker."""
