"""Model benchmarks: the tiny models' start-up and drawing speed (CPU), and SD 1.5-sized drawing (``--gpu``).

CPU mode (default), per tiny model, measured in-process after the imports (reported separately):
building from scratch into a cold cache (target < 3 s), loading from the cache (< 1 s), loading the same
model from an exported single-file checkpoint (< 1 s), and a 64x64 picture in 4 steps (< 1 s; the median
of several runs after one warm-up). The cache is a fresh temporary folder, so nothing is reused.

``--gpu``: random-weight models with SD 1.5's shapes (UNet 320/640/1280/1280, 2 layers per block, 768-wide
cross attention, VAE 128/256/512/512, 12-layer CLIP text encoder) draw 512x512 in 20 steps in fp16 and
bf16; the table gives seconds per picture, steps per second and peak CUDA memory. Without CUDA it says so
and exits 0. ``--device`` / ``--size`` / ``--steps`` allow a small dry run of the same code elsewhere.

    python bench/bench_models.py            # CPU table
    python bench/bench_models.py --gpu      # SD 1.5-sized, on CUDA
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

Row = tuple[str, str, float, str, str]  # model, what, value, unit, target ("" when none)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def median_of(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm-up: first-call allocations and kernel selection
    return statistics.median(timed(fn)[0] for _ in range(runs))


def print_table(title: str, rows: list[Row]) -> bool | None:
    """Print the rows; a target is ``< X``; returns whether every target was met (None: no targets)."""
    print(f"\n{title}")
    print(f"{'model':<10} {'measurement':<44} {'value':>10}  {'target':<8} ok")
    all_ok: bool | None = None
    for model, what, value, unit, target in rows:
        ok = ""
        if target:
            met = value < float(target.removeprefix("< ").split()[0])
            all_ok = met and all_ok is not False
            ok = "yes" if met else "NO"
        print(f"{model:<10} {what:<44} {value:>8.3f} {unit:<2} {target:<8} {ok}")
    return all_ok


def measure_imports() -> list[Row]:
    """Import times, with the classes themselves (diffusers and transformers import lazily on first use)."""

    def libraries() -> None:
        from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
        from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    t_torch, _ = timed(lambda: __import__("torch"))
    t_libs, _ = timed(libraries)
    t_own, _ = timed(lambda: __import__("sdrepl.core.models"))
    return [("-", "import torch", t_torch, "s", ""), ("-", "import diffusers + transformers classes", t_libs, "s", ""),
            ("-", "import sdrepl.core.models", t_own, "s", "")]


def bench_cpu(runs: int, rows: list[Row]) -> bool | None:
    with tempfile.TemporaryDirectory(prefix="sdrepl-bench-") as cache:
        os.environ["SDREPL_CACHE_DIR"] = cache  # a cold cache: the build below really builds
        return _bench_cpu(runs, rows, Path(cache))


def _bench_cpu(runs: int, rows: list[Row], cache: Path) -> bool | None:
    import diffusers.utils.logging as dlog
    import torch
    import transformers.utils.logging as tlog

    from sdrepl.core import tiny
    from sdrepl.core.checkpoint_export import export_single_file
    from sdrepl.core.models import load_model

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    threads = torch.get_num_threads()
    for name in tiny.TINY_MODELS:
        t_build, _ = timed(lambda name=name: tiny.ensure_tiny_folder(name))
        t_load, model = timed(lambda name=name: load_model(name, device="cpu", dtype="fp32"))
        path = export_single_file(model, cache / f"{name}.safetensors")
        t_single, _ = timed(lambda path=path: load_model(str(path), device="cpu", dtype="fp32"))

        def draw(pipe=model.pipe):
            return pipe("a photo of a tree by monet", num_inference_steps=4, height=64, width=64,
                        generator=torch.Generator().manual_seed(1), output_type="np")

        rows += [(name, "build from scratch into a cold cache", t_build, "s", "< 3"),
                 (name, "load from the cache", t_load, "s", "< 1"),
                 (name, "load an exported single-file checkpoint", t_single, "s", "< 1"),
                 (name, f"64x64 picture, 4 steps (median of {runs})", median_of(draw, runs), "s", "< 1")]
    return print_table(f"CPU, {threads} torch thread(s), a fresh temporary cache", rows)


def sd15_pipeline(device: str, dtype):
    """Random weights with SD 1.5's shapes, built directly on ``device`` (no download, no CPU copy)."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdrepl.core.checkpoint_configs import FAMILY_CONFIGS
    from sdrepl.core.samplers import make_scheduler
    from sdrepl.core.tiny import load_tokenizer

    configs = FAMILY_CONFIGS["sd1"]
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(configs["unet"]).to(dtype).eval()
        vae = AutoencoderKL.from_config(configs["vae"]).to(dtype).eval()
        text = {k: v for k, v in configs["text_encoder"].items() if k not in ("architectures", "model_type")}
        encoder = CLIPTextModel(CLIPTextConfig(**text)).to(dtype).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=load_tokenizer(), unet=unet,
                                   scheduler=make_scheduler("Euler a", None), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench_gpu(device: str, size: int, steps: int, runs: int, dtypes: list[str], rows: list[Row]) -> bool | None:
    import torch

    from sdrepl.core.devices import DTYPES

    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--gpu: no CUDA device here (torch {torch.__version__}); skipped")
        return None
    cuda = device.startswith("cuda")
    label = torch.cuda.get_device_name(device) if cuda else device
    for name in dtypes:
        dtype = DTYPES[name]
        t_build, pipe = timed(lambda dtype=dtype: sd15_pipeline(device, dtype))

        def draw(pipe=pipe):
            with torch.inference_mode():
                pipe("a photo of a tree by monet", num_inference_steps=steps, height=size, width=size,
                     generator=torch.Generator(device).manual_seed(1), output_type="np")
            if cuda:
                torch.cuda.synchronize()

        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        seconds = median_of(draw, runs)
        rows += [("sd15-rand", f"{name}: build random SD 1.5 on {device}", t_build, "s", ""),
                 ("sd15-rand", f"{name}: {size}x{size}, {steps} steps (median of {runs})", seconds, "s", ""),
                 ("sd15-rand", f"{name}: UNet steps per second", steps / seconds, "/s", "")]
        if cuda:
            rows.append(("sd15-rand", f"{name}: peak CUDA memory", torch.cuda.max_memory_allocated() / 2**30,
                         "GB", ""))
        del pipe
        if cuda:
            torch.cuda.empty_cache()
    return print_table(f"SD 1.5-sized random weights on {label}", rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="SD 1.5-sized models at 512x512 on CUDA")
    parser.add_argument("--device", default="cuda", help="--gpu: the device (default cuda)")
    parser.add_argument("--size", type=int, default=512, help="--gpu: picture size (default 512)")
    parser.add_argument("--steps", type=int, default=20, help="--gpu: steps (default 20)")
    parser.add_argument("--dtypes", default="fp16,bf16", help="--gpu: comma-separated dtypes (default fp16,bf16)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs after the warm-up (default 5; --gpu 3)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: torch's choice). On a shared, busy machine 1 is often "
                             "much faster for the tiny models: spinning threads wait on each other")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = measure_imports()
    import diffusers.utils.logging as dlog
    import torch

    dlog.set_verbosity_error()  # "modules that should be kept in float32: []" on every cast

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu:
        runs = 3 if args.runs == 5 else args.runs
        ok = bench_gpu(args.device, args.size, args.steps, runs, args.dtypes.split(","), rows)
    else:
        ok = bench_cpu(args.runs, rows)
    if ok is not None:
        print("\nall targets met" if ok else "\nsome targets missed (see the ok column)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
