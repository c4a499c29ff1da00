"""Build LoRA / LyCORIS files for a given model from the key rules of the spec (tests and the benchmark).

Real files of the common kohya and LyCORIS layouts have no small public examples (see
``tests/fixtures/lora/README.md``), so tests write them here: random factors with a fixed seed, for the
modules of the model under test, in the key spelling of each layout.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

ATTN = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
        "attn2.to_out.0")


def unet_attention_modules(pipe) -> list[str]:
    return [n for n, m in pipe.unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(ATTN)]


def te_attention_modules(pipe) -> list[str]:
    """Text-encoder attention projections, without transformers 4's ``text_model.`` prefix."""
    return [n.removeprefix("text_model.") for n, m in pipe.text_encoder.named_modules()
            if isinstance(m, torch.nn.Linear) and "self_attn" in n]


def module(pipe, component: str, path: str) -> torch.nn.Module:
    root = pipe.unet if component == "unet" else pipe.text_encoder
    if component != "unet" and hasattr(root, "text_model"):
        root = root.text_model
    return root.get_submodule(path)


def kohya_name(component: str, path: str) -> str:
    if component == "unet":
        return "lora_unet_" + path.replace(".", "_")
    return "lora_te_text_model_" + path.replace(".", "_")


def lowrank(shape: tuple[int, ...], rank: int, gen: torch.Generator, std: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) for a weight of ``shape`` (linear [out, in] or conv [out, in, kh, kw])."""
    out, inp = shape[0], shape[1]
    kernel = tuple(shape[2:])
    down = torch.randn((rank, inp, *kernel), generator=gen) * std
    up = torch.randn((out, rank, *([1, 1] if kernel else [])), generator=gen) * std
    return down, up


def kohya_file(path: Path, pipe, *, rank: int = 4, alpha: float = 2.0, seed: int = 0, te: bool = True,
               unet: bool = True, convs: list[str] = (), metadata: dict | None = None) -> dict[str, torch.Tensor]:
    """A kohya ``lora_unet_`` / ``lora_te_`` file for the attention projections (+ ``convs``)."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    targets = ([("unet", p) for p in unet_attention_modules(pipe)] if unet else []) + (
        [("te", p) for p in te_attention_modules(pipe)] if te else []) + [("unet", c) for c in convs]
    for component, p in targets:
        weight = module(pipe, component, p).weight
        down, up = lowrank(tuple(weight.shape), rank, gen)
        name = kohya_name(component, p)
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path), metadata=metadata)
    return tensors


def hypernetwork_file(path: Path, widths: tuple[int, ...] = (768,), seed: int = 0, **extra) -> dict:
    """An A1111 hypernetwork ``.pt`` (spec section 3): per width a (k, v) pair of [1, 2, 1] ReLU MLPs."""
    import io

    gen = torch.Generator().manual_seed(seed)

    def mlp(dim: int) -> dict:
        return {"linear.0.weight": torch.randn(dim * 2, dim, generator=gen) * 0.1,
                "linear.0.bias": torch.randn(dim * 2, generator=gen) * 0.1,
                "linear.2.weight": torch.randn(dim, dim * 2, generator=gen) * 0.1,  # index 1 is the ReLU
                "linear.2.bias": torch.randn(dim, generator=gen) * 0.1}

    obj = {w: [mlp(w), mlp(w)] for w in widths}
    obj.update({"layer_structure": [1, 2, 1], "activation_func": "relu", "is_layer_norm": False,
                "use_dropout": False, "activate_output": False, "last_layer_dropout": False, "step": 1234,
                "name": path.stem, "sd_checkpoint": "abcdef", "sd_checkpoint_name": "tiny", **extra})
    buf = io.BytesIO()
    torch.save(obj, buf)
    path.write_bytes(buf.getvalue())
    return obj
