"""Benchmark of the daemon: live-reload latency, what the daemon adds to a generation, start-up time.

    python bench/bench_daemon.py [--files 100] [--runs 7] [--device cpu] [--threads 1]

Measures, on the built-in ``tiny`` model:

- **reload**: a file closed in the embeddings folder -> the client has the ``embeddings`` event AND a
  ``tokens`` request using the new trigger succeeded (p50/p95 over ``--files`` files; target p95 < 50 ms);
  a file deleted -> ``removed`` event (target < 1 s). For scale: diffusers' ``pipe.load_textual_inversion``
  of one file into the loaded pipeline, and the library's own ``update_path`` of the same file.
- **generation**: a 64x64, 4-step generation through the daemon (client wall time, socket and PNG
  included) vs. the same work in-process (:func:`sdrepl.core.generation.run_generation`: conditioning,
  pipeline, PNG), medians (and minima) of ``--runs`` alternated runs; target ratio <= 1.05. The bare pipeline call
  (no conditioning, no PNG) is shown too.
- **start**: ``sdrepl serve`` spawned -> ``status`` answers (``tiny``, cached build).

``--threads`` sets torch's thread count in both processes (default 1: on a shared machine, OpenMP threads
competing for busy cores make the tiny model many times slower and the comparison meaningless).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from fixture_paths import A1111 as FIXTURES  # noqa: E402 - the vendored fixtures (SDREPL_SHARED overrides)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def spawn_daemon(root: Path, env: dict[str, str], extra: list[str]) -> tuple[subprocess.Popen, Path, float]:
    """Start ``sdrepl serve`` on ``tiny`` with its folders under ``root`` and ``extra`` options (``--device``,
    ``--listen``...); return the process, its socket and seconds until it answered. The one launcher of the
    benchmarks that run a daemon (bench_remote and bench_watcher import it)."""
    from sdrepl.daemon.client import DaemonUnavailable, request_sync

    socket = root / "d.sock"
    args = [sys.executable, "-m", "sdrepl", "serve", "--socket", str(socket), "--model", "tiny", "--embeddings",
            str(root / "embeddings"), "--outputs", str(root / "outputs"), *extra]
    started = time.monotonic()
    with open(root / "daemon.log", "ab") as log:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
    deadline = started + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the daemon exited: {(root / 'daemon.log').read_text()[-2000:]}")
        try:
            if request_sync(socket, "status", timeout=2.0).get("pid") == proc.pid:
                return proc, socket, time.monotonic() - started
        except DaemonUnavailable:
            pass
        time.sleep(0.02)
    proc.kill()
    raise SystemExit("the daemon did not start within 300 s")


def stop_daemon(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def reload_latency(socket: Path, folder: Path, files: int) -> tuple[list[float], list[float], list[float]]:
    """(close -> event, close -> event + tokens ok, delete -> removed event), seconds per file."""
    from sdrepl.daemon.client import DaemonClient

    source = (FIXTURES / "bad-hands-5.pt").read_bytes()
    client = await DaemonClient.connect(socket, client="bench")
    queue: asyncio.Queue = asyncio.Queue()
    client.add_event_listener(lambda e: e.get("event") == "embeddings" and queue.put_nowait((time.monotonic(), e)))

    async def wait_change(name: str, key: str) -> float:
        while True:
            when, event = await asyncio.wait_for(queue.get(), 10)
            if name in event["change"][key]:
                return when

    to_event, usable, deleted = [], [], []
    try:
        for i in range(files):
            name = f"bench-{i:03d}"
            with open(folder / f"{name}.pt", "wb") as fh:
                fh.write(source)
            closed = time.monotonic()
            seen = await wait_change(name, "added")
            await client.request("tokens", prompt=f"a photo of <{name}>")
            to_event.append(seen - closed)
            usable.append(time.monotonic() - closed)
        for i in range(files):
            name = f"bench-{i:03d}"
            (folder / f"{name}.pt").unlink()
            gone = time.monotonic()
            deleted.append(await wait_change(name, "removed") - gone)
    finally:
        await client.close()
    return to_event, usable, deleted


async def daemon_generation(socket: Path) -> float:
    from sdrepl.daemon.client import DaemonClient

    async with await DaemonClient.connect(socket, client="bench", events=False) as client:
        started = time.perf_counter()
        await client.request("generate", prompt="a photo of <bad-hands-5>", seed=42, width=64, height=64, steps=4)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    ns = parser.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=str(ns.threads), MKL_NUM_THREADS=str(ns.threads),
               TOKENIZERS_PARALLELISM="false")
    os.environ.update(OMP_NUM_THREADS=str(ns.threads), TOKENIZERS_PARALLELISM="false")

    import torch

    torch.set_num_threads(ns.threads)
    from sdrepl.core.generation import GenerationJob, run_generation
    from sdrepl.core.library import EmbeddingLibrary
    from sdrepl.core.models import load_model
    from sdrepl.core.outputs import OutputFolder

    root = Path(tempfile.mkdtemp(prefix="sdb-", dir="/tmp"))
    rows: list[tuple[str, str, str, str]] = []
    try:
        (root / "embeddings").mkdir()
        shutil.copy(FIXTURES / "bad-hands-5.pt", root / "embeddings")
        starts = []
        for _ in range(max(ns.starts - 1, 0)):
            proc, _, seconds = spawn_daemon(root, env, ["--device", ns.device])
            starts.append(seconds)
            stop_daemon(proc)
        proc, socket, seconds = spawn_daemon(root, env, ["--device", ns.device])
        starts.append(seconds)
        try:
            to_event, usable, deleted = asyncio.run(reload_latency(socket, root / "embeddings", ns.files))
            # In-process references, loaded while the daemon idles.
            model = load_model("tiny", ns.device, "fp32")
            library = EmbeddingLibrary([root / "embeddings"], model.encoder_widths, model_label=model.label)
            library.scan()
            probe = root / "probe" / "probe-file.pt"
            probe.parent.mkdir()
            ti_times, lib_times = [], []
            for i in range(5):
                shutil.copy(FIXTURES / "bad-artist.pt", probe)
                t = time.perf_counter()
                model.pipe.load_textual_inversion(str(probe), token=f"<probe{i}>")
                ti_times.append(time.perf_counter() - t)
                model.pipe.unload_textual_inversion()
                probe_lib = EmbeddingLibrary([probe.parent], model.encoder_widths, model_label=model.label)
                t = time.perf_counter()
                probe_lib.update_path(probe)
                lib_times.append(time.perf_counter() - t)
            job = GenerationJob("a photo of <bad-hands-5>", "", 4, 7.0, 42, 64, 64, "Euler a", 1, 1)
            outputs = OutputFolder(root / "outputs-inprocess")
            from sdrepl.core.conditioning import encode_prompts
            cond = encode_prompts(model, job.prompt, job.negative, library)
            daemon_runs, local_runs, bare_runs = [], [], []
            asyncio.run(daemon_generation(socket))  # warm both paths once
            run_generation(model, library, job, outputs)
            for _ in range(ns.runs):
                daemon_runs.append(asyncio.run(daemon_generation(socket)))
                t = time.perf_counter()
                run_generation(model, library, job, outputs)
                local_runs.append(time.perf_counter() - t)
                t = time.perf_counter()
                model.pipe(prompt_embeds=cond.prompt_embeds, negative_prompt_embeds=cond.negative_prompt_embeds,
                           num_inference_steps=4, width=64, height=64,
                           generator=torch.Generator("cpu").manual_seed(42))
                bare_runs.append(time.perf_counter() - t)
        finally:
            stop_daemon(proc)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    ms = 1000.0
    p95_usable = percentile(usable, 95)
    rows += [
        ("reload: close -> event, p50 / p95", f"{statistics.median(to_event) * ms:.1f} / "
         f"{percentile(to_event, 95) * ms:.1f} ms", "", ""),
        ("reload: close -> event + tokens ok, p50 / p95", f"{statistics.median(usable) * ms:.1f} / "
         f"{p95_usable * ms:.1f} ms", "p95 < 50 ms", f"{p95_usable * ms / 50:.2f}x of target"),
        ("reload: delete -> removed event, p50 / max", f"{statistics.median(deleted) * ms:.1f} / "
         f"{max(deleted) * ms:.1f} ms", "< 1000 ms", f"{max(deleted) * ms / 1000:.3f}x of target"),
        ("library.update_path of one file (in-process), median", f"{statistics.median(lib_times) * ms:.1f} ms", "",
         ""),
        ("diffusers load_textual_inversion of one file, median", f"{statistics.median(ti_times) * ms:.1f} ms", "",
         f"{statistics.median(ti_times) / statistics.median(lib_times):.1f}x update_path"),
    ]
    d, local, bare = statistics.median(daemon_runs), statistics.median(local_runs), statistics.median(bare_runs)
    dmin, lmin = min(daemon_runs), min(local_runs)
    rows += [
        ("generate 64x64 4 steps via daemon, median / min", f"{d * ms:.1f} / {dmin * ms:.1f} ms", "", ""),
        ("same in-process (conditioning+pipeline+PNG), median / min", f"{local * ms:.1f} / {lmin * ms:.1f} ms",
         "<= 1.05x", f"daemon/in-process {d / local:.3f}x median, {dmin / lmin:.3f}x min"),
        ("bare pipeline call in-process, median", f"{bare * ms:.1f} ms", "", f"daemon/bare {d / bare:.3f}x"),
        ("daemon start -> ready (tiny), median of runs", f"{statistics.median(starts):.2f} s "
         f"({', '.join(f'{s:.2f}' for s in starts)})", "", ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"sdrepl daemon benchmark: device {ns.device}, torch threads {ns.threads}, {ns.files} files, "
          f"{ns.runs} generation runs")
    print(f"{'metric':<{width}}  {'value':<26}  {'target':<12}  ratio")
    for metric, value, target, ratio in rows:
        print(f"{metric:<{width}}  {value:<26}  {target:<12}  {ratio}")


if __name__ == "__main__":
    main()
