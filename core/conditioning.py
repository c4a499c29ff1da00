"""Conditioning: a prompt's chunks through the CLIP text encoder, with embeddings spliced in as vectors.

Embeddings are never added to the tokenizer and the token-embedding matrix is never resized (unlike
diffusers' ``load_textual_inversion``): each chunk's input embeddings are looked up for its ids, the rows
where an embedding stands are overwritten with its vectors, and the encoder runs on that. So loading,
reloading or removing embeddings never touches the model, and two embeddings with one trigger cannot
clash. The encoder's own submodules are called in its own order (token embedding, position embedding,
causal mask, layers, final norm), so a prompt without embeddings gives bit for bit what
``text_encoder(input_ids)`` gives (the tests check it against the pipeline's ``encode_prompt``).

Layers of the API:

- :func:`encode_prompts` / :func:`encode_text`: prompt text -> ``prompt_embeds`` /
  ``negative_prompt_embeds`` for a diffusers pipeline (no autograd).
- :func:`chunk_inputs`: chunks (from :func:`sdrepl.core.budget.chunk_prompt`) -> :class:`ChunkInput`, with
  ``overrides`` to put a trainable tensor where an embedding stands.
- :func:`encode_chunks`: :class:`ChunkInput` list -> ``[k, 77, D]``, differentiable with respect to the
  splice vectors (the trainer's entry point: it opens no ``no_grad`` of its own).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sdrepl.core.budget import CHUNK, Chunk, chunk_prompt
from sdrepl.core.embedding import SINGLE
from sdrepl.core.errors import ModelError, PromptError
from sdrepl.core.prompt import EmbeddingLookup, PromptOptions

#: Positions per encoded chunk: BOS + 75 + EOS.
POSITIONS = CHUNK + 2


@dataclass
class ChunkInput:
    """One 77-position chunk ready for the encoder.

    ``ids`` is ``[77]`` (BOS, tokens, EOS, padding); each splice ``(start, vectors)`` replaces the input
    embeddings at ``start:start + len(vectors)`` (positions count BOS as 0) with ``vectors`` (``[N, D]``,
    any device/dtype, may require grad); ``weights`` is ``[77]`` emphasis per position, or None for all 1.
    """

    ids: torch.Tensor
    splices: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    weights: torch.Tensor | None = None


@dataclass
class Conditioning:
    """What a generation needs from a prompt pair: the pipeline inputs and the budget to report."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    #: :func:`sdrepl.core.budget.prompt_budget`'s dict (the ``tokens`` of a generation result).
    budget: dict[str, Any]


def _special_ids(tokenizer: Any) -> tuple[int, int, int]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return bos, eos, pad


def chunk_inputs(
    chunks: Sequence[Chunk],
    tokenizer: Any,
    *,
    encoder_key: str = SINGLE,
    overrides: Mapping[str, torch.Tensor] | None = None,
) -> list[ChunkInput]:
    """Frame each chunk as the pipeline does (BOS + tokens + EOS + pad to 77) and attach its splices.

    ``overrides`` maps an embedding name (trigger or ``folder/name``, case-insensitive) to the tensor to
    splice instead of its stored vectors: the trainer passes its trainable ``[N, D]`` parameter here.
    """
    bos, eos, pad = _special_ids(tokenizer)
    table = {k.lower(): v for k, v in (overrides or {}).items()}
    out = []
    for chunk in chunks:
        n = len(chunk.tokens)
        ids = torch.tensor([bos, *chunk.tokens, eos] + [pad] * (CHUNK - n), dtype=torch.long)
        splices = []
        for offset, piece in chunk.splices:
            emb = piece.embedding
            vectors = table.get(emb.qualified.lower(), table.get(emb.key))
            if vectors is None:
                if encoder_key not in emb.vectors:
                    raise PromptError(
                        f"{piece.written}: this embedding has vectors for {sorted(emb.vectors)}, "
                        f"not for the model's {encoder_key!r} text encoder"
                    )
                vectors = emb.vectors[encoder_key]
            if vectors.shape[0] != emb.num_vectors:
                raise PromptError(f"{piece.written}: {vectors.shape[0]} vectors given for {emb.num_vectors}")
            splices.append((offset + 1, vectors))
        weights = None
        if any(w != 1.0 for w in chunk.weights):
            weights = torch.tensor([1.0, *chunk.weights] + [1.0] * (CHUNK + 1 - n), dtype=torch.float32)
        out.append(ChunkInput(ids, splices, weights))
    return out


def empty_chunk(tokenizer: Any) -> ChunkInput:
    """The empty prompt's chunk (BOS, EOS, padding): what A1111 pads the shorter of cond/uncond with."""
    return chunk_inputs([Chunk()], tokenizer)[0]


# --- the encoder ----------------------------------------------------------------------------------------


def _text_model(text_encoder: Any) -> Any:
    """The module holding ``embeddings``/``encoder``/``final_layer_norm`` (transformers 5: the model itself;
    transformers 4 and ``CLIPTextModelWithProjection``: ``.text_model``)."""
    return getattr(text_encoder, "text_model", text_encoder)


