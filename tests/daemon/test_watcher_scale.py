"""The watcher against hostile and busy folders, through a real daemon.

- A FIFO under an embedding's name (also swapped in and out under a name the watcher is reading, so
  that the name is a regular file at the stat and a FIFO at the open) never blocks the watcher: a normal
  file dropped afterwards is loaded, ``reload`` answers, and SIGTERM stops the daemon promptly.
- 2,000 files copied in at once are all loaded within 2 s (batched: a handful of library calls).
- Churn (files created, overwritten and deleted at 25 operations/s, here for 5 s; the 20 s run is
  ``bench/bench_watcher.py --churn-s 20``): ``tokens`` answers within 20 ms (p95) meanwhile, and the
  library matches the folder within 2 s after the churn stops.
- Clients get each change's entries in the event, so the REPL's feed never fetches the whole list.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import statistics
import threading
import time
from pathlib import Path

import pytest
from daemon_testing import EventLog, make_daemon, run
from fixture_paths import A1111

pytestmark = pytest.mark.e2e

SOURCES = [A1111 / "bad-hands-5.pt", A1111 / "EasyNegative.safetensors", A1111 / "bad-artist.pt"]


def added(name: str):
    return lambda e: e["event"] == "embeddings" and name in e["change"]["added"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_under_an_embeddings_name_never_blocks_the_watcher(short_tmp: Path) -> None:
    d = make_daemon(short_tmp).start()
    folder = d.embeddings
    try:
        os.mkfifo(folder / "plain-fifo.pt")  # a FIFO from the start
        stop = threading.Event()

        def swapper() -> None:
            """Swap a FIFO and a regular file under one name as fast as possible (the stat/open race)."""
            data = SOURCES[0].read_bytes()
            n = 0
            while not stop.is_set():
                n += 1
                fifo, regular = folder / f".f{n}", folder / f".r{n}"
                os.mkfifo(fifo)
                os.replace(fifo, folder / "swapped.pt")
                regular.write_bytes(data)
                os.replace(regular, folder / "swapped.pt")
            os.unlink(folder / "swapped.pt")
            os.mkfifo(folder / "swapped.pt")  # and leave a FIFO behind

        thread = threading.Thread(target=swapper, daemon=True)
        thread.start()

        async def scenario() -> None:
            async with d.client() as c:
                events = EventLog(c)
                await asyncio.sleep(0)
                deadline = time.monotonic() + 3.0
                while time.monotonic() < deadline:  # let the watcher chew on the swaps for a while
                    await asyncio.wait_for(c.request("tokens", prompt="a cat"), 5)
                    await asyncio.sleep(0.05)
                stop.set()
                await asyncio.to_thread(thread.join, 10)
                mark = events.mark()
                shutil.copy(SOURCES[1], folder / "after.safetensors")
                await events.wait_for(added("after"), timeout=10, start=mark)
                reply = await asyncio.wait_for(c.request("reload"), 10)
                assert reply["version"] >= 1
                listing = await asyncio.wait_for(c.request("embeddings"), 10)
                names = {e["name"] for e in listing["embeddings"]}
                assert "after" in names and "plain-fifo" not in names

        run(scenario(), timeout=60)
        started = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(10) == 0
        assert time.monotonic() - started < 10
    finally:
        stop.set()
        d.stop()


def copy_many(folder: Path, count: int, prefix: str) -> list[str]:
    names = []
    for i in range(count):
        source = SOURCES[i % len(SOURCES)]
        name = f"{prefix}{i:05d}"
        shutil.copyfile(source, folder / f"{name}{source.suffix}")
        names.append(name)
    return names


def reading_cost(folder: Path) -> float:
    """Seconds this process needs to read and index ``folder`` once (the unavoidable part of loading it)."""
    from sdrepl.core.embedding import SINGLE
    from sdrepl.core.library import EmbeddingLibrary

    started = time.perf_counter()
    EmbeddingLibrary([folder], {SINGLE: 768}).scan()
    return time.perf_counter() - started


@pytest.mark.slow
def test_two_thousand_files_copied_at_once_load_within_two_seconds(short_tmp: Path) -> None:
    """Within 2 s on a machine that reads the files in ~1.2 s; a slower (busy, shared) machine gets the
    same margin over its own reading cost, measured here in this process on the same files."""
    staging = short_tmp / "staging"
    staging.mkdir()
    names = copy_many(staging, 2000, "bulk")
    allowed = max(2.0, 2.0 * reading_cost(staging) / 1.2)
    d = make_daemon(short_tmp).start()
    try:
        async def scenario() -> float:
            async with d.client() as c:
                events = EventLog(c)
                started = time.monotonic()
                # "Copied in at once": the files appear in the folder together (one move of each).
                for entry in os.scandir(staging):
                    os.rename(entry.path, d.embeddings / entry.name)
                seen: set[str] = set()
                index = 0
                while len(seen) < len(names):
                    event = await events.wait_for(lambda e: e["event"] == "embeddings", timeout=10, start=index)
                    index = events.events.index(event) + 1
                    seen.update(event["change"]["added"])
                elapsed = time.monotonic() - started
                assert (await c.request("status"))["embeddings"]["loaded"] == 2000
                return elapsed

        elapsed = run(scenario())
        assert elapsed < allowed, f"2,000 files took {elapsed:.2f} s to load (allowed here: {allowed:.2f} s)"
    finally:
        d.stop()


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


async def tokens_latencies(c, stop: asyncio.Event) -> list[float]:
    """``tokens`` round trips, one every 20 ms, until ``stop``."""
    latencies = []
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.wait_for(c.request("tokens", prompt="a photo of <base00001>, EasyNegative"), 5)
        latencies.append(time.perf_counter() - started)
        await asyncio.sleep(0.02)
    return latencies


async def churn(folder: Path, seconds: float, rate: float, rng: random.Random) -> int:
    """Create, overwrite and delete files at ``rate`` operations/s for ``seconds``; how many operations."""
    live: list[Path] = []
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
        op = rng.random()
        if op < 0.5 or not live:
            source = rng.choice(SOURCES)
            path = folder / f"churn{n:05d}{source.suffix}"
            await asyncio.to_thread(shutil.copyfile, source, path)
            live.append(path)
        elif op < 0.75:
            target = rng.choice(live)
            same_kind = next(s for s in SOURCES if s.suffix == target.suffix)
            await asyncio.to_thread(shutil.copyfile, same_kind, target)
        else:
            live.pop(rng.randrange(len(live))).unlink()
        await asyncio.sleep(1 / rate)
    return n


async def library_matches_folder(c, folder: Path, within: float) -> None:
    deadline = time.monotonic() + within
    expected = {p.stem for p in folder.iterdir()}
    while True:
        have = {e["name"] for e in (await c.request("embeddings"))["embeddings"]}
        if have == expected:
            return
        assert time.monotonic() < deadline, f"library != folder {within} s after the churn: {sorted(have ^ expected)[:10]}"
        await asyncio.sleep(0.05)


@pytest.mark.slow
def test_churn_keeps_tokens_fast_and_the_library_true(short_tmp: Path) -> None:
    """25 operations/s for 5 s on a folder of 500 files (the 20 s run is in bench/bench_watcher.py).

    The target is a 20 ms p95; a machine whose quiet-folder p95 is already high (shared, busy) gets
    twice its own quiet figure, measured first in the same run."""
    d = make_daemon(short_tmp)
    copy_many(d.embeddings, 500, "base")
    d.start()
    try:
        async def scenario() -> tuple[list[float], list[float]]:
            async with d.client() as c:
                stop = asyncio.Event()
                quiet = asyncio.ensure_future(tokens_latencies(c, stop))
                await asyncio.sleep(2.0)
                stop.set()
                baseline = await quiet
                stop.clear()
                busy = asyncio.ensure_future(tokens_latencies(c, stop))
                await churn(d.embeddings, 5.0, 25.0, random.Random(1))
                stop.set()
                latencies = await busy
                await library_matches_folder(c, d.embeddings, 2.0)
                return baseline, latencies

        baseline, latencies = run(scenario(), timeout=120)
        allowed = max(0.020, 2 * p95(baseline))
        assert p95(latencies) < allowed, (f"tokens p95 {p95(latencies) * 1000:.1f} ms during churn (quiet: "
                                          f"{p95(baseline) * 1000:.1f} ms, allowed {allowed * 1000:.1f} ms)")
    finally:
        d.stop()


def test_events_carry_the_change_so_the_repl_never_fetches_the_list(short_tmp: Path) -> None:
    from sdrepl.repl.state import ReplState, StateFeed

    d = make_daemon(short_tmp).start()
    try:
        async def scenario() -> None:
            async with d.client() as c:
                fetched: list[str] = []
                real = c.request

                async def counting(type: str, **params):
                    fetched.append(type)
                    return await real(type, **params)

                c.request = counting  # type: ignore[method-assign]
                events = EventLog(c)
                state = ReplState()
                await StateFeed(c, state).start()
                shutil.copy(SOURCES[0], d.embeddings / "one.pt")
                event = await events.wait_for(added("one"))
                assert [e["name"] for e in event["embeddings"]] == ["one"] and event["removed_paths"] == []
                assert event["embeddings"][0]["path"] == str(d.embeddings / "one.pt")
                mark = events.mark()
                (d.embeddings / "one.pt").unlink()
                event = await events.wait_for(lambda e: e["event"] == "embeddings" and e["change"]["removed"],
                                              start=mark)
                assert event["removed_paths"] == [str(d.embeddings / "one.pt")]
                shutil.copy(SOURCES[1], d.embeddings / "two.safetensors")
                await events.wait_for(added("two"), start=mark)
                assert fetched.count("embeddings") == 1  # the start only
                listing = await real("embeddings")
                assert state.embeddings == listing["embeddings"] and state.library_version == listing["version"]

        run(scenario())
    finally:
        d.stop()
