"""The one prepared device benchmark: sdrepl against plain diffusers on the same random-weight model and seed.

    python bench/gpu.py [--out DIR] [--budget-s 450]      # a CUDA machine: SD 1.5- and SDXL-shaped models
    python bench/gpu.py --dry-run                         # the CPU, tiny sizes: every piece runs, in a minute

Measures in one run (each figure against a reference measured in the same run, same model, same seed):

- SD 1.5-shaped (UNet 320/640/1280/1280, CLIP 12 x 768, VAE 128..512; random weights from the configs in
  ``core/checkpoint_configs.py``, nothing downloaded), 512x512, 50 steps, Euler a, batch 1 and 4, fp16 and
  bf16: diffusers' ``StableDiffusionPipeline.__call__`` eager, sdrepl eager, sdrepl ``--compile`` (its
  compile warm-up reported apart). Targets: compiled batch 1 <= 1.0 s and >= 1.3x diffusers eager.
- SDXL-shaped, 1024x1024, 30 steps, batch 1, fp16: diffusers eager, sdrepl eager and compiled (<= 2.0 s).
- The daemon round trip (client wall time, a real ``sdrepl serve`` on the saved model) vs in-process
  :func:`sdrepl.core.generation.run_generation`, 512x512 20 steps.
- Textual-inversion training steps/s and peak memory at batch 1 and 8 (bf16), sdrepl's trainer vs a
  diffusers-example-style loop (``bench/bench_training.py``'s ``reference``). Targets: >= 2x steps/s,
  <= 0.6x peak memory, >= 30% MFU at batch 8.
- MFU: FLOPs counted by ``torch.utils.flop_counter`` on one UNet evaluation / one training step, over the
  device's dense bf16/fp16 peak (a table by device name; unknown devices get no MFU).

Everything runs under a time budget (default 450 s, so the whole run fits 8 minutes on an H100/H200 with
compile warm-ups); what does not fit is recorded as skipped, in priority order. Results go to
``<out>/gpu.json`` and ``<out>/gpu.md``, and one summary table is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"
NEGATIVE = "blurry, low quality"
SEED = 1234
#: Dense (no sparsity) bf16/fp16 tensor-core peak, FLOP/s, by a substring of the device name.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "L40": 181e12,
              "A6000": 155e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12, "4090": 165e12, "3090": 71e12}


@dataclass
class Plan:
    """Sizes of one run: the real ones on CUDA, tiny ones for ``--dry-run``."""

    dry: bool
    device: torch.device
    size: int = 512
    steps: int = 50
    batches: tuple[int, ...] = (1, 4)
    dtypes: tuple[str, ...] = ("fp16", "bf16")
    xl_size: int = 1024
    xl_steps: int = 30
    daemon_steps: int = 20
    train_batches: tuple[int, ...] = (1, 8)
    train_steps: int = 20
    backend: str = "inductor"

    @classmethod
    def make(cls, dry: bool) -> Plan:
        if not dry:
            return cls(False, torch.device("cuda"))
        return cls(True, torch.device("cpu"), size=64, steps=2, batches=(1, 2), dtypes=("fp32",), xl_size=64,
                   xl_steps=2, daemon_steps=2, train_batches=(1, 2), train_steps=2, backend="eager")


@dataclass
class Row:
    section: str
    name: str
    value: float | None
    unit: str
    reference: float | None = None
    ratio: float | None = None
    target: str = ""
    ok: bool | None = None
    note: str = ""


@dataclass
class Report:
    plan: Plan
    budget_s: float
    started: float = field(default_factory=time.monotonic)
    rows: list[Row] = field(default_factory=list)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print(f"  {row.section}: {row.name}: {fmt(row.value)} {row.unit}"
              + (f" (ref {fmt(row.reference)}, {fmt(row.ratio)}x)" if row.reference is not None else "")
              + (f" [{row.note}]" if row.note else ""), flush=True)
        return row

    def skip(self, section: str, name: str, why: str) -> None:
        self.add(Row(section, name, None, "", note=f"skipped: {why}"))


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS.items():
        if key in name:
            return flops
    return None


# --- models ----------------------------------------------------------------------------------------------


def build(family: str, plan: Plan, dtype_name: str) -> Any:
    """A ``LoadedModel`` with random weights: SD 1.5 / SDXL shapes on CUDA, the tiny models for a dry run."""
    from sdrepl.core.devices import resolve_dtype
    from sdrepl.core.models import LoadedModel, load_model

    if plan.dry:
        return load_model("tiny" if family == "sd1" else "tiny-sdxl", device="cpu", dtype="fp32")
    from diffusers import (
        AutoencoderKL,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sdrepl.core.checkpoint_configs import ensure_config_folder
    from sdrepl.core.samplers import make_scheduler

    folder = ensure_config_folder(family)
    dtype = resolve_dtype(dtype_name, plan.device)
    torch.manual_seed(0)
    with torch.device(plan.device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        parts: dict[str, Any] = {"unet": unet, "vae": vae, "text_encoder": text,
                                 "tokenizer": CLIPTokenizer.from_pretrained(folder / "tokenizer"),
                                 "scheduler": make_scheduler("Euler a", None)}
        if family == "sdxl":
            parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(
                folder / "text_encoder_2"))
            parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(**parts, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(plan.device, dtype)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False).eval()
    size = 1024 if family == "sdxl" else 512
    return LoadedModel(f"{family}-random", "bench", family, pipe, plan.device, dtype, size)


def diffusers_call(model: Any, cond: Any, *, steps: int, size: int, batch: int) -> Callable[[], Any]:
    """Plain diffusers on the same components and seeds (a generator per picture, as sdrepl seeds them)."""
    import diffusers

    from sdrepl.core.samplers import make_scheduler

    cls = diffusers.StableDiffusionXLPipeline if model.family == "sdxl" else diffusers.StableDiffusionPipeline
    components = {k: v for k, v in model.pipe.components.items()}
    components["scheduler"] = make_scheduler("Euler a", model.pipe.scheduler.config)
    pipe = cls(**components)
    pipe.set_progress_bar_config(disable=True)
    extra = cond.pipeline_inputs(size, size) if hasattr(cond, "pipeline_inputs") else {}  # SDXL's pooled, sizes

    def run() -> Any:
        generators = [torch.Generator("cpu").manual_seed(SEED + i) for i in range(batch)]
        return pipe(prompt_embeds=cond.prompt_embeds, negative_prompt_embeds=cond.negative_prompt_embeds,
                    num_images_per_prompt=batch, num_inference_steps=steps, guidance_scale=7.0, width=size,
                    height=size, generator=generators if batch > 1 else generators[0], output_type="pil",
                    **extra).images

    return run


def sdrepl_call(model: Any, cond: Any, *, steps: int, size: int, batch: int) -> Callable[[], Any]:
    from sdrepl.core.samplers import make_scheduler, sample_batch

    def run() -> Any:
        return sample_batch(model, cond, steps=steps, cfg=7.0, width=size, height=size,
                            seeds=[SEED + i for i in range(batch)],
                            scheduler=make_scheduler("Euler a", model.pipe.scheduler.config))

    return run


def unet_flops(model: Any, cond: Any, size: int, batch: int) -> float:
    """FLOPs of one UNet evaluation of a CFG batch (2 x ``batch``) at ``size``."""
    from torch.utils.flop_counter import FlopCounterMode

    from sdrepl.core.denoise import StepCond, _batched

    step = StepCond.of(cond, size, size)
    conds = [step.negative, step.positives[0][0]]
    latents = torch.zeros(2 * batch, 4, size // 8, size // 8, device=model.device, dtype=model.dtype)
    embeds, added = _batched(conds, batch, model.device, model.dtype)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.pipe.unet(latents, torch.tensor(500.0, device=model.device), encoder_hidden_states=embeds,
                        added_cond_kwargs=added or None)
    return float(counter.get_total_flops())


# --- sections --------------------------------------------------------------------------------------------


def generation(report: Report, family: str, dtype_name: str, size: int, steps: int, batches: tuple[int, ...],
               *, targets: bool, daemon: bool = False) -> None:
    from sdrepl.core.conditioning import encode_prompts
    from sdrepl.core.prompt import StaticLookup
    from sdrepl.core.speed import apply_speed

    plan = report.plan
    section = f"{'SDXL' if family == 'sdxl' else 'SD 1.5'} {size}px {steps} steps {dtype_name}"
    model = build(family, plan, dtype_name)
    cond = encode_prompts(model, PROMPT, NEGATIVE, StaticLookup())
    peak = peak_flops(plan.device)
    flops = {b: unet_flops(model, cond, size, b) for b in batches}
    diffusers_s: dict[int, float] = {}
    for b in batches:
        run = diffusers_call(model, cond, steps=steps, size=size, batch=b)
        run()  # warm (allocator, cuDNN autotune)
        diffusers_s[b] = report.add(Row(section, f"diffusers eager, batch {b}", timed(run, plan.device), "s")).value
    apply_speed(model.pipe, plan.device, compile=False)  # channels_last, TF32 (after the plain reference)
    for b in batches:
        run = sdrepl_call(model, cond, steps=steps, size=size, batch=b)
        run()
        seconds = timed(run, plan.device)
        report.add(Row(section, f"sdrepl eager, batch {b}", seconds, "s", diffusers_s[b], diffusers_s[b] / seconds,
                       note=_mfu(flops[b], steps, seconds, peak)))
    if daemon:
        daemon_round_trip(report, model)
    if report.left() < (60 if not plan.dry else 5):
        report.skip(section, "sdrepl --compile", "time budget")
        return
    apply_speed(model.pipe, plan.device, compile=True, backend=plan.backend)
    for b in batches:
        if report.left() < (45 if not plan.dry else 2):
            report.skip(section, f"sdrepl --compile, batch {b}", "time budget")
            continue
        run = sdrepl_call(model, cond, steps=steps, size=size, batch=b)
        warm = timed(run, plan.device)
        report.add(Row(section, f"compile warm-up, batch {b}", warm, "s", note="first run at this shape"))
        seconds = timed(run, plan.device)
        target, ok = "", None
        if targets and b == 1 and family == "sd1":
            target, ok = "<= 1.0 s and >= 1.3x", seconds <= 1.0 and diffusers_s[b] / seconds >= 1.3
        elif targets and b == 1 and family == "sdxl":
            target, ok = "<= 2.0 s", seconds <= 2.0
        report.add(Row(section, f"sdrepl --compile, batch {b}", seconds, "s", diffusers_s[b], diffusers_s[b] / seconds,
                       target, ok, _mfu(flops[b], steps, seconds, peak)))
    del model
    torch._dynamo.reset()
    free(plan.device)


def _mfu(flops_per_eval: float, steps: int, seconds: float, peak: float | None) -> str:
    if peak is None or seconds <= 0:
        return ""
    return f"MFU {flops_per_eval * steps / seconds / peak:.1%}"


def daemon_round_trip(report: Report, model: Any) -> None:
    """``generate`` through a real daemon on the same weights vs :func:`run_generation` in-process."""
    from sdrepl.core.generation import GenerationJob, run_generation
    from sdrepl.core.outputs import OutputFolder
    from sdrepl.core.prompt import StaticLookup
    from sdrepl.core.speed import apply_speed
    from sdrepl.daemon.client import DaemonClient

    plan = report.plan
    section = "daemon"
    size, steps = (model.native_size if not plan.dry else 64), plan.daemon_steps
    root = Path(tempfile.mkdtemp(prefix="sdrepl-gpu-bench-"))
    proc = None
    try:
        if plan.dry:
            spec = "tiny"
        else:
            spec = str(root / "model")
            model.pipe.save_pretrained(spec, safe_serialization=True)
        job = GenerationJob(PROMPT, NEGATIVE, steps, 7.0, SEED, size, size, "Euler a", 1, 1)
        outputs = OutputFolder(root / "in-process")
        apply_speed(model.pipe, plan.device, compile=False)
        run_generation(model, StaticLookup(), job, outputs)
        local = timed(lambda: run_generation(model, StaticLookup(), job, outputs), plan.device)
        socket = root / "d.sock"
        args = [sys.executable, "-m", "sdrepl", "serve", "--socket", str(socket), "--model", spec, "--embeddings",
                str(root / "embeddings"), "--outputs", str(root / "outputs"), "--device", plan.device.type,
                "--dtype", "fp32" if plan.dry else {torch.float16: "fp16", torch.bfloat16: "bf16"}[model.dtype]]
        (root / "embeddings").mkdir()
        with open(root / "daemon.log", "ab") as log:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)

        async def remote() -> float:
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the daemon exited: {(root / 'daemon.log').read_text()[-2000:]}")
                try:
                    client = await DaemonClient.connect(socket, client="bench-gpu", events=False)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            async with client:
                params = {"prompt": PROMPT, "negative": NEGATIVE, "seed": SEED, "width": size, "height": size,
                          "steps": steps}
                await client.request("generate", **params)  # warm (loads the model)
                started = time.perf_counter()
                await client.request("generate", **params)
                return time.perf_counter() - started

        through = asyncio.run(remote())
        report.add(Row(section, f"generate {size}px {steps} steps via daemon", through, "s", local, through / local,
                       "<= 1.05x", through / local <= 1.05, "in-process run_generation is the reference"))
    except Exception as exc:  # the rest of the benchmark still runs
        report.skip(section, "daemon round trip", f"{type(exc).__name__}: {exc}")
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def training(report: Report) -> None:
    """TI steps/s and peak memory: sdrepl's trainer vs the diffusers-example-style loop."""
    import bench_training as bt

    plan = report.plan
    dtype_name = "fp32" if plan.dry else "bf16"
    size = 64 if plan.dry else 512
    model = build("sd1", plan, dtype_name)
    peak = peak_flops(plan.device)
    root = Path(tempfile.mkdtemp(prefix="sdrepl-gpu-train-"))
    try:
        data = bt.make_pictures(root / "data", size, count=8)
        for batch in plan.train_batches:
            if report.left() < (30 if not plan.dry else 2):
                report.skip("training", f"batch {batch}", "time budget")
                continue
            section = f"TI training {size}px {dtype_name}"
            figures = {}
            for variant in ("reference", "ours"):
                free(plan.device)
                if plan.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(plan.device)
                base = torch.cuda.memory_allocated(plan.device) if plan.device.type == "cuda" else 0
                if variant == "ours":
                    step, close = bt.ours(model, data, size, batch, root / f"log-{batch}")
                else:
                    step, close = bt.reference(model, data, size, batch, model.dtype)
                rate = bt.timed(step, plan.train_steps, 2 if not plan.dry else 1, plan.device)
                memory = (torch.cuda.max_memory_allocated(plan.device) - base) if plan.device.type == "cuda" else None
                flops = None
                if variant == "ours" and peak is not None:
                    from torch.utils.flop_counter import FlopCounterMode

                    counter = FlopCounterMode(display=False)
                    with counter:
                        step()
                    flops = float(counter.get_total_flops())
                close()
                figures[variant] = (rate, memory, flops)
            (ref_rate, ref_mem, _), (rate, memory, flops) = figures["reference"], figures["ours"]
            report.add(Row(section, f"steps/s, batch {batch}", rate, "steps/s", ref_rate, rate / ref_rate,
                           ">= 2x", rate / ref_rate >= 2.0))
            if memory is not None and ref_mem:
                report.add(Row(section, f"peak memory added, batch {batch}", memory / 2**30, "GiB", ref_mem / 2**30,
                               memory / ref_mem, "<= 0.6x", memory / ref_mem <= 0.6))
            if flops is not None and peak is not None:
                mfu = flops * rate / peak
                report.add(Row(section, f"MFU, batch {batch}", mfu * 100, "%", target=">= 30% at batch 8" if batch == 8
                               else "", ok=(mfu >= 0.30) if batch == 8 else None))
    finally:
        shutil.rmtree(root, ignore_errors=True)
        del model
        free(plan.device)


