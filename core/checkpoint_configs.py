"""Diffusers component configs of the standard Stable Diffusion releases, for loading checkpoints offline.

An original-layout single-file checkpoint carries weights but no architecture. diffusers normally fetches
the matching configs from the Hugging Face hub (``stable-diffusion-v1-5``, ``stable-diffusion-2-1``,
``stable-diffusion-xl-base-1.0``); sdrepl must work without network, so the same configs live here as
Python dicts and :func:`ensure_config_folder` writes them out as a diffusers config folder (no weights).

Two deliberate differences from the hub files: the text encoders use the real CLIP token ids for
bos/eos (49406/49407) instead of the converted checkpoints' 0/2, because transformers pools on the eos id
when it is not 2, and pooling by ``argmax(input_ids)`` would pick a textual-inversion token (ids above
49407) instead of the end token in SDXL's pooled embedding; and the scheduler is whatever the sampler
choice replaces anyway, so only its noise schedule matters.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sdrepl.core import tiny

#: Bump to force rewriting cached config folders (also happens whenever their content changes).
CONFIG_VERSION = 1

_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False, "trained_betas": None}
_DOWN4 = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_UP4 = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
_UNET_COMMON = {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "center_input_sample": False,
                "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
                "out_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-5,
                "norm_num_groups": 32}
_VAE = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
        "sample_size": 512, "scaling_factor": 0.18215}
_CLIP_COMMON = {"vocab_size": 49408, "max_position_embeddings": 77, "layer_norm_eps": 1e-5,
                "attention_dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
                "bos_token_id": 49406, "eos_token_id": 49407, "model_type": "clip_text_model"}
#: CLIP ViT-L/14's text tower: SD 1.x's encoder and SDXL's first one.
_CLIP_L = {**_CLIP_COMMON, "architectures": ["CLIPTextModel"], "hidden_size": 768, "intermediate_size": 3072,
           "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768, "hidden_act": "quick_gelu",
           "pad_token_id": 49407}
#: OpenCLIP ViT-H/14 as SD 2.x uses it: 24 layers trained, the penultimate output used, so 23 kept.
_OPEN_CLIP_H = {**_CLIP_COMMON, "architectures": ["CLIPTextModel"], "hidden_size": 1024, "intermediate_size": 4096,
                "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512, "hidden_act": "gelu",
                "pad_token_id": 0}
#: OpenCLIP ViT-bigG/14: SDXL's second encoder, with its pooled projection.
_OPEN_CLIP_BIGG = {**_CLIP_COMMON, "architectures": ["CLIPTextModelWithProjection"], "hidden_size": 1280,
                   "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
                   "projection_dim": 1280, "hidden_act": "gelu", "pad_token_id": 0}

_SD_COMPONENTS = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                  "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}

#: family -> component -> config dict. ``tokenizer*`` entries hold the pad token (files come from assets).
FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "sd1": {
        "model_index": {"_class_name": "StableDiffusionPipeline", **_SD_COMPONENTS,
                        "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None],
                        "feature_extractor": [None, None], "requires_safety_checker": False},
        "unet": {**_UNET_COMMON, "block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8,
                 "cross_attention_dim": 768, "down_block_types": _DOWN4, "up_block_types": _UP4, "sample_size": 64},
        "vae": _VAE,
        "text_encoder": _CLIP_L,
        "tokenizer": {"pad_token": "<|endoftext|>"},
        "scheduler": {"_class_name": "PNDMScheduler", **_SCHEDULE, "skip_prk_steps": True,
                      "prediction_type": "epsilon"},
    },
    "sd2": {
        "model_index": {"_class_name": "StableDiffusionPipeline", **_SD_COMPONENTS,
                        "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
                        "feature_extractor": [None, None], "requires_safety_checker": False},
        "unet": {**_UNET_COMMON, "block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": [5, 10, 20, 20],
                 "cross_attention_dim": 1024, "down_block_types": _DOWN4, "up_block_types": _UP4,
                 "use_linear_projection": True, "upcast_attention": True, "sample_size": 96},
        "vae": {**_VAE, "sample_size": 768},
        "text_encoder": _OPEN_CLIP_H,
        "tokenizer": {"pad_token": "!"},
        "scheduler": {"_class_name": "DDIMScheduler", **_SCHEDULE, "prediction_type": "v_prediction"},
    },
    "sdxl": {
        "model_index": {"_class_name": "StableDiffusionXLPipeline", **_SD_COMPONENTS,
                        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                        "tokenizer_2": ["transformers", "CLIPTokenizer"],
                        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "force_zeros_for_empty_prompt": True},
        "unet": {**_UNET_COMMON, "block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20],
                 "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D",
                                                                   "CrossAttnDownBlock2D"],
                 "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
                 "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                 "projection_class_embeddings_input_dim": 2816, "sample_size": 128},
        "vae": {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "text_encoder": _CLIP_L,
        "text_encoder_2": _OPEN_CLIP_BIGG,
        "tokenizer": {"pad_token": "<|endoftext|>"},
        "tokenizer_2": {"pad_token": "!"},
        "scheduler": {"_class_name": "EulerDiscreteScheduler", **_SCHEDULE, "prediction_type": "epsilon",
                      "interpolation_type": "linear", "timestep_spacing": "leading", "use_karras_sigmas": False},
    },
}

_CONFIG_FILE = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                "text_encoder_2": "config.json", "scheduler": "scheduler_config.json"}


def _tokenizer_files(pad_token: str) -> dict[str, bytes]:
    assets = tiny.tokenizer_dir()
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}
    return {"vocab.json": (assets / "vocab.json").read_bytes(), "merges.txt": (assets / "merges.txt").read_bytes(),
            "tokenizer_config.json": _json(config), "special_tokens_map.json": _json(special)}


def _json(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def config_files(family: str) -> dict[str, bytes]:
    """Relative path -> content of the diffusers config folder for ``family`` (sd1, sd2, sdxl)."""
    files: dict[str, bytes] = {}
    for component, config in FAMILY_CONFIGS[family].items():
        if component == "model_index":
            files["model_index.json"] = _json(config)
        elif component.startswith("tokenizer"):
            for name, data in _tokenizer_files(config["pad_token"]).items():
                files[f"{component}/{name}"] = data
        else:
            files[f"{component}/{_CONFIG_FILE[component]}"] = _json(config)
    return files


def ensure_config_folder(family: str) -> Path:
    """The cached config folder for ``family`` (``<cache>/configs/<family>``), written when missing or stale.

    A stamp file holds the hash of the expected content, so a changed config or tokenizer is rewritten;
    the folder is built beside its place and renamed in, so readers never see half of it.
    """
    files = config_files(family)
    digest = hashlib.sha256(f"v{CONFIG_VERSION}".encode())
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name])
    stamp = digest.hexdigest()
    folder = tiny.cache_root() / "configs" / family
    stamp_file = folder / ".sdrepl-stamp"
    if stamp_file.is_file() and stamp_file.read_text().strip() == stamp:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=folder.parent))
    try:
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        (tmp / ".sdrepl-stamp").write_text(stamp + "\n")
        if folder.exists():  # stale: move it aside first, directories cannot be replaced in one step
            old = Path(tempfile.mkdtemp(prefix=f".{family}-old-", dir=folder.parent))
            try:
                os.replace(folder, old / family)
            except OSError:
                pass
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (stamp_file.is_file() and stamp_file.read_text().strip() == stamp):  # not a lost race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
