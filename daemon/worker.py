"""The device worker: one thread owns the model and the accelerator; everything that touches them queues here.

Why one thread: CUDA/MPS work from several threads at once gains nothing (the device serialises it) and
makes memory use unpredictable; one owner thread also means the pipeline's mutable state (its scheduler)
is never shared. The event loop stays free for control messages (``cancel``, ``status``, ``shutdown``),
which therefore never wait behind a long generation.

Foreground items (generations, conditioning, model load/unload) run first-in first-out. A background job
(a training run) advances one ``run_step()`` at a time, and before every step all pending foreground items
run, so a generation started during training waits for at most one training step.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from sdrepl.daemon.protocol import Busy, Cancelled

log = logging.getLogger(__name__)
T = TypeVar("T")


class BackgroundJob(Protocol):
    def run_step(self) -> bool:
        """One unit of device work (a training step); return False when the job is finished."""
        ...


@dataclass
class _Item:
    fn: Callable[[], object]
    future: concurrent.futures.Future
    cancel_event: threading.Event | None
    label: str
    abandoned: bool = field(default=False)


class DeviceWorker:
    """A thread running device work; see the module docstring for the scheduling rule."""

    def __init__(self, on_change: Callable[[int, str | None], None] | None = None,
                 name: str = "sdrepl-device") -> None:
        self._queue: collections.deque[_Item] = collections.deque()
        self._cond = threading.Condition()
        self._background: BackgroundJob | None = None
        self._current: _Item | None = None
        self._stopping = False
        self._on_change = on_change
        self._last_state: tuple[int, str | None] = (0, None)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        #: The device thread's id, so code can assert it runs there (and avoid queueing onto itself).
        self.thread_id: int | None = None

    # --- control (any thread) -------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Refuse new work, fail what is queued with Cancelled, wait for the running item; True if it ended."""
        self.close()
        if self._thread.is_alive() and threading.get_ident() != self.thread_id:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def close(self) -> None:
        """Refuse new work and fail what is queued with Cancelled, at once; the running item goes on.

        Shutdown calls this first, so that nothing queued starts while the rest of the shutdown runs.
        """
        with self._cond:
            self._stopping = True
            dropped = list(self._queue)
            self._queue.clear()
            self._background = None
            self._cond.notify_all()
        for item in dropped:
            _fail(item.future, Cancelled("the daemon is shutting down; the request was not started"))

    @property
    def pending(self) -> int:
        """Foreground items waiting to start."""
        with self._cond:
            return len(self._queue)

    @property
    def running(self) -> str | None:
        """Label of the foreground item running now, else of the background job, else None."""
        with self._cond:
            return self._running_label()

    @property
    def background(self) -> BackgroundJob | None:
        return self._background

    @property
    def ahead(self) -> int:
        """Foreground items a new item would wait behind: the queued ones and the one running (not training)."""
        with self._cond:
            return len(self._queue) + (self._current is not None)

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._queue and self._current is None and self._background is None

    def set_background(self, job: BackgroundJob | None) -> None:
        """Install (or clear with None) the background job; at most one at a time."""
        with self._cond:
            self._background = job
            self._cond.notify_all()
        self._changed()

    def submit(self, fn: Callable[[], T], *, cancel_event: threading.Event | None = None,
               label: str = "") -> concurrent.futures.Future:
        """Queue ``fn`` from any thread; the future fails with Cancelled if cancelled before it starts."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                raise Busy("the daemon is shutting down and takes no new work")
            self._queue.append(_Item(fn, future, cancel_event, label or getattr(fn, "__name__", "work")))
            self._cond.notify_all()
        self._changed()
        return future

    async def run(self, fn: Callable[[], T], *, cancel_event: threading.Event | None = None,
                  label: str = "") -> T:
        """Run ``fn`` on the device thread and return its result (or raise its exception).

        Raises :class:`Cancelled` when ``cancel_event`` is set before ``fn`` starts; a running ``fn``
        checks the event itself (generation does, at every step). If the awaiting task is cancelled (its
        client went away), a queued item is dropped.
        """
        if cancel_event is not None and cancel_event.is_set():
            raise Cancelled("the request was cancelled before it started")
        future = self.submit(fn, cancel_event=cancel_event, label=label)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            self._abandon(future)
            raise

    def discard(self, cancel_event: threading.Event) -> int:
        """Drop queued items carrying ``cancel_event`` (their futures fail with Cancelled); how many."""
        with self._cond:
            dropped = [item for item in self._queue if item.cancel_event is cancel_event]
            for item in dropped:
                self._queue.remove(item)
        for item in dropped:
            _fail(item.future, Cancelled("the request was cancelled before it started"))
        if dropped:
            self._changed()
        return len(dropped)

    # --- the device thread ------------------------------------------------------------------------

    def _abandon(self, future: concurrent.futures.Future) -> None:
        with self._cond:
            for item in list(self._queue):
                if item.future is future:
                    self._queue.remove(item)
                    future.cancel()
                    break
        self._changed()

    def _running_label(self) -> str | None:
        if self._current is not None:
            return self._current.label
        if self._background is not None:
            return str(getattr(self._background, "label", "train"))
        return None

    def _changed(self) -> None:
        with self._cond:
            state = (len(self._queue), self._running_label())
            if state == self._last_state:
                return
            self._last_state = state
        if self._on_change is not None:
            try:
                self._on_change(*state)
            except Exception:  # a listener's bug must not stop the device thread
                log.exception("queue listener failed")

    def _loop(self) -> None:
        self.thread_id = threading.get_ident()
        while True:
            item: _Item | None = None
            job: BackgroundJob | None = None
            with self._cond:
                while not self._queue and self._background is None and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                if self._queue:
                    item = self._queue.popleft()
                    self._current = item
                else:
                    job = self._background
            if item is not None:
                self._changed()
                finish = self._run_item(item)
                with self._cond:
                    self._current = None
                self._changed()
                try:
                    finish()  # resolve only now: whoever gets the result sees the worker idle already
                except Exception:  # never let one item's bookkeeping kill the device thread
                    log.exception("device worker: cannot deliver the outcome of %s", item.label)
            elif job is not None:
                self._run_background(job)

    def _run_item(self, item: _Item) -> Callable[[], None]:
        """Run an item; return the call that hands its outcome to the awaiting task."""
        future = item.future
        if item.cancel_event is not None and item.cancel_event.is_set():
            return lambda: _fail(future, Cancelled("the request was cancelled before it started"))
        if not future.set_running_or_notify_cancel():
            return lambda: None  # abandoned by its awaiting task
        try:
            result = item.fn()
        except BaseException as exc:  # handed to the awaiting task, which replies or logs
            error = exc
            return lambda: _settle(future, error=error)
        return lambda: _settle(future, result=result)

    def _run_background(self, job: BackgroundJob) -> None:
        try:
            more = job.run_step()
        except Exception:
            log.exception("background job %r failed and was dropped", job)
            more = False
        if not more:
            with self._cond:
                if self._background is job:
                    self._background = None
            self._changed()


def _fail(future: concurrent.futures.Future, exc: BaseException) -> None:
    """Fail a future that has not started (no-op if it was cancelled or already settled)."""
    if future.done():
        return
    if future.set_running_or_notify_cancel():
        future.set_exception(exc)


def _settle(future: concurrent.futures.Future, *, result: object = None, error: BaseException | None = None) -> None:
    if future.done():  # cancelled by its awaiting task meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