# --- output ----------------------------------------------------------------------------------------------


def summary(report: Report) -> str:
    lines = ["| section | measurement | sdrepl | reference | ratio | target | met | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report.rows:
        met = "" if r.ok is None else ("yes" if r.ok else "no")
        lines.append(f"| {r.section} | {r.name} | {fmt(r.value)} {r.unit} | {fmt(r.reference)} | "
                     f"{fmt(r.ratio)}{'x' if r.ratio is not None else ''} | {r.target} | {met} | {r.note} |")
    return "\n".join(lines)


def environment(plan: Plan) -> dict[str, Any]:
    import diffusers

    out = {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
           "device": str(plan.device), "dry_run": plan.dry}
    if plan.device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(plan.device)
        out["peak_flops"] = peak_flops(plan.device)
    return out


def run(plan: Plan, budget_s: float, out: Path, sections: list[str]) -> Report:
    report = Report(plan, budget_s)
    torch.manual_seed(0)
    order = [
        ("sd15", lambda: generation(report, "sd1", plan.dtypes[0], plan.size, plan.steps, plan.batches, targets=True,
                                    daemon=True)),
        ("train", lambda: training(report)),
        ("sdxl", lambda: generation(report, "sdxl", plan.dtypes[0], plan.xl_size, plan.xl_steps, (1,),
                                    targets=True)),
        *[(f"sd15-{d}", lambda d=d: generation(report, "sd1", d, plan.size, plan.steps, plan.batches, targets=False))
          for d in plan.dtypes[1:]],
    ]
    for name, fn in order:
        if sections and name not in sections:
            continue
        if report.left() <= 0:
            report.skip(name, "all", "time budget")
            continue
        print(f"== {name} ({report.left():.0f} s left)", flush=True)
        try:
            fn()
        except torch.cuda.OutOfMemoryError as exc:
            report.skip(name, "section", f"out of memory: {exc}")
            free(plan.device)
    out.mkdir(parents=True, exist_ok=True)
    data = {"environment": environment(plan), "elapsed_s": round(time.monotonic() - report.started, 1),
            "rows": [asdict(r) for r in report.rows]}
    (out / "gpu.json").write_text(json.dumps(data, indent=2) + "\n")
    table = summary(report)
    (out / "gpu.md").write_text(f"# sdrepl device benchmark\n\n`{json.dumps(data['environment'])}`, "
                                f"{data['elapsed_s']} s\n\n{table}\n")
    print(table)
    print(f"written: {out / 'gpu.json'}, {out / 'gpu.md'} ({data['elapsed_s']} s)")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="run every piece on the CPU at tiny sizes")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument("--budget-s", type=float, default=None, help="time budget (default 450; dry run 600)")
    parser.add_argument("--only", action="append", default=[], help="sd15, train, sdxl, sd15-bf16 (repeatable)")
    ns = parser.parse_args(argv)
    if not ns.dry_run and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; use --dry-run to check the pieces on the CPU")
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    plan = Plan.make(ns.dry_run)
    with contextlib.suppress(Exception):
        torch.backends.cuda.matmul.allow_tf32 = False  # the plain reference runs first, without sdrepl's switches
    run(plan, ns.budget_s if ns.budget_s is not None else (600.0 if plan.dry else 450.0), ns.out, ns.only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
