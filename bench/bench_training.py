"""Benchmark of textual-inversion training: our trainer against what diffusers' example script does per step.

    python bench/bench_training.py [--steps 30] [--warmup 3] [--threads 1]     # tiny model, CPU
    python bench/bench_training.py --gpu [--steps 20]                          # SD 1.5-shaped, CUDA

Prints one table: steps/s and the peak memory a training loop adds (over what the loaded model and the
prepared data already take), for

- **ours**: :class:`sdrepl.core.training.trainer.Trainer`: latents encoded once, only the ``[N, D]``
  vectors trainable (spliced into the encoder's input), AdamW on those N rows;
- **reference**: per step what ``examples/textual_inversion/textual_inversion.py`` of diffusers does:
  VAE-encode the batch every step, a placeholder token added to the tokenizer, gradient through the WHOLE
  token-embedding matrix (49,409 x 768) with AdamW over all of it, then every other row restored from a
  copy after the step;

and the speed ratio (target >= 2x). On the CPU (``tiny``, 64x64) each loop runs in its own child process
so the memory figures (RSS sampled every 2 ms) do not see each other. The same CPU run also trains an SDXL
pair on ``tiny-sdxl`` with our trainer (both encoders, pooled captions, time ids) and prints its speed
beside ours on ``tiny``: what SDXL's second encoder and added conditioning cost per step. ``--gpu`` builds SD 1.5-shaped
models with random weights (UNet 320/640/1280/1280, 2 layers per block, cross-attention 768, head dim 8;
VAE 128/256/512/512; CLIP text 12 x 768) at 512x512, for batch 1 and 4 in fp16 and bf16, measuring
``torch.cuda.max_memory_allocated``; without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

PLACEHOLDER = "<bench-token>"


# --- the data ----------------------------------------------------------------------------------------


def make_pictures(folder: Path, size: int, count: int = 8) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (size, size), (255, 255, 255))
        color = ((37 * i) % 256, (91 * i + 60) % 256, (151 * i + 120) % 256)
        (ImageDraw.Draw(image).ellipse if i % 2 else ImageDraw.Draw(image).rectangle)(
            [size // 8, size // 8, size * 7 // 8, size * 7 // 8], fill=color)
        image.save(folder / f"{i + 1:06d}-0-a {'round' if i % 2 else 'square'} shape.png")
    return folder


# --- the two loops -------------------------------------------------------------------------------------


def ours(model: Any, data: Path, size: int, batch: int, log_dir: Path) -> tuple[Any, Any]:
    """(step function, cleanup) of our trainer."""
    from sdrepl.core.training.options import TrainOptions
    from sdrepl.core.training.plan import plan_run
    from sdrepl.core.training.trainer import Trainer

    options = TrainOptions.from_params({
        "name": "bench", "data": str(data), "steps": 1_000_000, "batch": batch, "size": f"{size}x{size}",
        "save_every": 0, "preview_every": 0, "seed": 1, "log_dir": str(log_dir), "template": "subject"})
    trainer = Trainer(model, plan_run(model, options, embeddings_dir=log_dir / "embeddings", cwd=log_dir))
    while trainer.prepare_step():
        pass
    return trainer.step, trainer.close


def reference(model: Any, data: Path, size: int, batch: int, dtype: torch.dtype) -> tuple[Any, Any]:
    """(step function, cleanup) doing per step what diffusers' textual_inversion.py does."""
    import copy

    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from sdrepl.core.training.dataset import load_dataset

    pipe, device = model.pipe, model.device
    tokenizer = copy.deepcopy(pipe.tokenizer)
    tokenizer.add_tokens([PLACEHOLDER])
    token_id = tokenizer.convert_tokens_to_ids(PLACEHOLDER)
    text_encoder = copy.deepcopy(pipe.text_encoder).to(device, torch.float32)  # trainable table in fp32
    try:  # the script's plain resize; newer transformers would otherwise fit a covariance to 49k rows first
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    except TypeError:
        text_encoder.resize_token_embeddings(len(tokenizer))
    table = text_encoder.get_input_embeddings()
    with torch.no_grad():
        table.weight[token_id] = table.weight[tokenizer.convert_tokens_to_ids("*")]
    text_encoder.requires_grad_(False)
    table.weight.requires_grad_(True)
    text_encoder.train()
    optimizer = torch.optim.AdamW(table.parameters(), lr=5e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    original = table.weight.data.clone()
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 and device.type == "cuda" else None
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pixels = torch.stack([p.pixels for p in load_dataset(data, (size, size)).pictures])
    ids = tokenizer([f"a photo of a {PLACEHOLDER}"] * batch, padding="max_length", max_length=77,
                    truncation=True, return_tensors="pt").input_ids.to(device)
    keep = torch.ones(len(tokenizer), dtype=torch.bool, device=device)
    keep[token_id] = False
    state = {"i": 0}
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())

    def step() -> None:
        index = [(state["i"] + k) % len(pixels) for k in range(batch)]
        state["i"] += batch
        with autocast:
            latents = pipe.vae.encode(pixels[index].to(device, pipe.vae.dtype)).latent_dist.sample().detach()
            latents = latents * pipe.vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            states = text_encoder(ids)[0].to(pipe.unet.dtype)
            pred = pipe.unet(noisy.to(pipe.unet.dtype), timesteps, states).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            table.weight[keep] = original[keep]

    return step, lambda: None


