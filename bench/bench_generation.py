"""CPU figures of the generation and training paths (issue 15's before/after): the same script runs against
any sdrepl tree, so the figures of two versions come from one machine in one sitting.

    python bench/bench_generation.py [--runs 5] [--steps 20] [--threads 1] [--json]
    PYTHONPATH=<an older tree laid out as a package> python bench/bench_generation.py   # the "before"

Measures on ``tiny`` (CPU, fp32, 64x64): :func:`sdrepl.core.generation.run_generation` (conditioning,
sampling, PNG written) for ``n`` = 1 and 4 with Euler a and DPM++ SDE, and textual-inversion training
steps/s (batch 1 and 4). Best of ``--runs``; the thread count is pinned (a shared machine's busy cores
make unpinned CPU figures meaningless).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))


def best_time(fn, runs: int) -> float:
    """The fastest of ``runs`` (after a warm run): on a shared machine the minimum is the least disturbed."""
    fn()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    ns = parser.parse_args()
    import torch

    torch.set_num_threads(ns.threads)
    import bench_training as bt

    from sdrepl.core.generation import GenerationJob, run_generation
    from sdrepl.core.models import load_model
    from sdrepl.core.outputs import OutputFolder
    from sdrepl.core.prompt import StaticLookup

    model = load_model("tiny", device="cpu", dtype="fp32")
    root = Path(tempfile.mkdtemp(prefix="sdrepl-bench-gen-"))
    outputs = OutputFolder(root / "outputs")
    rows: list[tuple[str, float, str]] = []
    for sampler in ("Euler a", "DPM++ SDE"):
        for n in (1, 4):
            job = GenerationJob(prompt="a photo of a tree by monet", negative="blurry", steps=ns.steps, cfg=7.0,
                                seed=42, width=64, height=64, sampler=sampler, n=n, clip_skip=1)
            seconds = best_time(lambda job=job: run_generation(model, StaticLookup(), job, outputs), ns.runs)
            rows.append((f"generate 64px {ns.steps} steps {sampler}, n={n}", seconds / n, "s/picture"))
    data = bt.make_pictures(root / "data", 64, count=8)
    for batch in (1, 4):
        step, close = bt.ours(model, data, 64, batch, root / f"log-{batch}")
        rate = bt.timed(step, ns.train_steps, 3, model.device)
        close()
        rows.append((f"TI training 64px, batch {batch}", rate, "steps/s"))
    if ns.json:
        print(json.dumps({name: value for name, value, _ in rows}))
    else:
        print(f"sdrepl CPU generation/training, {ns.threads} thread(s), {os.environ.get('PYTHONPATH') or 'this tree'}")
        for name, value, unit in rows:
            print(f"{name:<48} {value:8.4f} {unit}")


if __name__ == "__main__":
    main()
