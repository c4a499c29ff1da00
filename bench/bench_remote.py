"""Benchmark of remote clients and several workers (issue 16), loopback only.

    python bench/bench_remote.py [--runs 7] [--threads 1] [--jobs 8]

- **remote round trip**: one daemon (``tiny``, CPU) listening on its Unix socket and on
  ``--listen 127.0.0.1:0``; the same 64x64, 4-step generation (same seed) requested alternately over the
  socket and over TLS, medians of ``--runs`` runs each; the TLS figure includes fetching the picture back
  (the ``picture`` request) and writing it into a local outputs folder, i.e. what a remote REPL does.
  Target: ratio <= 1.05.
- **two workers**: ``--jobs`` concurrent generations through a daemon with ``--device cpu`` and then
  one with ``--device cpu,cpu``; wall time and pictures per second, ratio two/one. Each worker thread
  runs torch with ``--threads`` threads, so the two-worker daemon uses up to twice the cores (that is
  the point: on a machine with N GPUs, each GPU is a worker).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_daemon import spawn_daemon, stop_daemon  # noqa: E402 - the benchmarks' one daemon launcher

GEN = {"prompt": "a lighthouse at dusk", "steps": 4, "width": 64, "height": 64, "seed": 1234}


def folders(root: Path) -> list[str]:
    """The LoRA and hypernetwork folders of this benchmark's daemon (empty), and its dtype."""
    return ["--loras", str(root / "loras"), "--hypernetworks", str(root / "hn"), "--dtype", "fp32"]


async def round_trips(socket: Path, endpoint: object, runs: int, local: Path) -> tuple[list[float], list[float]]:
    from sdrepl.daemon.client import DaemonClient
    from sdrepl.repl.remote_pictures import bring_home

    unix = await DaemonClient.connect(socket, events=False)
    tls = await DaemonClient.connect(endpoint, events=False, timeout=10.0)
    try:
        for client in (unix, tls):  # warm-up (first-use costs on both paths)
            await client.request("generate", **GEN)
        times_unix, times_tls = [], []
        for _ in range(runs):
            started = time.perf_counter()
            await unix.request("generate", **GEN)
            times_unix.append(time.perf_counter() - started)
            started = time.perf_counter()
            result = await tls.request("generate", **GEN)
            await bring_home(tls, result, local)
            times_tls.append(time.perf_counter() - started)
        return times_unix, times_tls
    finally:
        await unix.close()
        await tls.close()


async def throughput(socket: Path, jobs: int, size: int) -> float:
    from sdrepl.daemon.client import DaemonClient

    async with await DaemonClient.connect(socket, events=False) as client:
        job = {**GEN, "width": size, "height": size}
        await asyncio.gather(client.request("generate", **job), client.request("generate", **job))  # warm both
        started = time.perf_counter()
        await asyncio.gather(*(client.request("generate", **{**job, "seed": i}) for i in range(jobs)))
        return time.perf_counter() - started


def round_trip(root: Path, env: dict[str, str], args: argparse.Namespace) -> None:
    from sdrepl.daemon.auth import endpoint_from_file

    proc, socket, _ = spawn_daemon(root, env, [*folders(root), "--device", "cpu", "--listen", "127.0.0.1:0"])
    try:
        remote_file = socket.with_name(socket.name + ".remote.json")
        deadline = time.monotonic() + 30
        while not remote_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        endpoint = endpoint_from_file(remote_file)
        unix, tls = asyncio.run(round_trips(socket, endpoint, args.runs, root / "local-outputs"))
    finally:
        stop_daemon(proc)
    mu, mt = statistics.median(unix), statistics.median(tls)
    print(f"generation 64x64, 4 steps, median of {args.runs}: unix socket {mu * 1000:.1f} ms, TLS loopback + "
          f"picture home {mt * 1000:.1f} ms, ratio {mt / mu:.3f} (target <= 1.05)")
    print(json.dumps({"unix_ms": round(mu * 1000, 1), "tls_ms": round(mt * 1000, 1), "ratio": round(mt / mu, 3)}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=128, help="picture size of the throughput part (px)")
    parser.add_argument("--skip-round-trip", action="store_true")
    args = parser.parse_args()

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    root = Path(tempfile.mkdtemp(prefix="sdb-", dir="/tmp"))
    try:
        if not args.skip_round_trip:
            round_trip(root, env, args)
        walls = {}
        for devices in ("cpu", "cpu,cpu"):
            shutil.rmtree(root / "outputs", ignore_errors=True)
            proc, socket, _ = spawn_daemon(root, env, [*folders(root), "--device", devices])
            try:
                walls[devices] = asyncio.run(throughput(socket, args.jobs, args.size))
            finally:
                stop_daemon(proc)
            print(f"--device {devices}: {args.jobs} concurrent {args.size}x{args.size} generations in {walls[devices]:.2f} s "
                  f"({args.jobs / walls[devices]:.2f} pictures/s)")
        print(f"two workers / one: {walls['cpu'] / walls['cpu,cpu']:.2f}x the throughput")
        print(json.dumps({"one_worker_s": round(walls["cpu"], 2), "two_workers_s": round(walls["cpu,cpu"], 2)}))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
