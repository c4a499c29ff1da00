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
import statistics
import sys
import time
from pathlib import Path

import torch

from sdrepl.core.budget import count_tokens
from sdrepl.core.conditioning import encode_text
from sdrepl.core.embedding import SINGLE, Embedding, EmbeddingData
from sdrepl.core.models import load_model
from sdrepl.core.plan_budget import scheduled_prompt_budget
from sdrepl.core.prompt import StaticLookup
from sdrepl.core.tiny import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fixture_paths import A1111 as FIXTURES  # noqa: E402 - the vendored fixtures (SDREPL_SHARED overrides)

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
    # issue 14: the same prompt with editing and alternation (every text of 20 steps counted), and pasted
    # with full-width commas (ftfy normalises each piece before it is tokenized)
    scheduled = "[a|the] " + prompt.replace("red cat", "[red:blue:0.5] cat", 3)
    sched = median_ms(lambda i: scheduled_prompt_budget(scheduled + " dog" * (i % 7), "", tokenizer, lookup,
                                                        steps=20), runs, lambda: None)
    wide = prompt.replace(", ", "，")
    wide_ms = median_ms(lambda i: count_tokens(wide + "，dog" * (i % 7), tokenizer, lookup), runs, lambda: None)
    return [
        (f"budget {budget.label()} tokens, first call (cold cache)", f"{cold:.3f} ms"),
        (f"budget {budget.label()} tokens, typing (median of {runs})", f"{warm:.3f} ms  (target < 2 ms)"),
        ("  same with editing + alternation over 20 steps", f"{sched:.3f} ms  ({sched / warm:.2f}x, target < 2 ms)"),
        ("  same pasted with full-width commas (ftfy)", f"{wide_ms:.3f} ms  ({wide_ms / warm:.2f}x, target < 2 ms)"),
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


def bench_sdxl(args, runs: int, sync) -> list[tuple[str, str]]:
    """tiny-sdxl: our two-encoder conditioning against diffusers' ``StableDiffusionXLPipeline.encode_prompt``
    (same tensors, see tests/core/test_sdxl.py), plain and with a 4-vector clip_l/clip_g pair (diffusers:
    its documented two ``load_textual_inversion`` calls, one per encoder)."""
    from diffusers import StableDiffusionXLPipeline

    from sdrepl.core.conditioning import encode_prompts
    from sdrepl.core.embedding import CLIP_G, CLIP_L, Embedding, EmbeddingData

    xl = load_model("tiny-sdxl", device=args.device, dtype=args.dtype)
    gen = torch.Generator().manual_seed(0)
    pair = {CLIP_L: torch.randn(4, 768, generator=gen) * 0.02, CLIP_G: torch.randn(4, 1280, generator=gen) * 0.02}
    emb = Embedding("pair", "pair", Path("pair.safetensors"), EmbeddingData(pair, "safetensors/sdxl"), "0" * 64)
    lookup = StaticLookup([emb])
    plain = PREFIX + "a cat"
    with_pair = PREFIX + "<pair> cat"

    def ours(text):
        return lambda _i: encode_prompts(xl, text, "", lookup)

    for _ in range(3):
        ours(plain)(0)
        ours(with_pair)(0)
    ours_plain, ours_pair = median_ms(ours(plain), runs, sync), median_ms(ours(with_pair), runs, sync)
    ref = StableDiffusionXLPipeline.from_pretrained(xl.path, local_files_only=True, add_watermarker=False)
    ref.to(xl.device)
    start = time.perf_counter()
    ref.load_textual_inversion(pair[CLIP_G], token="<pair>", text_encoder=ref.text_encoder_2, tokenizer=ref.tokenizer_2)
    ref.load_textual_inversion(pair[CLIP_L], token="<pair>", text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    sync()
    load_ms = (time.perf_counter() - start) * 1e3

    def theirs(text):  # with guidance and no negative prompt: zeros for it, as ours
        def run(_i):
            with torch.no_grad():
                ref.encode_prompt(text, device=xl.device, do_classifier_free_guidance=True)
        return run

    for _ in range(3):
        theirs(plain)(0)
    their_plain = median_ms(theirs(plain), runs, sync)
    their_pair = median_ms(theirs(PREFIX + "<pair> cat"), runs, sync)
    return [
        (f"tiny-sdxl ours: prompt + empty negative, both encoders + pooled (median of {runs})",
         f"{ours_plain:.3f} ms"),
        ("tiny-sdxl diffusers: encode_prompt, same prompt", f"{their_plain:.3f} ms  ({ours_plain / their_plain:.2f}x)"),
        ("tiny-sdxl ours: with a 4-vector clip_l/clip_g pair", f"{ours_pair:.3f} ms  ({ours_pair / ours_plain:.3f}x plain)"),
        ("tiny-sdxl diffusers: two load_textual_inversion calls", f"{load_ms:.3f} ms (then {their_pair:.3f} ms/encode)"),
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
    rows += bench_sdxl(args, min(args.runs, 50), sync)
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
