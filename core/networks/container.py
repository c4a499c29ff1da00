"""Opening LoRA and hypernetwork files: header first, tensors on demand, nothing that can run code.

- **safetensors**: only the header is read to index a file (names, dtypes, shapes, string metadata), and it
  is checked against the file's size, so a truncated download is reported as such before any tensor is
  touched. Tensors are read later, one by one, through safetensors' own reader.
- **pickles** (``.pt`` / ``.bin`` / ``.ckpt``): :func:`sdrepl.core.formats.pickle_file.load_torch_file`
  with :func:`~sdrepl.core.formats.limits.lora_limits` (inspected first, then ``torch.load(weights_only=True,
  map_location="cpu")``, so files saved with CUDA storages load on a machine without CUDA, and a pickle
  that would run code is refused by name). A pickle has no header, so
  indexing one reads it whole; the tensors are kept for the first use.

Every failure is a :class:`NetworkError` naming the file and saying what was wrong.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat as stat_module
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from sdrepl.core.errors import NetworkError
from sdrepl.core.formats.common import short
from sdrepl.core.formats.pickle_file import is_pickle
from sdrepl.core.safe_open import file_kind, read_at_most

#: Extensions of LoRA / hypernetwork files (case-insensitive).
NETWORK_EXTENSIONS = frozenset({".safetensors", ".pt", ".bin", ".ckpt"})
#: The largest file opened (a full-rank SDXL LyCORIS is a few GiB; anything larger is a checkpoint).
MAX_NETWORK_BYTES = 4 * 2**30
#: A pickle is read whole into memory to be indexed: bounded tighter.
MAX_PICKLE_BYTES = 1 * 2**30
_MAX_HEADER = 64 * 2**20
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


@dataclass
class Header:
    """What an index needs from a file: tensor shapes, string metadata, and where the data starts."""

    container: str  # "safetensors" | "pt" | "bin" | "ckpt"
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str] = field(default_factory=dict)
    #: Byte offset of the tensor data (safetensors: 8 + header length), for the addnet hash.
    data_offset: int = 0
    #: A pickle's tensors (read whole to index it); None for safetensors (read on demand).
    tensors: dict[str, torch.Tensor] | None = None
    #: Non-tensor values of a pickle (hypernetworks keep their settings this way).
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def _open(path: Path) -> Iterator[BinaryIO]:
    """``path`` opened for reading by :func:`~sdrepl.core.safe_open.open_regular_file`.

    A name in a watched folder can become a FIFO between the ``stat`` and the ``open``; a plain ``open``
    would then wait for a writer forever and block the LoRA watcher. Failures are NetworkErrors.
    """
    from sdrepl.core.safe_open import UnsafeFile, open_regular_file

    try:
        with open_regular_file(path, MAX_NETWORK_BYTES) as (fh, _):
            yield fh
    except UnsafeFile as exc:
        raise NetworkError(path, f"{exc.reason}: not opened") from None
    except OSError as exc:
        raise NetworkError(path, f"cannot read the file ({exc.strerror or exc})") from None


def _safetensors_header(path: Path, size: int) -> Header:
    with _open(path) as fh:
        head = read_at_most(fh, 8)
        if len(head) < 8:
            raise NetworkError(path, f"truncated safetensors file ({size} bytes; the header alone needs 8+)")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8 or length > _MAX_HEADER:
            raise NetworkError(path, f"the safetensors header claims {length} bytes but the file has only "
                                     f"{size - 8} after the length field: the file is truncated")
        raw = read_at_most(fh, length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise NetworkError(path, f"the safetensors header is not valid JSON ({short(exc)}); the file is damaged") from None
    if not isinstance(header, dict):
        raise NetworkError(path, "the safetensors header is not a JSON object; the file is damaged")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise NetworkError(path, "the safetensors __metadata__ is not an object; the file is damaged")
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    body = size - 8 - length
    shapes: dict[str, tuple[int, ...]] = {}
    for name, entry in header.items():
        where = f"tensor {name!r}"
        if not isinstance(entry, dict):
            raise NetworkError(path, f"{where}: header entry is not an object; the file is damaged")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _DTYPE_BYTES or not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise NetworkError(path, f"{where}: dtype {dtype!r} / shape {shape!r} are not valid; the file is damaged")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= body):
            raise NetworkError(path, f"{where}: its bytes {offsets!r} lie outside the {body} data bytes: the file "
                                     "is truncated; download it again")
        if offsets[1] - offsets[0] != math.prod(shape) * _DTYPE_BYTES[dtype]:
            raise NetworkError(path, f"{where}: shape {shape} {dtype} does not fit its byte range; the file is damaged")
        shapes[name] = tuple(shape)
    return Header("safetensors", shapes, meta, 8 + length)


def _pickle_header(path: Path, size: int) -> Header:
    from sdrepl.core.formats.limits import lora_limits
    from sdrepl.core.formats.pickle_file import load_torch_file
    from sdrepl.core.safe_open import UnsafeFile, read_regular_file

    if size > MAX_PICKLE_BYTES:
        raise NetworkError(path, f"a {size / 2**20:.0f} MiB pickle is larger than any LoRA sdrepl reads as a pickle "
                                 f"({MAX_PICKLE_BYTES // 2**20} MiB); convert it to .safetensors")
    try:
        data, _ = read_regular_file(path, MAX_PICKLE_BYTES)
    except UnsafeFile as exc:
        raise NetworkError(path, str(exc)) from None
    obj = load_torch_file(path, data, lora_limits(size), error=NetworkError)  # type: ignore[arg-type]
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) and len(obj) <= 4:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise NetworkError(path, f"holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {str(k): v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    extra = {k: v for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))}
    container = path.suffix.lower().lstrip(".") or "pt"
    return Header(container, {k: tuple(v.shape) for k, v in tensors.items()}, {}, 0, tensors, extra)


def read_header(path: Path) -> Header:
    """Index ``path`` cheaply (see module docstring); raise NetworkError on any failure."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise NetworkError(path, f"cannot read the file ({exc.strerror or exc})") from None
    if not stat_module.S_ISREG(st.st_mode):
        raise NetworkError(path, f"{file_kind(st.st_mode)}, not a regular file: not opened")
    size = st.st_size
    if size > MAX_NETWORK_BYTES:
        raise NetworkError(path, f"{size / 2**30:.1f} GiB is larger than any LoRA ({MAX_NETWORK_BYTES // 2**30} GiB "
                                 "at most): this looks like a model checkpoint; keep it out of the LoRA folder")
    with _open(path) as fh:
        head = read_at_most(fh, 9)
    if len(head) >= 9 and head[8:9] == b"{":
        return _safetensors_header(path, size)
    if path.suffix.lower() == ".safetensors" and not is_pickle(head + b"\0\0\0"):
        return _safetensors_header(path, size)
    try:
        return _pickle_header(path, size)
    except NetworkError:
        raise
    except Exception as exc:
        raise NetworkError(path, f"cannot read the file ({type(exc).__name__}: {short(exc)})") from None


def read_tensors(path: Path, header: Header, keys: list[str]) -> dict[str, torch.Tensor]:
    """The tensors ``keys`` of an indexed file, on the CPU (float types kept as stored)."""
    if header.tensors is not None:
        return {k: header.tensors[k] for k in keys}
    from safetensors import safe_open

    try:
        with _open(path) as raw:
            # Read through the descriptor already checked to be a regular file, so a FIFO swapped in under
            # the name cannot block safetensors' own open (Linux: /proc/self/fd; elsewhere the name).
            fd_path = f"/proc/self/fd/{raw.fileno()}"
            where = fd_path if os.path.exists(fd_path) else str(path)
            with safe_open(where, framework="pt", device="cpu") as fh:
                return {k: fh.get_tensor(k) for k in keys}
    except NetworkError:
        raise
    except Exception as exc:
        raise NetworkError(path, f"cannot read its tensors ({short(exc)}); the file changed or is damaged") from None


def addnet_hash(path: Path, header: Header) -> str:
    """A1111's "addnet" hash: sha256 of the bytes after the safetensors header (the whole file otherwise)."""
    import hashlib

    digest = hashlib.sha256()
    with _open(path) as fh:
        fh.seek(header.data_offset)
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
