"""Training captions -> conditioning, with the trainable vectors spliced in where ``[name]`` stands.

Captions go through the project's prompt language (A1111 does the same: emphasis in captions counts), with
``[name]`` written as ``<NAME>``. The trained embedding is a stand-in :class:`Embedding` whose stored
vectors are never used: :func:`sdrepl.core.conditioning.chunk_inputs` gets the trainer's ``[N, D]``
parameter as an override, so only those N rows take part in autograd, not the 49,408-row token table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sdrepl.core.budget import Chunk, chunk_prompt
from sdrepl.core.conditioning import ChunkInput, chunk_inputs, empty_chunk, encode_chunks
from sdrepl.core.embedding import SINGLE, Embedding, EmbeddingData
from sdrepl.core.errors import PromptError, TrainingError
from sdrepl.core.prompt import EmbeddingLookup, PromptOptions
from sdrepl.core.training.templates import NAME
from sdrepl.core.training.vectors import split_vectors

#: Distinct captions remembered tokenized (tag shuffling makes many; the oldest are dropped past this).
CACHE_LIMIT = 4096

#: Captions are matched literally: a caption word that happens to be another embedding's trigger stays text.
CAPTION_OPTIONS = PromptOptions(bare_names=False)


def standin(name: str, vectors: torch.Tensor, widths: Mapping[str, int] | None = None) -> Embedding:
    """An :class:`Embedding` for the vectors being trained (``vectors`` detached to the CPU), split by the
    model's encoder ``widths`` (an SDXL pair's are side by side, see :mod:`sdrepl.core.training.vectors`)."""
    flat = vectors.detach().to("cpu", torch.float32)
    parts = split_vectors(flat, widths) if widths else {SINGLE: flat}
    data = EmbeddingData({k: v.contiguous() for k, v in parts.items()}, format="training", inner_name=name)
    return Embedding(trigger=name, qualified=name, path=Path(name), data=data, sha256="0" * 64)


class TrainingLookup:
    """An :class:`EmbeddingLookup` that knows the trained name first, then (optionally) the library."""

    def __init__(self, embedding: Embedding, library: EmbeddingLookup | None = None) -> None:
        self.embedding = embedding
        self.library = library

    def get(self, name: str) -> Embedding | None:
        if name.lower() == self.embedding.key:
            return self.embedding
        return self.library.get(name) if self.library is not None else None

    def suggest(self, name: str, limit: int = 3) -> list[str]:
        found = self.library.suggest(name, limit) if self.library is not None else []
        return [self.embedding.trigger, *found][:limit]

    def triggers(self) -> list[str]:
        return [self.embedding.trigger, *(self.library.triggers() if self.library is not None else [])]


def as_prompt(line: str, name: str) -> str:
    """A filled template line in the prompt language: ``[name]`` becomes ``<NAME>``."""
    return line.replace(NAME, f"<{name}>")


def _remember(cache: dict, key: str, value: Any) -> None:
    if len(cache) >= CACHE_LIMIT:
        cache.pop(next(iter(cache)))
    cache[key] = value


class CaptionEncoder:
    """Encodes batches of filled template lines with the trainable vectors spliced in."""

    def __init__(self, model: Any, name: str, vectors: torch.Tensor, library: EmbeddingLookup | None = None) -> None:
        self.model = model
        self.name = name
        self.lookup = TrainingLookup(standin(name, vectors, model.encoder_widths), library)
        self._empty = empty_chunk(model.tokenizer)
        self._chunks: dict[str, list[Chunk]] = {}
        self._inputs: dict[str, list[ChunkInput]] = {}

    def chunks(self, text: str) -> list[Chunk]:
        """The chunks of one caption, before framing (raises TrainingError if the caption is unusable);
        each distinct caption is tokenized once (bounded: :data:`CACHE_LIMIT` captions)."""
        cached = self._chunks.get(text)
        if cached is not None:
            return cached
        try:
            chunks, _ = chunk_prompt(as_prompt(text, self.name), self.model.tokenizer, self.lookup, CAPTION_OPTIONS)
        except PromptError as exc:
            raise TrainingError(f"training caption {text!r} cannot be used: {exc}") from None
        _remember(self._chunks, text, chunks)
        return chunks

    def inputs(self, text: str, vectors: torch.Tensor) -> list[ChunkInput]:
        """One caption's framed chunks with their token ids (and weights) on the encoder's device, made
        once per caption; the splices hold ``vectors`` itself, so its in-place updates are seen."""
        cached = self._inputs.get(text)
        if cached is not None and all(v is vectors for ci in cached for _, v in ci.splices):
            return cached
        device = self.model.text_encoder.device
        made = [ChunkInput(ci.ids.to(device), ci.splices, None if ci.weights is None else ci.weights.to(device))
                for ci in chunk_inputs(self.chunks(text), self.model.tokenizer, overrides={self.name: vectors})]
        _remember(self._inputs, text, made)
        return made

    def encode(self, texts: Sequence[str], vectors: torch.Tensor) -> torch.Tensor:
        """``[B, 77*k, D]`` for ``texts`` (k = the most chunks any caption needs; shorter ones are padded
        with the empty prompt's chunk, as A1111 pads), differentiable with respect to ``vectors``."""
        per_text = [self.inputs(text, vectors) for text in texts]
        most = max(len(inputs) for inputs in per_text)
        flat = [ci for inputs in per_text for ci in inputs + [self._empty] * (most - len(inputs))]
        z = encode_chunks(self.model.text_encoder, flat)
        return z.reshape(len(texts), most * z.shape[1], z.shape[2])

    def check(self, texts: Sequence[str]) -> None:
        """Parse every caption once before training, so a bad one fails the job before step 1."""
        for text in texts:
            self.chunks(text)


class SdxlCaptionEncoder(CaptionEncoder):
    """SDXL captions: both encoders per chunk (:mod:`sdrepl.core.conditioning_sdxl`), the pair's halves spliced
    into their own encoder, and the pooled embedding of each caption's first chunk."""

    def encode(self, texts: Sequence[str], vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, 77*k, 2048], [B, 1280])``, differentiable with respect to ``vectors`` ``[N, 768 + 1280]``."""
        from sdrepl.core.conditioning_sdxl import encode_sdxl_batch

        parts = split_vectors(vectors, self.model.encoder_widths)
        overrides = {key: {self.name: part} for key, part in parts.items()}
        return encode_sdxl_batch(self.model, [self.chunks(text) for text in texts], overrides)


def caption_encoder(model: Any, name: str, vectors: torch.Tensor,
                    library: EmbeddingLookup | None = None) -> CaptionEncoder:
    """The caption encoder for the model's family."""
    cls = SdxlCaptionEncoder if getattr(model, "family", None) == "sdxl" else CaptionEncoder
    return cls(model, name, vectors, library)
