"""Keep-alive unloading gives the model's memory back (the start-up model too), and cycles do not leak.

The ``tiny`` model is big enough to see: its text encoder is a real 768-wide CLIP over the 49,408-token
vocabulary (~190 MB of fp32 parameters in all). Memory is read from ``/proc/<pid>/status``, outside the
daemon. glibc keeps part of freed memory for reuse even after ``malloc_trim``, so the first unload gives
back a part (~60 MB here), not all; a daemon that keeps the model gives back nothing. Over reload cycles a
leak shows as steady growth (a cached tokenizer per reload cost ~20 MB a cycle).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from daemon_testing import EventLog, make_daemon, run

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")]

#: What the first unload must give back at least (measured: ~60 MB; nothing when the model is kept).
MIN_FREED_MB = 25.0
#: Allocator noise over reload cycles (measured: ~25 MB); a kept tokenizer alone added ~20 MB per cycle.
MAX_DRIFT_MB = 50.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def is_model(state: str):
    return lambda e: e["event"] == "model" and e["state"] == state


async def _unloaded(c, events: EventLog, start: int = 0) -> None:
    if (await c.request("status"))["state"] != "unloaded":
        await events.wait_for(is_model("unloaded"), timeout=30, start=start)


def test_first_unload_frees_the_start_up_model(short_tmp: Path) -> None:
    d = make_daemon(short_tmp, keep_alive=1.0).start()
    try:
        async def scenario() -> tuple[float, float]:
            async with d.client() as c:
                events = EventLog(c)
                mark = events.mark()
                await c.request("generate", prompt="warm up", seed=1, width=64, height=64, steps=1)
                # Still the start-up model: it was not unloaded before (no model event since we connected).
                assert not [e for e in events.events[mark:] if e["event"] == "model"]
                loaded = rss_mb(d.proc.pid)
                await _unloaded(c, events)
                return loaded, rss_mb(d.proc.pid)

        loaded, unloaded = run(scenario())
        assert loaded - unloaded > MIN_FREED_MB, f"RSS {loaded:.0f} MB loaded -> {unloaded:.0f} MB unloaded"
    finally:
        d.stop()


@pytest.mark.slow
def test_twenty_unload_reload_cycles_stay_flat(short_tmp: Path) -> None:
    d = make_daemon(short_tmp, keep_alive=0.3).start()
    try:
        async def scenario() -> list[float]:
            async with d.client() as c:
                events = EventLog(c)
                samples = []
                for _ in range(21):
                    await _unloaded(c, events, events.mark())
                    await c.request("generate", prompt="wake up", seed=1, width=64, height=64, steps=1)
                    samples.append(rss_mb(d.proc.pid))  # just reloaded and used
                return samples

        samples = run(scenario(), timeout=600)
        # The first cycle warms the allocator up; from the second on the figure stays within the noise.
        assert max(samples[2:]) - samples[1] < MAX_DRIFT_MB, f"RSS after each reload (MB): {[round(s) for s in samples]}"
    finally:
        d.stop()
