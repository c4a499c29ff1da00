"""Reading ``.pt`` / ``.bin`` / ``.ckpt`` files: PyTorch pickles, inspected first, then opened only with the
safe loader.

Unpickling can run arbitrary code and allocate arbitrary memory, and embedding files are downloaded from
strangers. So every file is first inspected by :mod:`.pickle_scan` (zip members, opcodes, globals against an
allow-list, declared sizes against :class:`~sdrepl.core.formats.limits.Limits`, all without building a
tensor), and only then opened with ``torch.load(weights_only=True, map_location="cpu")``, which only builds
tensors and plain containers. A refusal says what was found; there is no unsafe fallback.

One allowance: the original textual-inversion code (and early A1111) pickled ``string_to_param`` as an
``nn.ParameterDict`` module. For that single global name the safe loader is given a harmless stand-in class
that only stores the pickled attributes (no module code runs), and the tensor is taken from its
``_parameters``. Every other global stays refused.

:func:`load_torch_file` is the container part alone (the unpickled object, for any kind of tensor file);
:func:`read_pickle` adds the embedding layouts.
"""

from __future__ import annotations

import io
import pickle
import threading
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from sdrepl.core.embedding import EmbeddingData
from sdrepl.core.errors import EmbeddingError
from sdrepl.core.formats.common import short
from sdrepl.core.formats.layouts import recognise
from sdrepl.core.formats.limits import EMBEDDING_LIMITS, Limits
from sdrepl.core.formats.pickle_scan import LegacyModule, PickleRefused, inspect_torch_file, scan_opcodes

__all__ = ["LegacyModule", "is_pickle", "load_torch_file", "read_pickle"]

_LEGACY_NAMES = ("torch.nn.modules.container.ParameterDict",)
#: The safe loader's allow-list is process-global; adding/removing our stand-in is serialised.
_ALLOW_LOCK = threading.Lock()
#: What torch.load raises for a file that passed inspection but is still damaged (a bad storage member,
#: a CRC mismatch, a pickle that the real loader reads differently).
_LOAD_ERRORS = (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
                AttributeError, OSError, zipfile.BadZipFile, NotImplementedError)


def is_pickle(data: bytes) -> bool:
    """Zip-based torch files start with ``PK``; legacy torch files and raw pickles with protocol 2+."""
    return data[:4] == b"PK\x03\x04" or (len(data) > 2 and data[0] == 0x80 and 2 <= data[1] <= 5)


def _load(data: bytes, allow_legacy: bool) -> object:
    if not allow_legacy:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    stand_ins = [(LegacyModule, name) for name in _LEGACY_NAMES]
    with _ALLOW_LOCK, torch.serialization.safe_globals(stand_ins):
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _unwrap_legacy(obj: object) -> object:
    """Replace stand-in modules by the plain dict of their ``_parameters`` (top level and string_to_param)."""
    if isinstance(obj, LegacyModule):
        params = getattr(obj, "_parameters", None)
        return dict(params) if isinstance(params, Mapping) else {}
    if isinstance(obj, Mapping):
        return {key: _unwrap_legacy(value) if isinstance(value, LegacyModule) else value for key, value in obj.items()}
    return obj


def refusal(reason: str, hostile: bool) -> str:
    """The user-facing text of a refusal: what was found, that nothing ran, and what to do."""
    if hostile:
        return (f"refused by the safe loader: {reason}. It was not loaded and nothing in it ran; files that hold "
                "only tensors never look like this. If you trust its source, re-save it as .safetensors with the "
                "tool that made it")
    return f"not a readable PyTorch file: {reason}; download it again or re-save it"


def load_torch_file(path: Path, data: bytes, limits: Limits = EMBEDDING_LIMITS, *,
                    error: type[EmbeddingError] = EmbeddingError) -> object:
    """The object a ``torch.save`` file holds (tensors on the CPU), after inspection within ``limits``.

    Raises ``error(path, reason)`` (an :class:`EmbeddingError` by default) for anything refused or damaged.
    """
    if not is_pickle(data):
        try:  # a protocol 0/1 pickle starts with a text opcode: say what it reaches for, if anything
            scan_opcodes(data[: limits.max_pickle_bytes], limits)
        except PickleRefused as exc:
            if exc.hostile:
                raise error(path, refusal(exc.reason, True)) from None
        raise error(path, "does not start like a PyTorch file (neither a torch.save zip nor a pickle): the file "
                    "is damaged or has the wrong extension")
    try:
        inspection = inspect_torch_file(data, limits)
    except PickleRefused as exc:
        raise error(path, refusal(exc.reason, exc.hostile)) from None
    try:
        obj = _load(data, allow_legacy=inspection.needs_legacy_module)
    except _LOAD_ERRORS as exc:
        raise error(
            path, f"truncated or corrupt PyTorch file ({type(exc).__name__}: {short(exc)}); download it again"
        ) from None
    return _unwrap_legacy(obj)


def read_pickle(path: Path, data: bytes, limits: Limits = EMBEDDING_LIMITS) -> EmbeddingData:
    """Parse the bytes of a pickle-based embedding file; raise EmbeddingError with the reason on failure."""
    obj = load_torch_file(path, data, limits)
    container = path.suffix.lower().lstrip(".") or "pt"
    return recognise(obj, path, container)
