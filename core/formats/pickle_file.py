"""Reading ``.pt`` / ``.bin`` / ``.ckpt`` embeddings: PyTorch pickles, opened only with the safe loader.

Unpickling can run arbitrary code, and embedding files are downloaded from strangers. So every pickle is
opened with ``torch.load(weights_only=True, map_location="cpu")``, which only builds tensors and plain
containers. If it refuses a file, the file is reported as not loaded, with the reason; there is no
unsafe fallback, whatever the file is.

One allowance: the original textual-inversion code (and early A1111) pickled ``string_to_param`` as an
``nn.ParameterDict`` module. For that single global name the safe loader is given a harmless stand-in class
that only stores the pickled attributes (no module code runs), and the tensor is taken from its
``_parameters``. Every other global stays refused.
"""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Mapping
from pathlib import Path

import torch

from sdrepl.core.embedding import EmbeddingData
from sdrepl.core.errors import EmbeddingError
from sdrepl.core.formats.common import short
from sdrepl.core.formats.layouts import recognise

_LEGACY_NAMES = ("torch.nn.modules.container.ParameterDict",)
#: The safe loader's allow-list is process-global; adding/removing our stand-in is serialised.
_ALLOW_LOCK = threading.Lock()
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_REFUSAL_MARKS = ("GLOBAL", "unrecognized function", "Can only", "allowlist", "add_safe_globals")


class LegacyModule:
    """Stand-in for a pickled ``nn.Module``: keeps its attributes as data, has no behaviour at all."""

    def __repr__(self) -> str:
        return "LegacyModule()"


def is_pickle(data: bytes) -> bool:
    """Zip-based torch files start with ``PK``; legacy torch files and raw pickles with protocol 2+."""
    return data[:4] == b"PK\x03\x04" or (len(data) > 2 and data[0] == 0x80 and 2 <= data[1] <= 5)


def _load(data: bytes, allow_legacy: bool) -> object:
    if not allow_legacy:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    stand_ins = [(LegacyModule, name) for name in _LEGACY_NAMES]
    with _ALLOW_LOCK, torch.serialization.safe_globals(stand_ins):
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _refusal_detail(message: str) -> str | None:
    """What a weights-only refusal objected to (``it refers to posix.system``), if this is such a refusal."""
    found = _GLOBAL.search(message)
    if found:
        return f"it refers to {found.group(1)}"
    for line in message.splitlines():
        if any(mark in line for mark in _REFUSAL_MARKS):
            detail = line.strip().removeprefix("WeightsUnpickler error:").strip()
            return detail.split(". Please", 1)[0].split(" Please use", 1)[0]
    return None


def _unwrap_legacy(obj: object) -> object:
    """Replace stand-in modules by the plain dict of their ``_parameters`` (top level and string_to_param)."""
    if isinstance(obj, LegacyModule):
        params = getattr(obj, "_parameters", None)
        return dict(params) if isinstance(params, Mapping) else {}
    if isinstance(obj, Mapping):
        return {key: _unwrap_legacy(value) if isinstance(value, LegacyModule) else value for key, value in obj.items()}
    return obj


def read_pickle(path: Path, data: bytes) -> EmbeddingData:
    """Parse the bytes of a pickle-based embedding file; raise EmbeddingError with the reason on failure."""
    if not is_pickle(data):
        raise EmbeddingError(
            path,
            f"not a PyTorch file (starts with bytes {data[:8].hex(' ')}); expected a torch.save zip or pickle: "
            "the file is damaged or has the wrong extension",
        )
    try:
        try:
            obj = _load(data, allow_legacy=False)
        except Exception as exc:
            if not any(name in str(exc) for name in _LEGACY_NAMES):
                raise
            obj = _load(data, allow_legacy=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ValueError, EOFError, ...
        detail = _refusal_detail(str(exc))
        if detail is not None:
            raise EmbeddingError(
                path,
                f"the file contains code or objects that a safe load (torch.load weights_only=True) refuses "
                f"({detail}); it was not loaded. Embedding files need only tensors: if you trust its source, "
                "re-save it as .safetensors with the tool that made it",
            ) from None
        raise EmbeddingError(
            path, f"truncated or corrupt PyTorch file ({type(exc).__name__}: {short(exc)}); download it again"
        ) from None
    container = path.suffix.lower().lstrip(".") or "pt"
    return recognise(_unwrap_legacy(obj), path, container)