# --- measuring ---------------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's RSS every 2 ms in a thread; ``peak`` is the highest seen."""

    def __init__(self) -> None:
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def timed(step: Any, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps / (time.perf_counter() - started)


def child(variant: str, steps: int, warmup: int, threads: int, model_name: str = "tiny") -> dict[str, float]:
    """One CPU measurement on ``model_name`` in this (child) process."""
    import gc

    from sdrepl.core.models import load_model

    torch.set_num_threads(threads)
    model = load_model(model_name, device="cpu", dtype="fp32")
    with tempfile.TemporaryDirectory() as tmp:
        data = make_pictures(Path(tmp) / "data", 64)
        step, close = (ours(model, data, 64, 1, Path(tmp) / "log") if variant == "ours"
                       else reference(model, data, 64, 1, torch.float32))
        step()  # first step: lazy allocations (optimizer state, autograd buffers) belong to the loop
        gc.collect()
        baseline = rss_bytes()
        with PeakRSS() as peak:
            rate = timed(step, steps, warmup, model.device)
        close()
    return {"steps_s": rate, "peak_mb": (peak.peak - baseline) / 2**20}


def run_cpu(args: argparse.Namespace) -> None:
    results = {}
    for variant, model_name in (("ours", "tiny"), ("reference", "tiny"), ("ours", "tiny-sdxl")):
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
        done = subprocess.run([sys.executable, __file__, "--child", variant, "--steps", str(args.steps),
                               "--warmup", str(args.warmup), "--threads", str(args.threads),
                               "--child-model", model_name], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            sys.exit(f"the {variant} run on {model_name} failed:\n{done.stderr[-3000:]}")
        results[variant, model_name] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"textual-inversion training, tiny model on the CPU, 64x64, batch 1, {args.steps} timed steps, "
          f"torch threads {args.threads}")
    table([("cpu", "fp32", 1, results["ours", "tiny"], results["reference", "tiny"])])
    xl, sd1 = results["ours", "tiny-sdxl"], results["ours", "tiny"]
    print(f"\nSDXL pair (clip_l + clip_g) on tiny-sdxl, same settings, our trainer: {xl['steps_s']:.2f} it/s, "
          f"peak {xl['peak_mb']:.1f} MiB added; {xl['steps_s'] / sd1['steps_s']:.2f}x the speed of tiny (SD 1.x)")


def table(rows: list[tuple[str, str, int, dict, dict]]) -> None:
    print(f"{'device':<6} {'prec':<5} {'batch':>5} | {'ours it/s':>10} {'ref it/s':>9} {'speed-up':>9} | "
          f"{'ours peak MiB':>13} {'ref peak MiB':>12}")
    for device, precision, batch, mine, ref in rows:
        ratio = mine["steps_s"] / ref["steps_s"]
        flag = "" if ratio >= 2 else "  (below the 2x target)"
        print(f"{device:<6} {precision:<5} {batch:>5} | {mine['steps_s']:>10.2f} {ref['steps_s']:>9.2f} "
              f"{ratio:>8.2f}x | {mine['peak_mb']:>13.1f} {ref['peak_mb']:>12.1f}{flag}")


# --- GPU ---------------------------------------------------------------------------------------------


def sd15_random(device: torch.device, dtype: torch.dtype) -> Any:
    """An SD 1.5-shaped pipeline with random weights, as a LoadedModel (nothing is downloaded)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdrepl.core.models import LoadedModel
    from sdrepl.core.samplers import make_scheduler
    from sdrepl.core.tiny import load_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                                cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
                                        pad_token_id=49407))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=load_tokenizer(), unet=unet,
                                   scheduler=make_scheduler("Euler a", None), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device, dtype)
    for module in (unet, vae, text):
        module.requires_grad_(False).eval()
    return LoadedModel("sd15-random", "bench", "sd1", pipe, device, dtype, 512)


def gpu_measure(make: Any, steps: int, warmup: int, device: torch.device) -> dict[str, float]:
    import gc

    step, close = make()
    step()
    gc.collect()
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    rate = timed(step, steps, warmup, device)
    peak = torch.cuda.max_memory_allocated() - baseline
    close()
    del step, close
    gc.collect()
    torch.cuda.empty_cache()
    return {"steps_s": rate, "peak_mb": peak / 2**20}


def run_gpu(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        print("--gpu: no CUDA device here (torch " + torch.__version__ + "); nothing measured. Run it on a "
              "machine with an NVIDIA GPU, or leave out --gpu for the CPU comparison on tiny.")
        return
    device = torch.device("cuda")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_pictures(Path(tmp) / "data", 512)
        for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            model = sd15_random(device, dtype)
            for batch in (1, 4):
                log_dir = Path(tmp) / f"log-{name}-{batch}"
                mine = gpu_measure(lambda m=model, b=batch, d=log_dir: ours(m, data, 512, b, d), args.steps,
                                   args.warmup, device)
                ref = gpu_measure(lambda m=model, b=batch, dt=dtype: reference(m, data, 512, b, dt), args.steps,
                                  args.warmup, device)
                rows.append(("cuda", name, batch, mine, ref))
            del model
            torch.cuda.empty_cache()
    print(f"textual-inversion training, SD 1.5-shaped random weights on {torch.cuda.get_device_name()}, 512x512, "
          f"{args.steps} timed steps")
    table(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (default 1)")
    parser.add_argument("--gpu", action="store_true", help="SD 1.5-shaped models on CUDA instead of tiny")
    parser.add_argument("--child", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--child-model", default="tiny", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.warmup, args.threads, args.child_model)))
    elif args.gpu:
        run_gpu(args)
    else:
        run_cpu(args)


if __name__ == "__main__":
    main()