@functools.lru_cache(maxsize=8)
def _takes_causal_mask(layer_type: type) -> bool:
    """transformers 4.x layers take ``(hidden, attention_mask, causal_attention_mask)``; 5.x do not."""
    return "causal_attention_mask" in inspect.signature(layer_type.forward).parameters


@functools.lru_cache(maxsize=1)
def _causal_mask_arguments() -> tuple[str, str, str | None]:
    """How this transformers' ``create_causal_mask`` names its inputs: the embeddings (``inputs_embeds``;
    ``input_embeds`` before 4.56), the cache (``cache`` from 5.x; ``past_key_values``, which 5.40 removes,
    before) and whether it still needs ``cache_position`` (4.x, 5.0). Read from its signature, so no
    version numbers are compared and a deprecated name is never passed."""
    from transformers.masking_utils import create_causal_mask

    names = inspect.signature(create_causal_mask).parameters
    embeds = "inputs_embeds" if "inputs_embeds" in names else "input_embeds"
    cache = "cache" if "cache" in names else "past_key_values"
    position = "cache_position" if "cache_position" in names else None
    return embeds, cache, position


def _causal_mask(config: Any, hidden: torch.Tensor) -> Any:
    """The causal mask CLIP's own forward builds (``create_causal_mask`` with no cache or padding mask)."""
    from transformers.masking_utils import create_causal_mask

    embeds, cache, position = _causal_mask_arguments()
    kwargs: dict[str, Any] = {"config": config, embeds: hidden, "attention_mask": None, cache: None}
    if position is not None:
        kwargs[position] = torch.arange(hidden.shape[1], device=hidden.device)
    return create_causal_mask(**kwargs)


def _run_layers(tm: Any, hidden: torch.Tensor, count: int, start: int = 0) -> torch.Tensor:
    """Run encoder layers ``start`` to ``count - 1`` exactly as the model's forward does."""
    layers = tm.encoder.layers
    if _takes_causal_mask(type(layers[0])):  # transformers 4.x: explicit 4-D causal mask, tuple outputs
        from transformers.modeling_attn_mask_utils import _create_4d_causal_attention_mask

        causal = _create_4d_causal_attention_mask(hidden.shape[:2], hidden.dtype, device=hidden.device)
        for layer in layers[start:count]:
            hidden = layer(hidden, None, causal)[0]
        return hidden
    mask = _causal_mask(tm.config, hidden)
    for layer in layers[start:count]:
        out = layer(hidden, mask, is_causal=True)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


#: Below this fraction of the mean absolute value, a chunk's mean is treated as zero (see ``emphasis``).
MEAN_EPS = 1e-4


def emphasis(z: torch.Tensor, weights: torch.Tensor | None, *, restore_mean: bool = True) -> torch.Tensor:
    """A1111's "Original" emphasis on one chunk's output ``[..., 77, D]``: scale each position by its
    weight, then rescale the whole so its mean is what it was. ``restore_mean=False`` gives the scaled
    tensor before the rescale (tests look at it)."""
    if weights is None:
        return z
    original_mean = z.mean()
    z = z * weights.to(z.device, z.dtype).reshape(*weights.shape, 1)
    if restore_mean:
        # A1111 divides by the new mean unguarded. Where the mean is ~0 next to the values themselves
        # (an untrained final layer norm centres every position), that quotient is rounding noise that
        # can zero or blow up the whole chunk; there the restoration is skipped. The denominator is made
        # safe before dividing so that no inf reaches autograd through the unselected branch.
        new_mean = z.mean()
        meaningful = new_mean.abs() > MEAN_EPS * z.abs().mean()
        safe = torch.where(meaningful, new_mean, torch.ones_like(new_mean))
        z = z * torch.where(meaningful, original_mean / safe, torch.ones_like(new_mean))
    return z


def input_hidden(tm: Any, inputs: Sequence[ChunkInput]) -> torch.Tensor:
    """``[k, 77, D]``: the chunks' token embeddings with the splices written in, plus position embeddings
    (the input of the first encoder layer). ``tm`` is :func:`_text_model`'s module."""
    token_embedding = tm.embeddings.token_embedding
    device, dtype = token_embedding.weight.device, token_embedding.weight.dtype
    ids = torch.stack([ci.ids for ci in inputs]).to(device)
    embeds = token_embedding(ids)
    for row, ci in enumerate(inputs):
        for start, vectors in ci.splices:
            embeds[row, start : start + vectors.shape[0]] = vectors.to(device, dtype)
    return tm.embeddings(inputs_embeds=embeds)


