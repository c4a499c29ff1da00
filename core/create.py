"""The vectors of a new, untrained embedding, initialised from text (``shared/spec/prompt-language.md`` §4).

Vector i is the token embedding of the init text's token at index ``floor(i * len / N)`` (no BOS/EOS), so a
short init text is spread over the vectors and a long one is sampled evenly; an empty init text gives
zeros. These are the rows the encoder would look up for the init text itself, which is why an untrained
1-vector embedding made from ``tree`` conditions exactly like the word ``tree``.
"""

from __future__ import annotations

from typing import Any

import torch

from sdrepl.core.budget import tokenize_text
from sdrepl.core.embedding import CLIP_G, CLIP_L, MAX_VECTORS, SINGLE
from sdrepl.core.errors import UsageError


def init_vectors(tokenizer: Any, text_encoder: Any, init_text: str, vectors: int) -> torch.Tensor:
    """``[vectors, D]`` float32 on the CPU for one text encoder."""
    if not 1 <= vectors <= MAX_VECTORS:
        raise UsageError(f"--vectors {vectors}: an embedding has 1 to {MAX_VECTORS} vectors")
    table = text_encoder.get_input_embeddings().weight
    ids = tokenize_text(init_text or "", tokenizer)
    if not ids:
        return torch.zeros(vectors, table.shape[1], dtype=torch.float32)
    picks = [ids[i * len(ids) // vectors] for i in range(vectors)]
    with torch.no_grad():
        rows = table[torch.tensor(picks, device=table.device)]
    return rows.detach().to("cpu", torch.float32).clone()


def create_embedding_vectors(
    model_or_tokenizer: Any,
    init_text: str,
    vectors: int,
    *,
    text_encoder: Any = None,
) -> dict[str, torch.Tensor]:
    """The vectors of a new embedding, keyed as :class:`~sdrepl.core.embedding.Embedding` keys them.

    Pass a :class:`~sdrepl.core.models.LoadedModel` (or anything with ``tokenizer`` and ``text_encoder``),
    or a tokenizer plus ``text_encoder=``. Returns ``{SINGLE: [N, D]}``; for a model with a second text
    encoder (SDXL: ``tokenizer_2`` / ``text_encoder_2`` on its pipeline) ``{CLIP_L: ..., CLIP_G: ...}``.
    """
    if text_encoder is not None:
        return {SINGLE: init_vectors(model_or_tokenizer, text_encoder, init_text, vectors)}
    source = getattr(model_or_tokenizer, "pipe", model_or_tokenizer)
    if getattr(source, "text_encoder", None) is None:
        raise TypeError("create_embedding_vectors needs a model, or a tokenizer and text_encoder=")
    second = getattr(source, "text_encoder_2", None)
    first = init_vectors(source.tokenizer, source.text_encoder, init_text, vectors)
    if second is None:
        return {SINGLE: first}
    return {CLIP_L: first, CLIP_G: init_vectors(source.tokenizer_2, second, init_text, vectors)}
