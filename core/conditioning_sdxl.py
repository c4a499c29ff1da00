"""SDXL conditioning: a prompt's chunks through both text encoders, as AUTOMATIC1111 does it.

SDXL has two text encoders over the same CLIP BPE vocabulary: CLIP-L (768 wide, padding with the end
token) and OpenCLIP-G (1280 wide, with a text projection, padding with ``!`` = id 0). The rules, from
A1111's ``sd_hijack_clip`` / ``sd_models_xl`` and sgm's ``GeneralConditioner``:

- The prompt is chunked once (75-token chunks, ``BREAK``, comma backtrack, embeddings never split: the
  shared :func:`sdrepl.core.budget.chunk_prompt`), and every chunk runs through both encoders. Each
  encoder's chunk is framed with its own padding id.
- Each encoder gives its **penultimate hidden state** (no final layer norm); the two ``[77, 768]`` and
  ``[77, 1280]`` are concatenated to ``[77, 2048]`` and the chunks side by side to ``[1, 77*k, 2048]``.
- Emphasis and mean restoration are applied per encoder, per chunk (each encoder is its own hijack in A1111).
- The **pooled** embedding is encoder 2's projected final-norm output at the end token, of the first chunk.
- An SDXL embedding pair puts ``clip_l`` rows into encoder 1 and ``clip_g`` rows into encoder 2 at the
  same positions; an N-vector pair costs N tokens.
- An empty negative prompt is **zeros** (A1111's ``force_zero_embeddings``, diffusers'
  ``force_zeros_for_empty_prompt``), pooled included; a non-empty one is encoded like the prompt.
- The time ids are (original height, width, crop top, left, target height, width), by default the
  picture size and crop 0,0 (A1111's defaults).

``clip_skip`` (A1111's numbering) is ignored up to 2 on SDXL, whose native layer is already the
penultimate; ``clip_skip`` n > 2 takes the n-th hidden state from the end on both encoders.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sdrepl.core.budget import Chunk, chunk_prompt
from sdrepl.core.conditioning import (
    ChunkInput,
    Conditioning,
    _run_layers,
    _text_model,
    chunk_inputs,
    emphasis,
    input_hidden,
    join_chunks,
)
from sdrepl.core.embedding import CLIP_G, CLIP_L
from sdrepl.core.errors import PromptError
from sdrepl.core.prompt import EmbeddingLookup, PromptOptions

#: The layer SDXL conditions on, in A1111's clip-skip numbering (2 = the penultimate hidden state).
NATIVE_SKIP = 2


@dataclass
class SdxlConditioning(Conditioning):
    """:class:`Conditioning` plus SDXL's pooled embeddings (``[1, 1280]`` each)."""

    pooled: torch.Tensor
    negative_pooled: torch.Tensor

    def pipeline_inputs(self, width: int, height: int) -> dict[str, Any]:
        """The extra ``StableDiffusionXLPipeline`` arguments: pooled embeddings and the time-id sizes."""
        return {
            "pooled_prompt_embeds": self.pooled,
            "negative_pooled_prompt_embeds": self.negative_pooled,
            "original_size": (height, width),
            "crops_coords_top_left": (0, 0),
            "target_size": (height, width),
        }

    def added_cond(self, width: int, height: int) -> dict[str, torch.Tensor]:
        """The UNet's ``added_cond_kwargs`` for a classifier-free-guidance batch (negative first)."""
        ids = time_ids(width, height).to(self.pooled.device, self.pooled.dtype)
        return {"text_embeds": torch.cat([self.negative_pooled, self.pooled]), "time_ids": ids.repeat(2, 1)}