def encode_chunks(
    text_encoder: Any,
    inputs: Sequence[ChunkInput],
    clip_skip: int = 1,
    *,
    restore_mean: bool = True,
) -> torch.Tensor:
    """Encode chunks as one batch; return ``[k, 77, D]`` in the encoder's device and dtype.

    Differentiable: gradients flow to splice vectors that require grad, and nothing here disables autograd
    (callers that only infer wrap it in ``torch.no_grad``). ``clip_skip`` is A1111's: 1 = the last layer's
    output, 2 = the penultimate layer's hidden state, each followed by the final layer norm (diffusers'
    ``clip_skip`` is this minus one). Encoder layers are called as modules, so gradient checkpointing set
    on the encoder still applies.
    """
    if not inputs:
        raise ValueError("encode_chunks needs at least one chunk")
    tm = _text_model(text_encoder)
    n_layers = len(tm.encoder.layers)
    if not 1 <= clip_skip <= n_layers:
        raise PromptError(
            f"clip_skip {clip_skip} is out of range: this text encoder has {n_layers} layers, use 1 to {n_layers}"
        )
    hidden = input_hidden(tm, inputs)
    hidden = _run_layers(tm, hidden, n_layers - (clip_skip - 1))
    z = tm.final_layer_norm(hidden)
    if all(ci.weights is None for ci in inputs):
        return z
    return torch.stack([emphasis(z[i], ci.weights, restore_mean=restore_mean) for i, ci in enumerate(inputs)])


def join_chunks(z: torch.Tensor) -> torch.Tensor:
    """``[k, 77, D]`` -> ``[1, 77*k, D]``: chunks side by side, as one prompt's ``prompt_embeds``."""
    return z.reshape(1, -1, z.shape[-1])


# --- prompts --------------------------------------------------------------------------------------------


def _encoder_key(model: Any) -> str:
    widths = model.encoder_widths
    if SINGLE not in widths:
        raise ModelError(
            f"the {model.label} family has two text encoders: its prompts are encoded by "
            "core.conditioning_sdxl (encode_prompts and core.plan_conditioning hand them over)"
        )
    return SINGLE


def _encode_one(model: Any, text: str, lookup: EmbeddingLookup, options: PromptOptions):
    chunks, budget = chunk_prompt(text, model.tokenizer, lookup, options)
    inputs = chunk_inputs(chunks, model.tokenizer, encoder_key=_encoder_key(model))
    _check_widths(model, inputs)
    restore_mean = options.emphasis == "Original"  # "No norm" scales only; the others have no weights
    return encode_chunks(model.text_encoder, inputs, options.clip_skip, restore_mean=restore_mean), budget


def _check_widths(model: Any, inputs: Sequence[ChunkInput]) -> None:
    width = model.encoder_widths[SINGLE]
    for ci in inputs:
        for _, vectors in ci.splices:
            if vectors.shape[-1] != width:
                raise PromptError(
                    f"an embedding in this prompt is {vectors.shape[-1]} wide but the model's text encoder is "
                    f"{width} wide (it was made for another model family)"
                )


def encode_flat(model: Any, text: str, lookup: EmbeddingLookup, options: PromptOptions) -> tuple[torch.Tensor, Any]:
    """One flat text (no editing or ``AND``: :mod:`sdrepl.core.schedule` has resolved those) as
    ``[1, 77*k, D]`` with its :class:`~sdrepl.core.budget.Budget`; the caller decides about autograd."""
    z, budget = _encode_one(model, text, lookup, options)
    return join_chunks(z), budget


def encode_text(
    model: Any, text: str, lookup: EmbeddingLookup, options: PromptOptions | None = None
) -> torch.Tensor:
    """One prompt's conditioning, ``[1, 77*k, D]`` on the model's device and dtype."""
    with torch.no_grad():
        z, _ = _encode_one(model, text, lookup, options or PromptOptions())
    return join_chunks(z)


def encode_prompts(
    model: Any, prompt: str, negative: str, lookup: EmbeddingLookup, options: PromptOptions | None = None
) -> Conditioning:
    """``prompt_embeds`` and ``negative_prompt_embeds`` of equal length for a diffusers pipeline.

    The shorter one is padded with the empty prompt's chunk, as A1111 pads cond/uncond. Positive and
    negative are encoded separately (batch of their own chunks), as the pipeline's ``encode_prompt`` does.
    """
    options = options or PromptOptions()
    if getattr(model, "family", None) == "sdxl":  # two encoders and a pooled embedding: its own module
        from sdrepl.core.conditioning_sdxl import encode_prompts_sdxl

        return encode_prompts_sdxl(model, prompt, negative, lookup, options)
    with torch.no_grad():
        pos, pos_budget = _encode_one(model, prompt, lookup, options)
        neg, neg_budget = _encode_one(model, negative or "", lookup, options)
        if pos.shape[0] != neg.shape[0]:
            empty = encode_chunks(model.text_encoder, [empty_chunk(model.tokenizer)], options.clip_skip)
            short = max(pos.shape[0], neg.shape[0])
            pos, neg = (torch.cat([z, empty.expand(short - z.shape[0], -1, -1)]) for z in (pos, neg))
    budget = pos_budget.describe()
    budget["negative"] = neg_budget.describe()
    return Conditioning(join_chunks(pos), join_chunks(neg), budget)
