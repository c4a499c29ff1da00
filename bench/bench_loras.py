"""Benchmark of LoRA application: sdrepl's hooks vs diffusers' ``load_lora_weights`` + ``set_adapters``.

    python bench/bench_loras.py [--rank 16] [--threads 2] [--runs 5]

On an SD 1.5-shaped model with random weights on the CPU (UNet and text encoder built from the shipped SD
1.5 configs, no download), two kohya LoRAs A and B (attention, feed-forward and projection layers of the
UNet, attention and MLP of the text encoder: the usual Civitai targets) and a third, C, the same
sequence runs through both routes:

1. **first use** of {A: 0.8, B: 0.6} (sdrepl: index the files + first activation; diffusers: two
   ``load_lora_weights`` + ``set_adapters``),
2. **reuse** of the same set (what every further generation with the same prompt costs),
3. **weight change** A 0.8 -> 0.3,
4. **switch** to {C: 1.0}.

diffusers is measured unfused (``set_adapters`` per request) and fused (``unfuse_lora`` +
``set_adapters`` + ``fuse_lora``: its fast path for inference). Medians of ``--runs`` (first use and switch: one
run each, on fresh adapters). ``--step`` also times one UNet step at 32x32 latents with the set active.
Targets: reuse and weight change >= 10x faster than the diffusers route, no step slower.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def build_model():
    """SD 1.5-shaped UNet + text encoder with random weights, in a pipeline diffusers can load LoRAs into."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdrepl.core.checkpoint_configs import FAMILY_CONFIGS
    from sdrepl.core.tiny import build_tiny

    configs = FAMILY_CONFIGS["sd1"]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config({k: v for k, v in configs["unet"].items() if not k.startswith("_")})
        te = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in configs["text_encoder"].items()
                                             if k not in ("architectures", "model_type")}))
    # Random values drawn once and tiled (drawing 1.2 billion values takes minutes on a busy CPU; the
    # timings measured here do not depend on the values).
    base = torch.randn(1 << 22, generator=torch.Generator().manual_seed(0)) * 0.02
    for module in (unet, te):
        module.to_empty(device="cpu")
        with torch.no_grad():
            for p in module.parameters():
                flat = p.view(-1)
                for i in range(0, flat.numel(), base.numel()):
                    flat[i:i + base.numel()].copy_(base[: min(base.numel(), flat.numel() - i)])
        module.eval().requires_grad_(False)
    tiny = build_tiny("tiny")
    pipe = StableDiffusionPipeline(vae=tiny.vae, text_encoder=te, tokenizer=tiny.tokenizer, unet=unet,
                                   scheduler=tiny.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe


def write_lora(path: Path, pipe, rank: int, seed: int) -> int:
    from lora_files import kohya_name
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    targets = [("unet", n, m) for n, m in pipe.unet.named_modules()
               if isinstance(m, torch.nn.Linear) and ".transformer_blocks." in n] + \
              [("unet", n, m) for n, m in pipe.unet.named_modules() if n.endswith((".proj_in", ".proj_out"))] + \
              [("te", n.removeprefix("text_model."), m) for n, m in pipe.text_encoder.named_modules()
               if isinstance(m, torch.nn.Linear) and ("self_attn" in n or ".mlp." in n)]
    for component, name, module in targets:
        w = module.weight
        key = kohya_name(component, name)
        kernel = list(w.shape[2:])
        tensors[f"{key}.lora_down.weight"] = torch.randn([rank, w.shape[1], *kernel], generator=gen) * 0.01
        tensors[f"{key}.lora_up.weight"] = torch.randn([w.shape[0], rank, *([1, 1] if kernel else [])], generator=gen) * 0.01
        tensors[f"{key}.alpha"] = torch.tensor(float(rank) / 2)
    save_file(tensors, str(path))
    return len(targets)


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def median(fn, runs: int) -> float:
    return statistics.median(timed(fn) for _ in range(runs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--step", action="store_true", help="also time one UNet step with the set active")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from sdrepl.core.networks import lora_library, patcher_for, signature_of, wanted

    t0 = time.perf_counter()
    pipe = build_model()
    print(f"SD 1.5-shaped model built in {time.perf_counter() - t0:.1f} s; rank {args.rank}, "
          f"{args.threads} thread(s), medians of {args.runs}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    folder = tmp / "loras"
    folder.mkdir()
    modules = 0
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        modules = write_lora(folder / f"{name}.safetensors", pipe, args.rank, seed)
    print(f"3 LoRAs of {modules} modules each, {(folder / 'a.safetensors').stat().st_size / 2**20:.0f} MiB per file")
    latents = torch.randn(2, 4, 32, 32)
    context = torch.randn(2, 77, 768)

    def unet_step() -> None:
        if not args.step:
            return
        with torch.no_grad():
            pipe.unet(latents, 500, encoder_hidden_states=context)

    base_step = median(unet_step, 2)

    # --- sdrepl -------------------------------------------------------------------------------------
    ours: dict[str, float] = {}
    sig = signature_of(pipe, "sd1")
    lib = lora_library([folder], sig)
    patcher = patcher_for(pipe)

    def first() -> None:
        lib.scan()
        patcher.activate([wanted(lib, lib.get("a"), 0.8, 0.8), wanted(lib, lib.get("b"), 0.6, 0.6)])

    ours["first use"] = timed(first)
    ab = [wanted(lib, lib.get("a"), 0.8, 0.8), wanted(lib, lib.get("b"), 0.6, 0.6)]
    ours["reuse"] = median(lambda: patcher.activate(ab), args.runs)
    ours["step"] = median(unet_step, 2)
    weights = [[wanted(lib, lib.get("a"), w, w), wanted(lib, lib.get("b"), 0.6, 0.6)] for w in (0.3, 0.8)]
    ours["weight change"] = statistics.median(timed(lambda w=w: patcher.activate(w)) for _ in range(args.runs)
                                              for w in weights)
    ours["switch"] = timed(lambda: patcher.activate([wanted(lib, lib.get("c"), 1.0, 1.0)]))
    patcher.clear()
    gc.collect()

    # --- diffusers (unfused, then fused) ------------------------------------------------------------
    theirs: dict[str, float] = {}
    fused: dict[str, float] = {}

    def load_ab() -> None:
        pipe.load_lora_weights(str(folder / "a.safetensors"), adapter_name="a")
        pipe.load_lora_weights(str(folder / "b.safetensors"), adapter_name="b")
        pipe.set_adapters(["a", "b"], [0.8, 0.6])

    theirs["first use"] = timed(load_ab)
    theirs["reuse"] = median(lambda: pipe.set_adapters(["a", "b"], [0.8, 0.6]), args.runs)
    theirs["step"] = median(unet_step, 2)
    theirs["weight change"] = statistics.median(
        timed(lambda w=w: pipe.set_adapters(["a", "b"], [w, 0.6])) for _ in range(args.runs) for w in (0.3, 0.8))

    def refuse(names, weights) -> None:
        pipe.unfuse_lora()
        pipe.set_adapters(names, weights)
        pipe.fuse_lora(adapter_names=names)

    fused["first use"] = theirs["first use"] + timed(lambda: pipe.fuse_lora(adapter_names=["a", "b"]))
    fused["reuse"] = float("nan")  # fused weights need no call for an unchanged set: reuse is unfused's
    fused["step"] = median(unet_step, 2)
    fused["weight change"] = statistics.median(timed(lambda w=w: refuse(["a", "b"], [w, 0.6])) for w in (0.3, 0.8))

    def switch_fused() -> None:
        pipe.unfuse_lora()
        pipe.load_lora_weights(str(folder / "c.safetensors"), adapter_name="c")
        pipe.set_adapters(["c"], [1.0])
        pipe.fuse_lora(adapter_names=["c"])

    fused["switch"] = timed(switch_fused)
    pipe.unfuse_lora()
    pipe.delete_adapters(["c"])

    def switch_unfused() -> None:
        pipe.load_lora_weights(str(folder / "c.safetensors"), adapter_name="c")
        pipe.set_adapters(["c"], [1.0])

    theirs["switch"] = timed(switch_unfused)

    if args.step:
        print(f"\none UNet step (batch 2, 32x32 latents) without LoRA: {base_step * 1000:.0f} ms")
    print(f"{'step':<16}{'sdrepl':>12}{'diffusers':>12}{'fused':>12}{'x unfused':>11}{'x fused':>12}")
    ok = True
    for step in ("first use", "reuse", "weight change", "switch", *(["step"] if args.step else [])):
        a, b, c = ours[step], theirs[step], fused[step]
        best = b if c != c else min(b, c)  # nan: not applicable
        fused_text = f"{'-':>12}{'-':>12}" if c != c else f"{c * 1000:>10.2f}ms{c / a:>11.1f}x"
        print(f"{step:<16}{a * 1000:>10.3f}ms{b * 1000:>10.2f}ms{fused_text[:12]}{b / a:>10.1f}x{fused_text[12:]}")
        if step in ("reuse", "weight change") and best / a < 10:
            ok = False
        if step != "step" and a > best:
            ok = False
    print("\ntargets (reuse and weight change >= 10x the faster diffusers route, no step slower):",
          "met" if ok else "NOT met")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
