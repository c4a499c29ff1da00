"""Admission: a bound on the daemon's queue of generations and a request rate per remote connection.

Ollama's anchor (``OLLAMA_MAX_QUEUE``, a 503 when full): a daemon shared by a team or fed by a scripted
batch must say "queue full" at once instead of growing without bound, and must lose nothing it already
took. The server asks :meth:`Admission.enter` before it starts a queued request (``generate``) and
calls :meth:`Admission.leave` when that request has replied; a request refused here never started.
A remote connection also gets a token bucket of requests per second (:class:`RateLimit`), so one
client cannot flood the daemon's event loop for everyone else.
"""

from __future__ import annotations

import time

from sdrepl.core.errors import SdreplError

#: Requests that wait for the device and count against ``--max-queue``.
QUEUED_TYPES = frozenset({"generate"})
#: Default ``--max-queue``: generations that may wait behind the running one(s) (Ollama's default is 512).
DEFAULT_MAX_QUEUE = 512
#: A remote connection's sustained requests per second, and the burst it may send at once.
REMOTE_RATE = 50.0
REMOTE_BURST = 200


class QueueFull(SdreplError):
    """The daemon's generation queue is at its bound (``--max-queue``); nothing was queued: retry later."""


class RateLimited(SdreplError):
    """A remote connection sent requests faster than the daemon serves one client; slow down."""


class Admission:
    """Counts admitted queued requests (running and waiting) against ``max_queue`` + the workers."""

    def __init__(self, max_queue: int, workers: int = 1) -> None:
        self.max_queue = max_queue
        self.workers = workers
        self.admitted = 0

    def enter(self, type_name: str) -> bool:
        """Admit one request (True), or raise :class:`QueueFull`; False: the type does not queue."""
        if type_name not in QUEUED_TYPES:
            return False
        if self.admitted >= self.max_queue + self.workers:
            waiting = self.admitted - self.workers
            raise QueueFull(f"{type_name}: the daemon's queue is full ({waiting} waiting, --max-queue "
                            f"{self.max_queue}); nothing was queued: try again when a generation finishes")
        self.admitted += 1
        return True

    def leave(self) -> None:
        self.admitted = max(0, self.admitted - 1)


class RateLimit:
    """A token bucket: ``rate`` requests per second, ``burst`` at once."""

    def __init__(self, rate: float = REMOTE_RATE, burst: int = REMOTE_BURST) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            raise RateLimited(f"more than {self.rate:g} requests per second on this connection (bursts of "
                              f"{self.burst:g}); this request was not run: slow down")
        self.tokens -= 1.0