def time_ids(width: int, height: int, original: tuple[int, int] | None = None,
             crop: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """``[1, 6]`` SDXL time ids: original (h, w), crop (top, left), target (h, w). ``original`` is
    (width, height), defaulting to the target size as in A1111."""
    ow, oh = original or (width, height)
    return torch.tensor([[oh, ow, crop[0], crop[1], height, width]], dtype=torch.float32)


def _encoders(model: Any) -> tuple[tuple[str, Any, Any], tuple[str, Any, Any]]:
    pipe = model.pipe
    return (CLIP_L, pipe.tokenizer, pipe.text_encoder), (CLIP_G, pipe.tokenizer_2, pipe.text_encoder_2)


def encode_encoder_chunks(
    text_encoder: Any,
    inputs: Sequence[ChunkInput],
    clip_skip: int = 1,
    *,
    pooled: bool = False,
    restore_mean: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One SDXL encoder over chunks: ``[k, 77, D]`` (the hidden state ``clip_skip`` picks, emphasis applied)
    and, with ``pooled``, ``[k, P]`` (the projected final-norm output at each chunk's end token).

    Differentiable with respect to splice vectors, like :func:`sdrepl.core.conditioning.encode_chunks`.
    """
    if not inputs:
        raise ValueError("encode_encoder_chunks needs at least one chunk")
    tm = _text_model(text_encoder)
    n_layers = len(tm.encoder.layers)
    skip = max(NATIVE_SKIP, clip_skip)
    if skip > n_layers + 1:
        raise PromptError(f"clip_skip {clip_skip} is out of range: this text encoder has {n_layers} layers, use 1 "
                          f"to {n_layers + 1} on SDXL")
    hidden = input_hidden(tm, inputs)
    ran = n_layers + 1 - skip
    z = _run_layers(tm, hidden, ran)
    pool = None
    if pooled:
        last = tm.final_layer_norm(_run_layers(tm, z, n_layers, start=ran))
        eos = torch.stack([_end_position(ci) for ci in inputs]).to(last.device)
        pool = text_encoder.text_projection(last[torch.arange(len(inputs), device=last.device), eos])
    if any(ci.weights is not None for ci in inputs):
        z = torch.stack([emphasis(z[i], ci.weights, restore_mean=restore_mean) for i, ci in enumerate(inputs)])
    return z, pool


def _end_position(ci: ChunkInput) -> torch.Tensor:
    """Where the chunk's end token is: the pooled output is read there (the first one, as CLIP does)."""
    return (ci.ids == 49407).int().argmax()


def frame_both(chunks: Sequence[Chunk], model: Any,
               overrides: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> dict[str, list[ChunkInput]]:
    """Each encoder's framing of the same chunks (its own padding id, its own embedding vectors).

    ``overrides`` maps an encoder key (``clip_l`` / ``clip_g``) to the ``overrides`` of
    :func:`sdrepl.core.conditioning.chunk_inputs` for that encoder (the trainer's parameters).
    """
    framed = {}
    for key, tokenizer, encoder in _encoders(model):
        inputs = chunk_inputs(chunks, tokenizer, encoder_key=key, overrides=(overrides or {}).get(key))
        width = int(_text_model(encoder).embeddings.token_embedding.weight.shape[1])
        for ci in inputs:
            for _, vectors in ci.splices:
                if vectors.shape[-1] != width:
                    raise PromptError(f"an embedding in this prompt has {key} vectors {vectors.shape[-1]} wide, "
                                      f"but the model's {key} encoder is {width} wide")
        framed[key] = inputs
    return framed


def _both(model: Any, framed: Mapping[str, Sequence[ChunkInput]], clip_skip: int, restore_mean: bool = True):
    """Every chunk through both encoders: ``[k, 77, 2048]`` and every chunk's pooled ``[k, 1280]``."""
    (_, _, enc_l), (_, _, enc_g) = _encoders(model)
    z_l, _ = encode_encoder_chunks(enc_l, framed[CLIP_L], clip_skip, restore_mean=restore_mean)
    z_g, pooled = encode_encoder_chunks(enc_g, framed[CLIP_G], clip_skip, pooled=True, restore_mean=restore_mean)
    return torch.cat([z_l, z_g.to(z_l.dtype)], dim=-1), pooled


def encode_sdxl_chunks(model: Any, framed: Mapping[str, Sequence[ChunkInput]], clip_skip: int = 1,
                       *, restore_mean: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``[k, 77, 2048]`` and the first chunk's pooled ``[1, 1280]`` from :func:`frame_both`'s inputs
    (``restore_mean=False``: A1111's "No norm" emphasis)."""
    z, pooled = _both(model, framed, clip_skip, restore_mean)
    return z, pooled[:1]


def encode_sdxl_batch(model: Any, per_text: Sequence[Sequence[Chunk]],
                      overrides: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                      clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Several prompts' chunks as one batch (the trainer's captions): ``[B, 77*k, 2048]`` (shorter prompts
    padded with the empty chunk) and each prompt's first-chunk pooled embedding ``[B, 1280]``.
    Differentiable with respect to the ``overrides`` tensors (see :func:`frame_both`)."""
    most = max(len(chunks) for chunks in per_text)
    flat = [c for chunks in per_text for c in [*chunks, *[Chunk()] * (most - len(chunks))]]
    z, pooled = _both(model, frame_both(flat, model, overrides), clip_skip)
    return z.reshape(len(per_text), most * z.shape[1], z.shape[2]), pooled[::most]


def _encode_one(model: Any, text: str, lookup: EmbeddingLookup, options: PromptOptions):
    chunks, budget = chunk_prompt(text, model.tokenizer, lookup, options)
    z, pooled = encode_sdxl_chunks(model, frame_both(chunks, model), options.clip_skip,
                                   restore_mean=options.emphasis == "Original")
    return z, pooled, budget


def encode_flat_sdxl(model: Any, text: str, lookup: EmbeddingLookup, options: PromptOptions):
    """One flat text (no editing or ``AND``) as ``[1, 77*k, 2048]``, its pooled ``[1, 1280]`` and budget."""
    z, pooled, budget = _encode_one(model, text, lookup, options)
    return join_chunks(z), pooled, budget


def empty_sdxl(model: Any, clip_skip: int) -> torch.Tensor:
    """The empty prompt's chunk ``[1, 77, 2048]`` (padding positive against negative)."""
    return join_chunks(encode_sdxl_chunks(model, frame_both([Chunk()], model), clip_skip)[0])


def encode_prompts_sdxl(
    model: Any, prompt: str, negative: str, lookup: EmbeddingLookup, options: PromptOptions | None = None
) -> SdxlConditioning:
    """Prompt and negative prompt of equal length for ``StableDiffusionXLPipeline`` (see module docstring).

    The shorter one is padded with the empty prompt's chunk (both encoders), as on SD 1.x.
    """
    options = options or PromptOptions()
    with torch.no_grad():
        pos, pooled, pos_budget = _encode_one(model, prompt, lookup, options)
        if negative:
            neg, neg_pooled, neg_budget = _encode_one(model, negative, lookup, options)
        else:  # exactly empty, as A1111 tests it: zeros, so the encoders need not run
            _, neg_budget = chunk_prompt("", model.tokenizer, lookup, options)
            neg, neg_pooled = torch.zeros_like(pos[:1]), torch.zeros_like(pooled)
        if pos.shape[0] != neg.shape[0]:
            empty, _ = encode_sdxl_chunks(model, frame_both([Chunk()], model), options.clip_skip)
            short = max(pos.shape[0], neg.shape[0])
            pos, neg = (torch.cat([z, empty.expand(short - z.shape[0], -1, -1)]) for z in (pos, neg))
    budget = pos_budget.describe()
    budget["negative"] = neg_budget.describe()
    return SdxlConditioning(join_chunks(pos), join_chunks(neg), budget, pooled, neg_pooled)
