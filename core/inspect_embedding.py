"""The embedding inspector (``!inspect NAME``): what each vector of an embedding is close to, and how big it is.

A textual-inversion vector lives in the same space as the text encoder's token embedding table, so the
table is the natural ruler (A1111's embedding-inspector extension measures the same way):

- the **nearest tokens** by cosine similarity say what a vector "means" (an untrained embedding made from
  ``tree`` has vector 0 equal to the row of ``tree``: cosine 1.0);
- its **norm** against the distribution of the vocabulary's norms (a percentile) says whether training
  blew it up: vectors more than :data:`HUGE_FACTOR` times the largest vocabulary norm are flagged
  ``huge``, the usual sign of an over-trained embedding that swamps the rest of a prompt;
- the **similarity between vectors** shows whether several vectors learned the same thing;
- across the snapshots of a training log folder, how norm and nearest token moved step by step.

Plain tensors in, plain JSON-ready values out; the caller runs it on the device thread.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: A vector whose norm exceeds this many times the largest norm in the vocabulary is flagged ``huge``.
HUGE_FACTOR = 2.0
#: How many nearest tokens are reported per vector.
TOP = 5
#: Norms below this are treated as zero: such a vector points nowhere, so it has no nearest tokens.
ZERO_NORM = 1e-12


@dataclass(frozen=True)
class Vocabulary:
    """One text encoder's token table with what the inspector needs of it."""

    #: ``[V, D]`` float32 rows, on the table's device.
    table: torch.Tensor
    #: Every row's norm, ascending (Python floats: percentiles are a bisect).
    sorted_norms: list[float]
    tokenizer: Any

    @classmethod
    def of(cls, tokenizer: Any, text_encoder: Any) -> Vocabulary:
        table = text_encoder.get_input_embeddings().weight.detach().float()
        norms = table.norm(dim=1).sort().values.cpu().tolist()
        return cls(table, norms, tokenizer)

    @property
    def width(self) -> int:
        return int(self.table.shape[1])

    @property
    def max_norm(self) -> float:
        return self.sorted_norms[-1] if self.sorted_norms else 0.0

    def token_text(self, index: int) -> str:
        """The text a token stands for: ``tree</w>`` is shown as ``tree`` (the word it ends); byte-level
        pieces are decoded as the tokenizer decodes them."""
        token = self.tokenizer.convert_ids_to_tokens(int(index))
        if not isinstance(token, str):
            return str(index)
        try:
            text = self.tokenizer.decode([int(index)]).strip()
        except Exception:  # a tokenizer that cannot decode one id: show the token itself
            text = ""
        return text or token.removesuffix("</w>") or token


def percentile(sorted_norms: Sequence[float], value: float) -> float:
    """The share of the vocabulary (in percent, 0-100) whose norm is at most ``value``."""
    if not sorted_norms:
        return 0.0
    return 100.0 * bisect.bisect_right(sorted_norms, value) / len(sorted_norms)


def is_huge(norm: float, vocab: Vocabulary) -> bool:
    return norm > HUGE_FACTOR * vocab.max_norm


def nearest(vectors: torch.Tensor, vocab: Vocabulary, top: int = TOP) -> list[list[dict[str, Any]]]:
    """Per vector, the ``top`` vocabulary tokens with the highest cosine similarity (best first)."""
    rows = vectors.detach().to(vocab.table.device, torch.float32)
    unit_table = torch.nn.functional.normalize(vocab.table, dim=1)
    result: list[list[dict[str, Any]]] = []
    for row in rows:
        if float(row.norm()) <= ZERO_NORM:
            result.append([])
            continue
        cosines = unit_table @ (row / row.norm())
        scores, indices = cosines.topk(min(top, cosines.shape[0]))
        result.append([{"token": vocab.token_text(int(i)), "id": int(i), "cosine": round(float(s), 6)}
                       for s, i in zip(scores.tolist(), indices.tolist(), strict=True)])
    return result


def similarity(vectors: torch.Tensor) -> list[list[float]]:
    """The cosine similarity of every pair of vectors (``[N][N]``; 0 where a vector is zero)."""
    rows = vectors.detach().float()
    unit = torch.nn.functional.normalize(rows, dim=1, eps=ZERO_NORM)
    return [[round(float(v), 6) for v in line] for line in (unit @ unit.T).cpu()]


def inspect_vectors(vectors: torch.Tensor, vocab: Vocabulary, top: int = TOP) -> dict[str, Any]:
    """Everything ``!inspect`` says about one encoder's ``[N, D]`` vectors."""
    if vectors.ndim != 2 or vectors.shape[1] != vocab.width:
        raise ValueError(f"vectors of width {vectors.shape[-1]} do not fit this text encoder (width {vocab.width})")
    norms = vectors.detach().float().norm(dim=1).cpu().tolist()
    near = nearest(vectors, vocab, top)
    rows = [{"index": i, "norm": round(n, 6), "percentile": round(percentile(vocab.sorted_norms, n), 3),
             "huge": is_huge(n, vocab), "nearest": near[i]} for i, n in enumerate(norms)]
    return {"vectors": rows, "similarity": similarity(vectors),
            "vocabulary": {"tokens": len(vocab.sorted_norms), "median_norm": round(_median(vocab.sorted_norms), 6),
                           "max_norm": round(vocab.max_norm, 6), "huge_above": round(HUGE_FACTOR * vocab.max_norm, 6)}}


def trail(series: Sequence[tuple[int, torch.Tensor]], vocab: Vocabulary) -> list[dict[str, Any]]:
    """How each vector moved across training snapshots ``(step, [N, D])``, in step order: its norm,
    percentile, nearest token, and cosine to the same vector in the previous snapshot (``None`` first)."""
    rows: list[dict[str, Any]] = []
    previous: torch.Tensor | None = None
    for step, vectors in sorted(series, key=lambda item: item[0]):
        vectors = vectors.detach().float()
        norms = vectors.norm(dim=1).tolist()
        near = nearest(vectors, vocab, 1)
        moved: list[float | None] = [None] * len(norms)
        if previous is not None and previous.shape == vectors.shape:
            moved = [round(float(c), 6) for c in torch.nn.functional.cosine_similarity(previous, vectors, dim=1,
                                                                                     eps=ZERO_NORM)]
        rows.append({"step": step, "vectors": [
            {"norm": round(n, 6), "percentile": round(percentile(vocab.sorted_norms, n), 3), "huge": is_huge(n, vocab),
             "nearest": near[i][0] if near[i] else None, "cosine_to_previous": moved[i]}
            for i, n in enumerate(norms)]})
        previous = vectors
    return rows


def _median(values: Sequence[float]) -> float:
    if not values:
        return 0.0
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
