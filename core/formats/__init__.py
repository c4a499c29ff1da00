"""Readers and writers of embedding files, one module per container (see docs/architecture.md).

``read_embedding`` opens any file an embeddings folder may hold and returns :class:`EmbeddingData`, or
raises :class:`EmbeddingError` (broken or unsupported: listed as skipped, with the reason) or its
subclass :class:`NotAnEmbedding` (not an embedding at all: ignored silently). The container is chosen
by content, not only by extension (a ``.pt`` that is really safetensors still loads); the dict inside
is recognised by :mod:`.layouts`. No reader lets any other exception escape: whatever a damaged or
hostile file makes a parser raise becomes an EmbeddingError naming the file.

``EmbeddingData.format`` is ``<container>/<layout>``: containers ``pt``, ``bin``, ``ckpt``,
``safetensors``, ``png-text``, ``png-pixels``, ``webp-pixels``; layouts ``a1111``, ``emb_params``,
``diffusers``, ``sdxl``.

Modules: ``common`` (skip rules, shape-only descriptions), ``layouts`` (dict layouts, triggers),
``pickle_file`` (safe torch.load), ``safetensors_file``, ``image_card`` (A1111 PNG/WEBP cards), ``writers``.
"""

from __future__ import annotations

import os
import stat as stat_module
from pathlib import Path

from sdrepl.core.embedding import EmbeddingData
from sdrepl.core.errors import EmbeddingError
from sdrepl.core.formats.common import (
    EXTENSIONS,
    IMAGE_EXTENSIONS,
    MAX_FILE_BYTES,
    NotAnEmbedding,
    short,
    skip_reason,
)
from sdrepl.core.formats.image_card import read_image
from sdrepl.core.formats.layouts import decide_trigger
from sdrepl.core.formats.pickle_file import is_pickle, read_pickle
from sdrepl.core.formats.safetensors_file import looks_like_safetensors, read_safetensors
from sdrepl.core.formats.writers import FORMATS, write_embedding, write_png_card

__all__ = [
    "EXTENSIONS",
    "FORMATS",
    "EmbeddingError",
    "NotAnEmbedding",
    "decide_trigger",
    "is_candidate",
    "read_embedding",
    "read_embedding_bytes",
    "read_file_bytes",
    "write_embedding",
    "write_png_card",
]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_candidate(path: Path) -> bool:
    """Cheap name-only check: could ``path`` be an embedding file (extension, not a preview or temp file)?"""
    return skip_reason(path) is None


def read_embedding(path: Path) -> EmbeddingData:
    """Read one embedding file (any supported container and layout); see the module docstring for errors."""
    data, _ = read_file_bytes(Path(path))
    return read_embedding_bytes(Path(path), data)


def read_file_bytes(path: Path, st: os.stat_result | None = None) -> tuple[bytes, os.stat_result]:
    """The bytes and stat of a candidate file, after the name, type and size checks.

    ``st`` saves a stat when the caller has one. Raises NotAnEmbedding for names that are not
    candidates, non-files and zero-byte files, and EmbeddingError for missing, unreadable or oversized files.
    """
    reason = skip_reason(path)
    if reason is not None:
        raise NotAnEmbedding(path, reason)
    try:
        st = st if st is not None else os.stat(path)
    except FileNotFoundError:
        raise EmbeddingError(path, "no such file") from None
    except OSError as exc:
        raise EmbeddingError(path, f"cannot read the file ({exc.strerror or exc})") from None
    if not stat_module.S_ISREG(st.st_mode):
        raise NotAnEmbedding(path, "not a regular file")
    if st.st_size == 0:
        raise NotAnEmbedding(path, "an empty file (probably still being written)")
    if st.st_size > MAX_FILE_BYTES:
        raise EmbeddingError(
            path,
            f"{st.st_size / 2**20:.0f} MiB is far larger than any embedding (at most ~1 MiB): this looks like a model "
            "checkpoint or LoRA; keep it out of the embeddings folder",
        )
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise EmbeddingError(path, f"cannot read the file ({exc.strerror or exc})") from None
    if not data:
        raise NotAnEmbedding(path, "an empty file (probably still being written)")
    return data, st


def read_embedding_bytes(path: Path, data: bytes) -> EmbeddingData:
    """Parse the already-read bytes of ``path`` (the library reads once, then hashes and parses)."""
    path = Path(path)
    try:
        if data.startswith(_PNG_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            return read_image(path, data)
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            raise EmbeddingError(path, f"not a PNG/WEBP picture (starts with bytes {data[:8].hex(' ')}); the file is "
                                 "damaged or has the wrong extension")
        if looks_like_safetensors(data) or (path.suffix.lower() == ".safetensors" and not is_pickle(data)):
            return read_safetensors(path, data)
        return read_pickle(path, data)
    except EmbeddingError:
        raise
    except Exception as exc:  # a parser bug or an exotic failure: still the file's fault, still one error type
        raise EmbeddingError(path, f"cannot read the file ({type(exc).__name__}: {short(exc)})") from None
