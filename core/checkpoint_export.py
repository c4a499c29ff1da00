"""Writing a diffusers SD 1.x / 2.x / SDXL pipeline as one original-layout (LDM / AUTOMATIC1111) checkpoint.

This is the reverse of diffusers' single-file conversion (``diffusers.loaders.single_file_utils``): the UNet
goes to ``model.diffusion_model.*`` (``input_blocks`` / ``middle_block`` / ``output_blocks``), the VAE to
``first_stage_model.*`` and the text encoder to ``cond_stage_model.transformer.*`` (SD 1.x, Hugging Face
CLIP) or ``cond_stage_model.model.*`` (SD 2.x, OpenCLIP with fused q/k/v); SDXL's two encoders go to
``conditioner.embedders.0.transformer.*`` and ``conditioner.embedders.1.model.*``. The block arithmetic is derived
from the UNet config rather than hard-coded for SD 1.5, so the small ``tiny`` models export too; that is
what lets the tests build a real single-file checkpoint offline and load it back.

Every weight must find a place: an unmapped key is an error, never a silently smaller file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from sdrepl.core.atomic import atomic_writer
from sdrepl.core.errors import ModelError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

_UNET_RESNET = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
                ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."), ("conv_shortcut.", "skip_connection."))
_VAE_ATTENTION = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                  ("to_out.0.", "proj_out."))
_OPEN_CLIP_LAYER = (("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
                    ("mlp.fc2.", "mlp.c_proj."), ("self_attn.out_proj.", "attn.out_proj."))

Tensors = dict[str, torch.Tensor]


def _rename(key: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for old, new in pairs:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _unet_prefixes(config: Mapping[str, Any], has: Callable[[str], bool]) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, LDM prefix, is_resnet) for every block of a UNet2DConditionModel.

    LDM numbers the down path as one flat list: ``input_blocks.0`` is conv_in, then each down block gives
    ``layers_per_block`` entries (resnet ``.0`` + attention ``.1``) and, except the last, one downsampler
    (``.0.op``). The up path gives ``layers_per_block + 1`` entries per block, its upsampler riding on the
    last entry after the resnet (``.1``) or after the attention (``.2``).
    """
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ModelError(f"cannot export a UNet with per-block layers_per_block={lpb!r}; expected one number")
    blocks = len(config["block_out_channels"])
    out: list[tuple[str, str, bool]] = [
        ("time_embedding.linear_1.", "time_embed.0.", False), ("time_embedding.linear_2.", "time_embed.2.", False),
        ("conv_in.", "input_blocks.0.0.", False), ("conv_norm_out.", "out.0.", False), ("conv_out.", "out.2.", False),
        ("mid_block.resnets.0.", "middle_block.0.", True), ("mid_block.attentions.0.", "middle_block.1.", False),
        ("mid_block.resnets.1.", "middle_block.2.", True),
        ("add_embedding.linear_1.", "label_emb.0.0.", False), ("add_embedding.linear_2.", "label_emb.0.2.", False),
    ]
    for i in range(blocks):
        for j in range(lpb):
            k = 1 + i * (lpb + 1) + j
            out.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.", True))
            out.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1.", False))
        out.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{1 + i * (lpb + 1) + lpb}.0.op.", False))
        for j in range(lpb + 1):
            k = i * (lpb + 1) + j
            out.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0.", True))
            out.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1.", False))
        last = i * (lpb + 1) + lpb
        slot = 2 if has(f"up_blocks.{i}.attentions.{lpb}.") else 1
        out.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{last}.{slot}.conv.", False))
    return out


def unet_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Tensors:
    """A diffusers UNet2DConditionModel state dict in LDM ``model.diffusion_model.*`` layout."""
    if config.get("addition_embed_type") not in (None, "text_time") or config.get("class_embed_type"):
        raise ModelError("cannot export this UNet: class or custom added embeddings have no LDM layout here; "
                         "expected an SD 1.x / 2.x / SDXL UNet")
    keys = list(state)
    prefixes = _unet_prefixes(config, lambda p: any(k.startswith(p) for k in keys))
    result: Tensors = {}
    for key, value in state.items():
        for old, new, is_resnet in prefixes:
            if key.startswith(old):
                rest = key[len(old):]
                result[UNET_PREFIX + new + (_rename(rest, _UNET_RESNET) if is_resnet else rest)] = value
                break
        else:
            raise ModelError(f"cannot export the UNet: no LDM place for its weight {key!r}")
    return result


