"""Benchmark of the embedding library: indexing 1,000 files, against diffusers' ``load_textual_inversion``.

Prints one table. Run: ``python bench/bench_library.py [--files 1000] [--diffusers-max 1000]``.

- The files: ``--files`` small embeddings (1-8 vectors x 768) of mixed formats, a third each: A1111
  ``.pt``, ``emb_params`` ``.safetensors`` and diffusers ``{"<token>": [N, 768]}`` ``.bin``, written to a
  temporary folder (so the OS page cache is warm: "cold" below means a new library with empty caches).
- cold: a new :class:`EmbeddingLibrary` scans the folder (read, validate, sha256 every file); the median
  of ``--runs`` scans, wall clock and this process's CPU time (the CPU time is what to compare on a
  machine shared with other work). Target < 1 s.
- warm: the same library rescans (``!reload``): unchanged files are only stat-ed.
- diffusers: the same files through ``pipe.load_textual_inversion(paths, token=tokens)`` in one batched
  call, into a copy of the tiny pipeline's tokenizer and text encoder. It is timed on 50 and 100 files;
  when the straight line through those two points predicts more than ``--diffusers-max-s`` seconds
  for all files, the full run is skipped and the extrapolated figure is printed, marked as such.
  Target: the library is at least 20x faster.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from sdrepl.core.embedding import SINGLE
from sdrepl.core.formats import write_embedding
from sdrepl.core.library import EmbeddingLibrary

FORMATS = (("pt", ".pt"), ("safetensors", ".safetensors"), ("diffusers", ".bin"))


def make_files(folder: Path, count: int, seed: int = 0) -> list[tuple[Path, str]]:
    """``count`` files of mixed formats; returns (path, trigger) pairs."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    made = []
    for i in range(count):
        fmt, suffix = FORMATS[i % len(FORMATS)]
        name = f"bench-{i:04d}"
        vectors = torch.randn(rng.randint(1, 8), 768, generator=generator)
        made.append((write_embedding(folder / f"{name}{suffix}", {SINGLE: vectors}, fmt, name=name, step=i), name))
    return made


def time_library(folder: Path, expected: int, runs: int) -> dict[str, float]:
    """Cold scans (new library, empty caches): the first in this process, the median wall and CPU time of
    ``runs``; and a warm rescan of the last library."""
    walls, cpus = [], []
    for _ in range(runs):
        lib = EmbeddingLibrary([folder], {SINGLE: 768})
        wall, cpu = time.perf_counter(), time.process_time()
        lib.scan()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        if len(lib.embeddings()) != expected or lib.skipped():
            raise SystemExit(f"library loaded {len(lib.embeddings())} of {expected} files: {lib.skipped()[:3]}")
    start = time.perf_counter()
    lib.scan()
    warm = time.perf_counter() - start
    return {"first": walls[0], "cold": statistics.median(walls), "cpu": statistics.median(cpus), "warm": warm}


def time_diffusers(pipe, files: list[tuple[Path, str]]) -> float:
    """One batched load_textual_inversion of ``files`` into a fresh copy of the tokenizer and text encoder."""
    tokenizer, text_encoder = copy.deepcopy(pipe.tokenizer), copy.deepcopy(pipe.text_encoder)
    paths = [str(path) for path, _ in files]
    tokens = [f"<{name}>" for _, name in files]
    start = time.perf_counter()
    pipe.load_textual_inversion(paths, token=tokens, tokenizer=tokenizer, text_encoder=text_encoder)
    elapsed = time.perf_counter() - start
    added = tokenizer.convert_tokens_to_ids(tokens)
    if tokenizer.unk_token_id in added:
        raise SystemExit("diffusers did not add every token")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3, help="cold scans to take the median of")
    parser.add_argument("--diffusers-max-s", type=float, default=120.0,
                        help="run diffusers on every file only if predicted to take at most this long")
    args = parser.parse_args()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    with tempfile.TemporaryDirectory(prefix="sdrepl-bench-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        files = make_files(folder, args.files)
        made = time.perf_counter() - start
        scans = time_library(folder, args.files, args.runs)
        cold = scans["cold"]

        from sdrepl.core.models import load_model

        pipe = load_model("tiny", device="cpu", dtype="fp32").pipe
        small, large = min(50, args.files), min(100, args.files)
        t_small = time_diffusers(pipe, files[:small])
        t_large = time_diffusers(pipe, files[:large])
        per_file = max((t_large - t_small) / max(large - small, 1), 0.0)
        predicted = t_large + per_file * (args.files - large)
        if args.files <= large:
            diffusers_s, how = t_large, "measured"
        elif predicted <= args.diffusers_max_s:
            diffusers_s, how = time_diffusers(pipe, files), "measured"
        else:
            diffusers_s, how = predicted, f"extrapolated from {small} and {large} files (line through both)"

    n = args.files
    rows = [
        ("write the files (sdrepl writers)", n, made),
        ("library: first cold scan in this process (read, validate, sha256)", n, scans["first"]),
        (f"library: cold scan, median of {args.runs}", n, cold),
        (f"library: cold scan, CPU time of this process, median of {args.runs}", n, scans["cpu"]),
        ("library: warm rescan (stat only)", n, scans["warm"]),
        (f"diffusers load_textual_inversion, {small} files", small, t_small),
        (f"diffusers load_textual_inversion, {large} files", large, t_large),
        (f"diffusers load_textual_inversion, {n} files ({how})", n, diffusers_s),
    ]
    print(f"embedding library benchmark: {n} files (a third each .pt, .safetensors emb_params, diffusers .bin); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"load average while running: {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
          f"on {os.cpu_count()} CPUs")
    print(f"{'step':<78} {'files':>6} {'seconds':>9} {'ms/file':>8}")
    for label, count, seconds in rows:
        print(f"{label:<78} {count:>6} {seconds:>9.3f} {seconds / count * 1e3:>8.3f}")
    ratio = diffusers_s / cold
    print(f"cold library scan {'<' if cold < 1 else '>='} 1 s target: {'PASS' if cold < 1 else 'FAIL'} ({cold:.3f} s)")
    print(f"diffusers / library (cold) = {ratio:.1f}x; target >= 20x: {'PASS' if ratio >= 20 else 'FAIL'}")


if __name__ == "__main__":
    main()
