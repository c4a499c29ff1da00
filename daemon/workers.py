"""One worker per device: ``--device cuda:0,cuda:1`` (or ``all``, or ``cpu,cpu`` for tests) in one daemon.

InvokeAI's multi-GPU design is the anchor: the model is loaded on every device, each device has its own
:class:`~sdrepl.daemon.worker.DeviceWorker` thread, and generations come from one queue, first free device
first (a FIFO of free workers: the waiting request that came first gets the worker that frees first).
Worker 0 is the daemon's usual device (its residency: keep-alive, ``!model``, training); the others keep
their model loaded for the daemon's life. Training runs on worker 0 only (``status`` says so), and a
generation sent to worker 0 while it trains waits at most one training step, as before. After ``!model``
switched worker 0 to another model, the others (still on the start-up model) serve no more generations
until the daemon restarts, so every picture comes from the model the daemon reports.
"""

from __future__ import annotations

import asyncio
import logging
import threading
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

    @property
    def label(self) -> str:
        return f"{self.index}:{self.device}"


class WorkerPool:
    """The devices of one daemon and the FIFO of free ones (see the module docstring)."""

    def __init__(self, primary: DeviceWorker, primary_device: str) -> None:
        self.slots = [Slot(0, primary_device, primary)]
        self._free: asyncio.Queue[Slot] | None = None
        self.start_model_name: str | None = None

    @property
    def size(self) -> int:
        return len(self.slots)

    def add(self, device: str, model: Any, on_change: Callable[[int, str | None], None] | None = None) -> Slot:
        """A further device whose ``model`` is loaded (call before serving)."""
        worker = DeviceWorker(on_change=on_change, name=f"sdrepl-device-{len(self.slots)}")
        slot = Slot(len(self.slots), device, worker, model)
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

        Worker 0 uses ``primary_model`` (the residency's, held by the caller); another worker serves only
        while ``primary_model`` is still the model it loaded at start-up."""
        queue = self._queue()
        while True:
            slot = await self._acquire(cancel_event)
            if slot.index == 0 or getattr(primary_model, "name", None) == self.start_model_name:
                break
            # !model switched worker 0: this worker's model is not the daemon's any more; retire it
            # (not put back; worker 0 always is, so a request never waits forever).
            log.warning("worker %s holds the start-up model, not %s; it serves no more generations", slot.label,
                        getattr(primary_model, "name", "?"))
        try:
            model = primary_model if slot.index == 0 else slot.model
            result = await slot.worker.run(lambda: fn(model), cancel_event=cancel_event, label=label)
        finally:
            queue.put_nowait(slot)
        return result, slot

    def discard(self, cancel_event: threading.Event) -> None:
        for slot in self.slots[1:]:
            slot.worker.discard(cancel_event)

    def close(self) -> None:
        for slot in self.slots[1:]:
            slot.worker.close()

    def stop(self, timeout: float) -> bool:
        return all([slot.worker.stop(timeout) for slot in self.slots[1:]])

    def describe(self) -> list[dict[str, Any]]:
        return [{"index": s.index, "device": s.device, "pending": s.worker.pending, "running": s.worker.running}
                for s in self.slots]