def vae_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Tensors:
    """A diffusers AutoencoderKL state dict in LDM ``first_stage_model.*`` layout.

    The decoder's up blocks are numbered in reverse in LDM, and the mid-block attention is stored as 1x1
    convolutions there (linear layers in diffusers).
    """
    blocks = len(config["up_block_types"])
    result: Tensors = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out.", "norm_out.")
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.",
                     lambda m: f"decoder.up.{blocks - 1 - int(m.group(1))}.block.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{blocks - 1 - int(m.group(1))}.upsample.", new)
        new = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", new)
        if ".mid_block.attentions.0." in new:
            head, rest = new.split(".mid_block.attentions.0.", 1)
            renamed = _rename(rest, _VAE_ATTENTION)
            if renamed == rest:
                raise ModelError(f"cannot export the VAE: no LDM place for its weight {key!r}")
            new = f"{head}.mid.attn_1.{renamed}"
            if value.ndim == 2:
                value = value[:, :, None, None]
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        if "_blocks." in new or "mid_block" in new:
            raise ModelError(f"cannot export the VAE: no LDM place for its weight {key!r}")
        result[VAE_PREFIX + new] = value
    return result


def _text_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The CLIP text weights keyed without the ``text_model.`` level (transformers >= 5.6 dropped it)."""
    return {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}


def clip_to_ldm(state: Mapping[str, torch.Tensor], prefix: str = CLIP_PREFIX) -> Tensors:
    """SD 1.x (and SDXL's first encoder): the Hugging Face CLIP text model, keys kept, under ``prefix``."""
    return {prefix + k: v for k, v in _text_keys(state).items()}


def open_clip_to_ldm(state: Mapping[str, torch.Tensor], prefix: str = OPEN_CLIP_PREFIX) -> Tensors:
    """SD 2.x (and SDXL's second encoder): the text model in OpenCLIP layout (``resblocks``, fused
    ``in_proj``, ``text_projection`` stored transposed) under ``prefix``."""
    flat = _text_keys(state)
    result: Tensors = {}
    if "text_projection.weight" in flat:
        result[prefix + "text_projection"] = flat.pop("text_projection.weight").T
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    for key, value in flat.items():
        if key in fixed:
            result[prefix + fixed[key]] = value
            continue
        match = re.match(r"^encoder\.layers\.(\d+)\.(.*)$", key)
        if match is None:
            raise ModelError(f"cannot export the text encoder: no OpenCLIP place for its weight {key!r}")
        layer, rest = match.groups()
        block = f"{prefix}transformer.resblocks.{layer}."
        fused = re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", rest)
        if fused is not None:
            if fused.group(1) == "q":
                kind = fused.group(2)
                parts = [flat[f"encoder.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                result[f"{block}attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
            continue
        renamed = _rename(rest, _OPEN_CLIP_LAYER)
        if renamed == rest:
            raise ModelError(f"cannot export the text encoder: no OpenCLIP place for its weight {key!r}")
        result[block + renamed] = value
    return result


def family_of_pipeline(pipe: Any) -> str:
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    return "sd2" if int(pipe.text_encoder.config.hidden_size) == 1024 else "sd1"


def pipeline_to_ldm(pipe: Any) -> Tensors:
    """The whole pipeline as one LDM state dict (UNet, VAE, text encoder(s))."""
    state = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config)
    state.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    text = pipe.text_encoder.state_dict()
    family = family_of_pipeline(pipe)
    if family == "sdxl":
        state.update(clip_to_ldm(text, SDXL_CLIP_PREFIX))
        state.update(open_clip_to_ldm(pipe.text_encoder_2.state_dict(), SDXL_OPEN_CLIP_PREFIX))
    else:
        state.update(open_clip_to_ldm(text) if family == "sd2" else clip_to_ldm(text))
    return state


def _as_pipeline(pipe_or_folder: Any) -> Any:
    if not isinstance(pipe_or_folder, (str, os.PathLike)):
        return getattr(pipe_or_folder, "pipe", pipe_or_folder)  # a LoadedModel or a pipeline
    from sdrepl.core.models import load_model

    return load_model(str(pipe_or_folder), device="cpu", dtype="fp32").pipe


def export_single_file(pipe_or_folder: Any, path: Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``pipe_or_folder`` (a pipeline, a LoadedModel, or anything ``--model`` accepts) as ``path``.

    ``dtype`` converts floating-point weights (e.g. ``torch.float16`` halves the file). The file is written
    beside its final place and renamed into it, so a crash never leaves a truncated checkpoint behind.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ModelError(f"export to {path}: only .safetensors is written; expected a path ending in .safetensors")
    pipe = _as_pipeline(pipe_or_folder)
    state = pipeline_to_ldm(pipe)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in state.items()}
    family = family_of_pipeline(pipe)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "sdrepl.family": family})
    return path
