"""The built-in offline ``tiny`` models: SD-shaped pipelines with random weights and the real tokenizer.

They exist so that demos, tests and benchmarks run anywhere with no download: the text encoder is a real
CLIP text transformer over the real 49,408-token vocabulary (768 wide for ``tiny``, 1024 for
``tiny-sd2``; ``tiny-sdxl`` has SDXL's two, 768 and 1280 wide, see :mod:`sdrepl.core.tiny_sdxl`), so real
SD 1.x / 2.x / SDXL embeddings load into them, while the UNet and VAE are as small as the
diffusers classes allow. Weights come from a fixed seed, so every machine builds bit-identical models;
the first build is saved to the user cache and later starts load it from there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

#: Bump when the architecture, seed or tokenizer changes, so stale caches are never used.
#: 2: tiny-sd2 pads with "!" (id 0) as SD 2.x's OpenCLIP tokenizer does.
TINY_VERSION = 3
SEED = 20221122
#: The tiny UNet's channels per block; single-file checkpoints are recognised as tiny by ``conv_in`` = 32.
UNET_CHANNELS = (32, 64)


@dataclass(frozen=True)
class TinySpec:
    name: str
    family: str
    width: int
    heads: int
    pad_token: str
    #: The cache folder's version (``<name>-v<version>``): bump one model's without rebuilding the others.
    version: int = TINY_VERSION


TINY_MODELS = {
    "tiny": TinySpec("tiny", "sd1", 768, 12, "<|endoftext|>"),
    "tiny-sd2": TinySpec("tiny-sd2", "sd2", 1024, 16, "!"),
    # SDXL: ``width`` is the second (CLIP-G) encoder's, which is what single-file checkpoints are matched by.
    "tiny-sdxl": TinySpec("tiny-sdxl", "sdxl", 1280, 20, "!", version=1),
}

#: The native picture size of the tiny models (the VAE downsamples by 8, so latents are 8x8).
TINY_SIZE = 64


def tokenizer_dir() -> Path:
    """The shipped SD 1.x CLIP tokenizer files (``vocab.json``, ``merges.txt``)."""
    return Path(str(resources.files("sdrepl.core") / "assets" / "clip-tokenizer"))


def load_tokenizer(pad_token: str = "<|endoftext|>"):
    """The real CLIP tokenizer, from package data (no network).

    SD 1.x pads with the end token; SD 2.x (OpenCLIP) uses the same BPE files but pads with ``"!"`` (id 0).
    """
    from transformers import CLIPTokenizer

    folder = tokenizer_dir()
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
                         pad_token=pad_token)


def build_tiny(name: str):
    """Build the named tiny pipeline from scratch, deterministically (same weights on every machine)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdrepl.core.samplers import make_scheduler

    spec = TINY_MODELS[name]
    if spec.family == "sdxl":
        from sdrepl.core.tiny_sdxl import build_tiny_sdxl

        return build_tiny_sdxl()
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(SEED)
        text_config = CLIPTextConfig(
            vocab_size=49408,
            hidden_size=spec.width,
            intermediate_size=spec.width * 2,
            num_hidden_layers=2,
            num_attention_heads=spec.heads,
            max_position_embeddings=77,
            projection_dim=spec.width,
            hidden_act="quick_gelu" if spec.family == "sd1" else "gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407 if spec.family == "sd1" else 0,
        )
        text_encoder = CLIPTextModel(text_config).eval()
        like_trained_layer_norms(text_encoder)
        torch.manual_seed(SEED + 1)
        unet = UNet2DConditionModel(
            sample_size=TINY_SIZE // 8,
            in_channels=4,
            out_channels=4,
            block_out_channels=UNET_CHANNELS,
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=spec.width,
            attention_head_dim=8,
            norm_num_groups=8,
        ).eval()
        vae = tiny_vae(SEED + 2)
    finally:
        torch.random.set_rng_state(generator_state)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_tokenizer(spec.pad_token),
        unet=unet,
        scheduler=make_scheduler("Euler a", None),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_vae(seed: int, **config):
    """The tiny models' VAE: 8x downsampling like SD's with few channels, random weights from ``seed``
    (``config``: e.g. SDXL's ``scaling_factor``). One definition for every tiny model; the weights depend
    on the seed and construction order only, so cached tiny folders stay byte-identical."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_SIZE,
        **config,
    ).eval()


def like_trained_layer_norms(module: torch.nn.Module) -> None:
    """Give every LayerNorm the spread a trained CLIP has (weights around 1, biases off zero).

    A freshly initialised LayerNorm (weight 1, bias 0) centres each position exactly, so the encoder's
    output has mean ~0; A1111's emphasis divides by that mean, and the tiny models would then exercise a
    case no real checkpoint has. Drawn from the builder's seeded generator, so still deterministic.
    """
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, torch.nn.LayerNorm):
                layer.weight.copy_(1.0 + 0.1 * torch.randn_like(layer.weight))
                layer.bias.copy_(0.05 + 0.1 * torch.randn_like(layer.bias))


def cache_root() -> Path:
    """Where built models are cached (``SDREPL_CACHE_DIR``, else the user cache folder)."""
    env = os.environ.get("SDREPL_CACHE_DIR")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("sdrepl"))


def cached_tiny_dir(name: str) -> Path:
    return cache_root() / "models" / f"{name}-v{TINY_MODELS[name].version}"


def ensure_tiny_folder(name: str) -> Path:
    """Return a diffusers folder holding the named tiny model, building and caching it the first time.

    The folder is written beside its final place and renamed into it, so a crash or a concurrent start
    never leaves a half-written cache that a later start would trust.
    """
    folder = cached_tiny_dir(name)
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    pipe = build_tiny(name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "model_index.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
