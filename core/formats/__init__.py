"""Readers and writers of embedding files, one module per container (see docs/architecture.md).

``read_embedding`` opens any file an embeddings folder may hold and returns :class:`EmbeddingData`, or
raises :class:`EmbeddingError` (broken or unsupported: listed as skipped, with the reason) or its
subclass :class:`NotAnEmbedding` (not an embedding at all: ignored silently). The container is chosen
by content, not only by extension (a ``.pt`` that is really safetensors still loads); the dict inside
is recognised by :mod:`.layouts`. Each reader catches what its parsers are documented (or known) to raise
for damaged input and turns it into an EmbeddingError naming the file; anything else is a bug in sdrepl and
propagates, so tests (the fuzz test over mutated fixtures) see it. The library is the boundary that keeps
the daemon up whatever happens: it logs such an exception with the file name and skips the file.

Every size a file declares is checked against :data:`~.limits.EMBEDDING_LIMITS` before it is allocated
(see :mod:`.limits`), files are opened through :func:`sdrepl.core.safe_open.read_regular_file` (never
blocks on a FIFO, never reads more than the cap), and pickles pass :mod:`.pickle_scan` before torch sees them.

``EmbeddingData.format`` is ``<container>/<layout>``: containers ``pt``, ``bin``, ``ckpt``,
``safetensors``, ``png-text``, ``png-pixels``, ``webp-pixels``; layouts ``a1111``, ``emb_params``,
``diffusers``, ``sdxl``.

Modules: ``common`` (skip rules, shape-only descriptions), ``layouts`` (dict layouts, triggers),
``limits`` (what a file may cost), ``pickle_scan`` (the inspection in front of torch.load), ``pickle_file``
(safe torch.load), ``safetensors_file``, ``png_chunks`` and ``image_card`` (A1111 PNG/WEBP cards), ``writers``.
"""

from __future__ import annotations

import os
from pathlib import Path

from sdrepl.core.embedding import EmbeddingData
from sdrepl.core.errors import EmbeddingError
from sdrepl.core.formats.common import (
    EXTENSIONS,
    IMAGE_EXTENSIONS,
    NotAnEmbedding,
    skip_reason,
)
from sdrepl.core.formats.image_card import read_image
from sdrepl.core.formats.layouts import decide_trigger
from sdrepl.core.formats.limits import EMBEDDING_LIMITS, Limits
from sdrepl.core.formats.pickle_file import is_pickle, read_pickle
from sdrepl.core.formats.safetensors_file import looks_like_safetensors, read_safetensors
from sdrepl.core.formats.writers import FORMATS, write_embedding, write_png_card
from sdrepl.core.safe_open import UnsafeFile, read_regular_file

__all__ = [
    "EXTENSIONS",
    "FORMATS",
    "EMBEDDING_LIMITS",
    "EmbeddingError",
    "Limits",
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


def read_embedding(path: Path, limits: Limits = EMBEDDING_LIMITS) -> EmbeddingData:
    """Read one embedding file (any supported container and layout); see the module docstring for errors."""
    data, _ = read_file_bytes(Path(path), limits=limits)
    return read_embedding_bytes(Path(path), data, limits)


def read_file_bytes(
    path: Path, st: os.stat_result | None = None, limits: Limits = EMBEDDING_LIMITS
) -> tuple[bytes, os.stat_result]:
    """The bytes and ``fstat`` of a candidate file, after the name, type and size checks.

    ``st`` saves a stat when the caller has one. Raises NotAnEmbedding for names that are not
    candidates, non-files (FIFOs, sockets, devices: refused without blocking) and zero-byte files, and
    EmbeddingError for missing, unreadable or oversized files.
    """
    reason = skip_reason(path)
    if reason is not None:
        raise NotAnEmbedding(path, reason)
    try:
        data, st = read_regular_file(path, limits.max_file_bytes, st=st)
    except UnsafeFile as exc:
        if not exc.too_large:
            raise NotAnEmbedding(path, exc.reason) from None
        raise EmbeddingError(
            path,
            f"{exc.size / 2**20:.0f} MiB is far larger than any embedding (at most ~1 MiB): this looks like a model "
            "checkpoint or LoRA; keep it out of the embeddings folder",
        ) from None
    except FileNotFoundError:
        raise EmbeddingError(path, "no such file") from None
    except OSError as exc:
        raise EmbeddingError(path, f"cannot read the file ({exc.strerror or exc})") from None
    if not data:
        raise NotAnEmbedding(path, "an empty file (probably still being written)")
    return data, st


def _looks_like(data: bytes) -> str:
    """What the start of a file looks like, in words (never its bytes: the file may be a link to a secret)."""
    head = data[:64]
    if head[:2] == b"\xff\xd8":
        return "a JPEG picture"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "a GIF picture"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary data of no known container"
    return "text"


def read_embedding_bytes(path: Path, data: bytes, limits: Limits = EMBEDDING_LIMITS) -> EmbeddingData:
    """Parse the already-read bytes of ``path`` (the library reads once, then hashes and parses).

    The container is chosen by content first: a ``.pt`` that is really a PNG is read as a PNG card.
    """
    path = Path(path)
    if data.startswith(_PNG_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return read_image(path, data, limits)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        raise EmbeddingError(path, f"not a PNG/WEBP picture (it holds {_looks_like(data)}); the file is damaged or "
                             "has the wrong extension")
    if looks_like_safetensors(data) or (path.suffix.lower() == ".safetensors" and not is_pickle(data)):
        return read_safetensors(path, data, limits)
    return read_pickle(path, data, limits)
