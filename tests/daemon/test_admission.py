"""Units of daemon/admission.py: the queue bound and a remote connection's request rate."""

from __future__ import annotations

import pytest

from sdrepl.daemon.admission import Admission, QueueFull, RateLimit, RateLimited


def test_bound_counts_running_and_waiting() -> None:
    gate = Admission(max_queue=2, workers=1)
    assert [gate.enter("generate") for _ in range(3)] == [True, True, True]
    with pytest.raises(QueueFull, match="2 waiting, --max-queue 2"):
        gate.enter("generate")
    assert gate.enter("status") is False  # control requests never queue
    gate.leave()
    assert gate.enter("generate") is True


def test_two_workers_admit_two_running() -> None:
    gate = Admission(max_queue=0, workers=2)
    assert gate.enter("generate") and gate.enter("generate")
    with pytest.raises(QueueFull):
        gate.enter("generate")


def test_rate_limit_refuses_a_flood_then_recovers(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr("sdrepl.daemon.admission.time.monotonic", lambda: clock[0])
    limit = RateLimit(rate=10.0, burst=5)
    for _ in range(5):
        limit.take()
    with pytest.raises(RateLimited):
        limit.take()
    clock[0] += 0.15  # one request's worth of tokens (and a half)
    limit.take()
    with pytest.raises(RateLimited):
        limit.take()
