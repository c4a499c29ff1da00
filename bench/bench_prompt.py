"""Benchmark of the prompt language: the keystroke budget, conditioning with embeddings, and diffusers' route.

Prints one table. Run: ``python bench/bench_prompt.py [--device cpu|cuda] [--threads N] [--runs N]``.

- budget: ``count_tokens`` of a ~300-token prompt whose tail changes each run (as when typing); target < 2 ms.
- conditioning: ``encode_text`` of a prompt with 4 real embeddings vs a plain prompt of the same token
  count; the splicing should cost nothing measurable (target ratio <= 1.05).
- diffusers: the same 4 files through ``pipe.load_textual_inversion`` (which adds tokens and resizes the
  embedding matrix, so it runs on a second copy of the model) and ``pipe.encode_prompt``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from sdrepl.core.budget import count_tokens
from sdrepl.core.conditioning import encode_text
from sdrepl.core.embedding import SINGLE, Embedding, EmbeddingData
from sdrepl.core.models import load_model
from sdrepl.core.prompt import StaticLookup
from sdrepl.core.tiny import load_tokenizer

SHARED = Path(os.environ.get("SDREPL_SHARED", Path(__file__).resolve().parents[2] / "shared"))
FIXTURES = SHARED / "fixtures" / "embeddings" / "a1111"
FILES = {
    "bad-hands-5": "bad-hands-5.pt",
    "bad-artist": "bad-artist.pt",
    "eyeliner2": "eyeliner2.pt",
    "EasyNegative": "EasyNegative.safetensors",
}
PREFIX = "a portrait of a woman in a garden, "


def read_vectors(path: Path) -> torch.Tensor:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)["emb_params"]
    return torch.load(path, weights_only=True, map_location="cpu")["string_to_param"]["*"]


def read_lookup(folder: Path) -> StaticLookup:
    embeddings = []
    for name, file in FILES.items():
        data = EmbeddingData({SINGLE: read_vectors(folder / file)}, "a1111")
        embeddings.append(Embedding(name, name, folder / file, data, "0" * 64))
    return StaticLookup(embeddings)


def median_ms(fn, runs: int, sync) -> float:
    times = []
    for i in range(runs):
        start = time.perf_counter()
        fn(i)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def bench_budget(lookup: StaticLookup, runs: int) -> list[tuple[str, str]]:
    tokenizer = load_tokenizer()
    prompt = ", ".join(["red cat"] * 95) + ", <EasyNegative> <bad-hands-5> dog"
    start = time.perf_counter()
    budget = count_tokens(prompt, tokenizer, lookup)
    cold = (time.perf_counter() - start) * 1e3
    warm = median_ms(lambda i: count_tokens(prompt + " dog" * (i % 7), tokenizer, lookup), runs, lambda: None)
    return [
        (f"budget {budget.label()} tokens, first call (cold cache)", f"{cold:.3f} ms"),
        (f"budget {budget.label()} tokens, typing (median of {runs})", f"{warm:.3f} ms  (target < 2 ms)"),
    ]


def bench_conditioning(model, lookup: StaticLookup, runs: int, sync) -> tuple[list[tuple[str, str]], int]:
    with_embeddings = PREFIX + " ".join(f"<{name}>" for name in FILES)
    n = count_tokens(with_embeddings, model.tokenizer, lookup).count
    plain = PREFIX + " ".join(["cat"] * (n - count_tokens(PREFIX, model.tokenizer, lookup).count))
    assert count_tokens(plain, model.tokenizer, lookup).count == n
    for _ in range(5):  # warm up
        encode_text(model, with_embeddings, lookup)
        encode_text(model, plain, lookup)
    emb_times, plain_times = [], []
    for _ in range(runs):  # interleaved, so drift hits both alike
        emb_times.append(median_ms(lambda i: encode_text(model, with_embeddings, lookup), 1, sync))
        plain_times.append(median_ms(lambda i: encode_text(model, plain, lookup), 1, sync))
    emb_ms, plain_ms = statistics.median(emb_times), statistics.median(plain_times)
    rows = [
        (f"ours: encode plain prompt ({n} tokens)", f"{plain_ms:.3f} ms"),
        (f"ours: encode with 4 embeddings ({n} tokens)", f"{emb_ms:.3f} ms"),
        ("ours: ratio with / plain", f"{emb_ms / plain_ms:.3f}x  (target <= 1.05)"),
    ]
    return rows, n


def bench_diffusers(args, folder: Path, ours, runs: int, sync) -> list[tuple[str, str]]:
    model = load_model("tiny", device=args.device, dtype=args.dtype)  # a second copy: diffusers changes it
    pipe = model.pipe
    pipe.tokenizer = load_tokenizer()  # a private tokenizer (it gets tokens added), model_max_length 77
    prompt = PREFIX + " ".join(FILES)
    paths = [str(folder / f) for f in FILES.values()]
    start = time.perf_counter()
    pipe.load_textual_inversion(paths, token=list(FILES))
    with torch.no_grad():
        pipe.encode_prompt(prompt, model.device, 1, False)
    sync()
    load_and_encode = (time.perf_counter() - start) * 1e3

    def encode(_i):
        with torch.no_grad():
            pipe.encode_prompt(prompt, model.device, 1, False)

    for _ in range(5):
        encode(0)
    encode_only = median_ms(encode, runs, sync)

    start = time.perf_counter()
    fresh = read_lookup(folder)
    encode_text(ours, PREFIX + " ".join(f"<{n}>" for n in FILES), fresh)
    sync()
    ours_load_and_encode = (time.perf_counter() - start) * 1e3
    return [
        ("diffusers: load_textual_inversion(4 files) + encode_prompt", f"{load_and_encode:.3f} ms"),
        (f"diffusers: encode_prompt only (median of {runs})", f"{encode_only:.3f} ms"),
        ("ours: read the 4 files + encode_text", f"{ours_load_and_encode:.3f} ms"),
        (
            "diffusers: tokenizer size after loading",
            f"{len(pipe.tokenizer)} (ours stays {len(load_tokenizer())})",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1, for stable timings)"
    )
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--fixtures", type=Path, default=FIXTURES)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lookup = read_lookup(args.fixtures)
    ours = load_model("tiny", device=args.device, dtype=args.dtype)
    sync = torch.cuda.synchronize if ours.device.type == "cuda" else (lambda: None)
    rows = bench_budget(lookup, max(args.runs, 1000))
    cond_rows, _ = bench_conditioning(ours, lookup, args.runs, sync)
    rows += cond_rows
    rows += bench_diffusers(args, args.fixtures, ours, args.runs, sync)
    width = max(len(label) for label, _ in rows)
    print(
        f"sdrepl prompt benchmark: tiny model on {ours.device} ({args.dtype}), "
        f"{torch.get_num_threads()} CPU thread(s), torch {torch.__version__}"
    )
    print("-" * (width + 30))
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


if __name__ == "__main__":
    main()
