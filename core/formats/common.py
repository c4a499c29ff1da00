"""What every container reader shares: the skip signal, the file-name rules, and shape-only descriptions.

Error messages about a file describe what was found by keys, types and shapes, never by tensor values:
a user reading ``bad.pt: string_to_param holds 2 terms ('*' [2, 768], 'x' [1, 768]); expected exactly
one`` knows what is wrong without a screen of numbers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from sdrepl.core.atomic import is_temp_name
from sdrepl.core.errors import EmbeddingError

PICKLE_EXTENSIONS = frozenset({".pt", ".bin", ".ckpt"})
SAFETENSORS_EXTENSIONS = frozenset({".safetensors"})
IMAGE_EXTENSIONS = frozenset({".png", ".webp"})
#: Every extension an embedding file can have (case-insensitive).
EXTENSIONS = PICKLE_EXTENSIONS | SAFETENSORS_EXTENSIONS | IMAGE_EXTENSIONS

#: Diffusers' training script names its output ``learned_embeds.bin`` / ``learned_embeds-steps-500.bin``:
#: such a stem says nothing about the concept, so the trigger comes from the token inside or the folder.
GENERIC_STEM = re.compile(r"^learned_embeds(-steps-\d+)?$", re.IGNORECASE)


class NotAnEmbedding(EmbeddingError):
    """A file that is not an embedding and must be skipped silently (not listed as skipped).

    Raised for other extensions, zero-byte files (usually still being written), ``*.preview.png`` and
    pictures that carry no embedding, our own temporary files, and macOS ``._*`` resource-fork files.
    """


def _suffixes(name: str) -> tuple[str, str]:
    """The last and second-to-last suffixes of a file name, lower-cased (``.png``, ``.preview``)."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        return "", ""
    inner_stem, dot2, inner = stem.rpartition(".")
    return f".{ext.lower()}", (f".{inner.lower()}" if dot2 and inner_stem else "")


def is_preview_name(path: Path | str) -> bool:
    """``foo.preview.png``: A1111's preview picture for ``foo.pt``, never an embedding."""
    last, before = _suffixes(os.path.basename(path))
    return before == ".preview" and last in IMAGE_EXTENSIONS


def skip_reason(path: Path | str) -> str | None:
    """Why the file name alone rules ``path`` out as an embedding, or None if it could be one.

    Works on the name as a string (the library calls it for every directory entry).
    """
    name = os.path.basename(path)
    last, before = _suffixes(name)
    if name.startswith("."):
        if is_temp_name(name):
            return "a temporary file of a write in progress"
        if name.startswith("._"):
            return "a macOS resource-fork file (._*)"
    if last not in EXTENSIONS:
        return f"not an embedding file extension ({last or 'none'}; embeddings are " + ", ".join(
            sorted(EXTENSIONS)
        ) + ")"
    if before == ".preview" and last in IMAGE_EXTENSIONS:
        return "a preview picture (*.preview.png), not an embedding"
    return None


def describe_value(value: object) -> str:
    """A short description of ``value`` by type and shape (tensors) or size (containers), never contents."""
    if isinstance(value, torch.Tensor):
        dims = ", ".join(str(d) for d in value.shape)
        dtype = str(value.dtype).removeprefix("torch.")
        return f"tensor [{dims}] {dtype}"
    if isinstance(value, Mapping):
        return f"dict of {len(value)}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    if isinstance(value, (str, bytes)):
        return f"{type(value).__name__} of length {len(value)}"
    if value is None or isinstance(value, (bool, int, float)):
        return type(value).__name__
    return f"object of type {type(value).__module__}.{type(value).__qualname__}"


def describe_keys(mapping: Mapping, limit: int = 6) -> str:
    """``'a' (tensor [2, 768] float32), 'b' (int)`` for the first ``limit`` entries of a dict."""
    parts = [f"{key!r} ({describe_value(value)})" for key, value in list(mapping.items())[:limit]]
    if len(mapping) > limit:
        parts.append(f"... {len(mapping) - limit} more")
    return ", ".join(parts) if parts else "no keys"


def short(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, trimmed (library exceptions can be pages long)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    if len(text) > limit // 2 and ". " in text:  # keep the first sentence of long library messages
        text = text.split(". ", 1)[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."
