"""The built-in ``tiny-sdxl`` model: SDXL's shape (two text encoders, added conditioning) at toy size.

What SDXL adds to SD is all here, so every SDXL code path runs offline and fast on the CPU:

- text encoder 1 is a CLIP-L-shaped ``CLIPTextModel`` (768 wide) whose tokenizer pads with the end token;
- text encoder 2 is a CLIP-G-shaped ``CLIPTextModelWithProjection`` (1280 wide, with the text projection
  that gives SDXL's pooled embedding) whose tokenizer pads with ``!`` (id 0), as SDXL's OpenCLIP one does;
- the UNet takes the two encoders' penultimate hidden states side by side (2048 wide) as cross-attention
  context and SDXL's ``text_time`` added conditioning (pooled embedding + six time ids);
- the VAE has SDXL's latent scale (0.13025).

Both tokenizers are the real CLIP BPE files shipped in the package, so real SDXL ``clip_l``/``clip_g``
embeddings load into it. Weights come from a fixed seed; the built model is cached like ``tiny``'s.
"""

from __future__ import annotations

import torch

from sdrepl.core.tiny import (
    SEED,
    TINY_SIZE,
    UNET_CHANNELS,
    like_trained_layer_norms,
    load_tokenizer,
    tiny_vae,
)

#: The width of each encoder (what SDXL embedding pairs must match) and their concatenation.
CLIP_L_WIDTH = 768
CLIP_G_WIDTH = 1280
CONTEXT_WIDTH = CLIP_L_WIDTH + CLIP_G_WIDTH
#: Per-number sinusoid width of the time ids (SDXL: 256); six numbers plus the pooled embedding.
TIME_EMBED_DIM = 8
#: SDXL's VAE latent scale.
VAE_SCALE = 0.13025


def _text_config(width: int, heads: int, act: str, pad_id: int, projection: bool):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=width * 2,
        num_hidden_layers=2,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=width if projection else 768,
        hidden_act=act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=pad_id,
    )


def build_tiny_sdxl():
    """Build ``tiny-sdxl`` from scratch, deterministically (same weights on every machine)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from sdrepl.core.samplers import make_scheduler

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(SEED + 10)
        text_encoder = CLIPTextModel(_text_config(CLIP_L_WIDTH, 12, "quick_gelu", 49407, False)).eval()
        like_trained_layer_norms(text_encoder)
        torch.manual_seed(SEED + 11)
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(CLIP_G_WIDTH, 20, "gelu", 0, True)).eval()
        like_trained_layer_norms(text_encoder_2)
        torch.manual_seed(SEED + 12)
        unet = UNet2DConditionModel(
            sample_size=TINY_SIZE // 8,
            in_channels=4,
            out_channels=4,
            block_out_channels=UNET_CHANNELS,
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=CONTEXT_WIDTH,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=CLIP_G_WIDTH + 6 * TIME_EMBED_DIM,
            norm_num_groups=8,
        ).eval()
        vae = tiny_vae(SEED + 13, scaling_factor=VAE_SCALE)
    finally:
        torch.random.set_rng_state(state)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=load_tokenizer("<|endoftext|>"),
        tokenizer_2=load_tokenizer("!"),
        unet=unet,
        scheduler=make_scheduler("Euler a", None),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
