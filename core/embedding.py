"""The embedding record shared by the readers, the library, the prompt language and conditioning.

A reader turns a file into :class:`EmbeddingData` (tensors plus what the file says about itself); the
library decides the trigger, checks it against the model and keeps an :class:`Embedding` per file.
Vectors are kept on the CPU in float32: they are a few KiB each, and conditioning moves the ones a prompt
uses to the model's device, so reloading embeddings never touches the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

#: Encoder key for files made for a single-text-encoder model (SD 1.x: 768 wide, SD 2.x: 1024 wide).
SINGLE = "text_encoder"
#: Encoder keys of SDXL pair files (``clip_l`` [N, 768], ``clip_g`` [N, 1280]).
CLIP_L = "clip_l"
CLIP_G = "clip_g"

#: An embedding never fits a CLIP chunk if it has more vectors than this.
MAX_VECTORS = 75


@dataclass(frozen=True)
class EmbeddingData:
    """What a reader found in one file: vectors per encoder key, each ``[N, D]`` float32 on the CPU."""

    vectors: dict[str, torch.Tensor] = field(repr=False)
    format: str = ""
    #: The name stored inside the file (A1111 ``name``, a diffusers token without ``<>``, a PNG's name).
    inner_name: str | None = None
    step: int | None = None
    checkpoint_hash: str | None = None
    checkpoint_name: str | None = None
    init_text: str | None = None
    #: Whether the trigger comes from the file (PNG cards, generic ``learned_embeds`` files) not the stem.
    name_from_file: bool = False
    #: The LoRA file that bundles this embedding (``bundle_emb.*``, cloneofsimo ``<s1>``), or None.
    source: str | None = None

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def widths(self) -> dict[str, int]:
        return {key: int(t.shape[1]) for key, t in self.vectors.items()}


@dataclass(frozen=True)
class Embedding:
    """One loaded embedding, as the library serves it."""

    trigger: str
    #: ``folder/trigger`` relative to the embeddings root it was found under; reaches it when names collide.
    qualified: str
    path: Path
    data: EmbeddingData
    #: Full hex sha256 of the file; A1111's ``TI hashes`` use the first 12 characters.
    sha256: str
    size: int = 0
    mtime_ns: int = 0
    warnings: tuple[str, ...] = field(default=())
    #: Other files under this trigger with identical vectors (a ``!convert`` copy): one embedding, several
    #: files; ``path`` is the one that takes precedence (see ``core/library_state.py``).
    copies: tuple[Path, ...] = field(default=())

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file holding this embedding: ``path`` first, then its identical copies."""
        return (self.path, *self.copies)

    @property
    def key(self) -> str:
        """The case-insensitive lookup key (CLIP lowercases text, so triggers do too)."""
        return self.trigger.lower()

    @property
    def short_hash(self) -> str:
        return self.sha256[:12]

    @property
    def num_vectors(self) -> int:
        return self.data.num_vectors

    @property
    def vectors(self) -> dict[str, torch.Tensor]:
        return self.data.vectors

    def describe(self) -> dict[str, object]:
        """The JSON-safe summary used by ``!embeddings`` and the protocol."""
        widths = self.data.widths
        return {
            "name": self.trigger,
            "qualified": self.qualified,
            "vectors": self.num_vectors,
            "width": widths.get(SINGLE, widths),
            "format": self.data.format,
            "path": str(self.path),
            "hash": self.short_hash,
            "step": self.data.step,
            "checkpoint": self.data.checkpoint_name or self.data.checkpoint_hash,
            "init_text": self.data.init_text,
            "source": self.data.source,
            "files": [str(p) for p in self.files],
        }


@dataclass(frozen=True)
class Skipped:
    """A file in an embeddings folder that is neither loaded nor silently ignored, and why."""

    path: Path
    reason: str

    def describe(self) -> dict[str, str]:
        return {"path": str(self.path), "reason": self.reason}
