"""Benchmark of live reload at scale: a big folder filling, a folder copied in at once, churn (issue 10).

Run: ``python bench/bench_watcher.py [--fill 10000] [--gap-ms 2] [--bulk 2000] [--churn-s 20] [--rate 25]``.
Every figure is printed with its target and the ratio to it; a real ``sdrepl serve`` (``tiny``, CPU) is
measured from a client, as a user's REPL sees it.

- **fill**: ``--fill`` files are written into the embeddings folder ``--gap-ms`` apart by a writer thread
  while, every 0.25 s, a probe file is dropped and timed from its close until the client has the
  ``embeddings`` event naming it AND a ``tokens`` request using it succeeded. p50/p95 of the probes;
  target p95 < 50 ms. Also: how long after the last write every file was loaded.
- **bulk**: ``--bulk`` files moved into the folder at once; seconds until all are loaded; target < 2 s.
  The reference is this process reading the same files into a library (the work no batching can save).
- **churn**: ``--rate`` operations/s (create, overwrite, delete) for ``--churn-s`` seconds on the folder
  left by bulk; ``tokens`` round trips every 20 ms meanwhile (p95 target < 20 ms; the same requests
  with a quiet folder first, as reference), and seconds after the churn until the library matches the
  folder (target < 2 s).

The files are copies of three real embeddings (two A1111 ``.pt``, one ``.safetensors``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from bench_daemon import spawn_daemon, stop_daemon  # noqa: E402 - the benchmarks' one daemon launcher
from fixture_paths import A1111  # noqa: E402

SOURCES = [A1111 / "bad-hands-5.pt", A1111 / "EasyNegative.safetensors", A1111 / "bad-artist.pt"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


class Added:
    """Names seen in ``embeddings`` events, and when."""

    def __init__(self, client) -> None:
        self.when: dict[str, float] = {}
        self.changed = asyncio.Event()
        client.add_event_listener(self._on_event)

    def _on_event(self, event: dict) -> None:
        if event.get("event") == "embeddings":
            now = time.monotonic()
            for name in event["change"]["added"]:
                self.when.setdefault(name, now)
            for name in event["change"]["removed"]:
                self.when.pop(name, None)
            self.changed.set()

    async def wait(self, name: str, timeout: float = 120.0) -> float:
        deadline = time.monotonic() + timeout
        while name not in self.when:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), max(deadline - time.monotonic(), 0.001))
        return self.when[name]


def write_files(folder: Path, count: int, gap: float, prefix: str, done: threading.Event) -> None:
    data = [(s.suffix, s.read_bytes()) for s in SOURCES]
    next_at = time.monotonic()
    for i in range(count):
        suffix, content = data[i % len(data)]
        with open(folder / f"{prefix}{i:05d}{suffix}", "wb") as fh:
            fh.write(content)
        next_at += gap
        pause = next_at - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    done.set()


async def fill(socket: Path, folder: Path, count: int, gap: float) -> dict[str, float]:
    from sdrepl.daemon.client import DaemonClient

    async with await DaemonClient.connect(socket, client="bench") as client:
        added = Added(client)
        done = threading.Event()
        writer = threading.Thread(target=write_files, args=(folder, count, gap, "fill", done), daemon=True)
        started = time.monotonic()
        writer.start()
        probes: list[float] = []
        n = 0
        probe_data = SOURCES[1].read_bytes()
        while not done.is_set():
            n += 1
            name = f"probe{n:04d}"
            with open(folder / f"{name}.safetensors", "wb") as fh:
                fh.write(probe_data)
            closed = time.monotonic()
            await added.wait(name)
            await client.request("tokens", prompt=f"a photo of <{name}>")
            probes.append(time.monotonic() - closed)
            await asyncio.sleep(0.25)
        written = time.monotonic()
        await added.wait(f"fill{count - 1:05d}")
        while sum(1 for k in added.when if k.startswith("fill")) < count:
            added.changed.clear()
            await asyncio.wait_for(added.changed.wait(), 120)
        return {"fill_s": written - started, "probes": len(probes), "p50": statistics.median(probes),
                "p95": percentile(probes, 95), "max": max(probes), "after_last_write": time.monotonic() - written}


def reading_cost(folder: Path) -> float:
    from sdrepl.core.embedding import SINGLE
    from sdrepl.core.library import EmbeddingLibrary

    started = time.perf_counter()
    EmbeddingLibrary([folder], {SINGLE: 768}).scan()
    return time.perf_counter() - started


async def bulk(socket: Path, folder: Path, staging: Path, count: int) -> float:
    from sdrepl.daemon.client import DaemonClient

    async with await DaemonClient.connect(socket, client="bench") as client:
        added = Added(client)
        started = time.monotonic()
        for entry in os.scandir(staging):
            os.rename(entry.path, folder / entry.name)
        await added.wait(f"bulk{count - 1:05d}")
        while sum(1 for k in added.when if k.startswith("bulk")) < count:
            added.changed.clear()
            await asyncio.wait_for(added.changed.wait(), 120)
        return time.monotonic() - started


async def churn(socket: Path, folder: Path, seconds: float, rate: float) -> dict[str, float]:
    from sdrepl.daemon.client import DaemonClient

    async with await DaemonClient.connect(socket, client="bench") as client:
        stop = asyncio.Event()

        async def tokens() -> list[float]:
            out = []
            while not stop.is_set():
                t = time.perf_counter()
                await client.request("tokens", prompt="a photo of <bulk00001>, EasyNegative, bad-artist")
                out.append(time.perf_counter() - t)
                await asyncio.sleep(0.02)
            return out

        quiet_task = asyncio.ensure_future(tokens())
        await asyncio.sleep(3.0)
        stop.set()
        quiet = await quiet_task
        stop.clear()
        busy_task = asyncio.ensure_future(tokens())
        rng = random.Random(0)
        live: list[Path] = []
        ops = 0
        deadline = time.monotonic() + seconds
        next_at = time.monotonic()
        while time.monotonic() < deadline:
            ops += 1
            choice = rng.random()
            if choice < 0.5 or not live:
                source = rng.choice(SOURCES)
                path = folder / f"churn{ops:05d}{source.suffix}"
                await asyncio.to_thread(shutil.copyfile, source, path)
                live.append(path)
            elif choice < 0.75:
                target = rng.choice(live)
                await asyncio.to_thread(shutil.copyfile, next(s for s in SOURCES if s.suffix == target.suffix), target)
            else:
                live.pop(rng.randrange(len(live))).unlink()
            next_at += 1 / rate
            await asyncio.sleep(max(next_at - time.monotonic(), 0))
        stop.set()
        busy = await busy_task
        stopped = time.monotonic()
        expected = {p.stem for p in folder.iterdir()}
        while True:
            listing = await client.request("embeddings")
            if {e["name"] for e in listing["embeddings"]} == expected:
                break
            if time.monotonic() - stopped > 60:
                raise SystemExit("the library did not match the folder 60 s after the churn")
            await asyncio.sleep(0.02)
        return {"ops": ops, "quiet_p95": percentile(quiet, 95), "p50": statistics.median(busy),
                "p95": percentile(busy, 95), "settled": time.monotonic() - stopped, "requests": len(busy)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fill", type=int, default=10_000)
    parser.add_argument("--gap-ms", type=float, default=2.0)
    parser.add_argument("--bulk", type=int, default=2000)
    parser.add_argument("--churn-s", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=25.0)
    ns = parser.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    root = Path(tempfile.mkdtemp(prefix="sdbw-", dir="/tmp"))
    rows: list[tuple[str, str, str, str]] = []
    try:
        # fill: its own daemon, so the folder holds exactly the fill
        (root / "embeddings").mkdir()
        proc, socket, _ = spawn_daemon(root, env, ["--device", "cpu"])
        try:
            f = asyncio.run(fill(socket, root / "embeddings", ns.fill, ns.gap_ms / 1000))
        finally:
            stop_daemon(proc)
        ms = 1000
        rows += [
            (f"fill: {ns.fill} files {ns.gap_ms:g} ms apart ({f['fill_s']:.1f} s), {f['probes']} probes: "
             "close -> event + tokens ok, p50 / p95 / max", f"{f['p50'] * ms:.1f} / {f['p95'] * ms:.1f} / "
             f"{f['max'] * ms:.1f} ms", "p95 < 50 ms", f"{f['p95'] * ms / 50:.2f}"),
            ("fill: every file loaded, after the last write", f"{f['after_last_write']:.2f} s", "", ""),
        ]
        sample = root / "sample"
        sample.mkdir()
        for i in range(300):
            shutil.copyfile(SOURCES[i % len(SOURCES)], sample / f"s{i:04d}{SOURCES[i % len(SOURCES)].suffix}")
        per_file = reading_cost(sample) / 300
        rows.append(("fill: reference, this process reading one such file (keeping up needs < the gap)",
                     f"{per_file * ms:.2f} ms", f"< {ns.gap_ms:g} ms", f"{per_file * ms / ns.gap_ms:.2f}"))
        shutil.rmtree(root / "embeddings")
        (root / "embeddings").mkdir()
        if ns.bulk:  # --bulk 0: the fill part only
            staging = root / "staging"
            staging.mkdir()
            data = [(s.suffix, s.read_bytes()) for s in SOURCES]
            for i in range(ns.bulk):
                suffix, content = data[i % len(data)]
                (staging / f"bulk{i:05d}{suffix}").write_bytes(content)
            reference = reading_cost(staging)
            proc, socket, _ = spawn_daemon(root, env, ["--device", "cpu"])
            try:
                b = asyncio.run(bulk(socket, root / "embeddings", staging, ns.bulk))
                c = asyncio.run(churn(socket, root / "embeddings", ns.churn_s, ns.rate))
            finally:
                stop_daemon(proc)
            rows += [
                (f"bulk: {ns.bulk} files moved in at once -> all loaded", f"{b:.2f} s", "< 2 s", f"{b / 2:.2f}"),
                ("bulk: reference, this process reading the same files", f"{reference:.2f} s", "",
                 f"{b / reference:.2f}x"),
                (f"churn: {c['ops']} operations in {ns.churn_s:g} s on {ns.bulk} files: tokens p50 / p95 "
                 f"({c['requests']} requests)", f"{c['p50'] * ms:.1f} / {c['p95'] * ms:.1f} ms", "p95 < 20 ms",
                 f"{c['p95'] * ms / 20:.2f}"),
                ("churn: reference, tokens p95 with a quiet folder", f"{c['quiet_p95'] * ms:.1f} ms", "",
                 f"{c['p95'] / c['quiet_p95']:.2f}x"),
                ("churn: library matches the folder, after the churn", f"{c['settled']:.2f} s", "< 2 s",
                 f"{c['settled'] / 2:.2f}"),
            ]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>24}  {'target':>12}  ratio")
    for name, value, target, ratio in rows:
        print(f"{name:<{width}}  {value:>24}  {target:>12}  {ratio}")
    print(f"(load average while running: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
