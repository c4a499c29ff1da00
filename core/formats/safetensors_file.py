"""Reading and encoding ``.safetensors`` embeddings.

A safetensors file is an 8-byte little-endian header length, a JSON header (tensor names, dtypes, shapes,
byte ranges, and optional string ``__metadata__``), then raw tensor bytes. It cannot run code. The header
is checked here first, so a file that lies about its length or its byte ranges gets a message saying
exactly that, and a LoRA or model dropped into the embeddings folder is recognised from its header
alone; the tensors are then decoded by the safetensors library.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from sdrepl.core.embedding import EmbeddingData
from sdrepl.core.errors import EmbeddingError
from sdrepl.core.formats.common import short
from sdrepl.core.formats.layouts import recognise
from sdrepl.core.formats.limits import EMBEDDING_LIMITS, Limits

#: Byte size per element of the dtypes safetensors knows (bool and 8-bit types included).
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
    "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
_MAX_HEADER = 16 * 1024 * 1024


def looks_like_safetensors(data: bytes) -> bool:
    """A plausible header length followed by ``{``: cheap content sniffing, independent of the extension."""
    if len(data) < 10:
        return False
    (length,) = struct.unpack("<Q", data[:8])
    return 2 <= length <= len(data) - 8 and data[8:9] == b"{"


def parse_header(path: Path, data: bytes, limits: Limits | None = EMBEDDING_LIMITS, *,
                 error: type[EmbeddingError] = EmbeddingError) -> tuple[dict[str, dict], dict[str, str]]:
    """Validate the header against the file size and ``limits``; return (tensor entries, string metadata).

    Raises ``error(path, reason)``. ``limits=None`` checks the structure only (see :func:`check_limits`).
    """
    try:
        return _parse_header(path, data, limits)
    except EmbeddingError as exc:
        if error is EmbeddingError:
            raise
        raise error(path, exc.reason) from None


def _parse_header(path: Path, data: bytes, limits: Limits | None) -> tuple[dict[str, dict], dict[str, str]]:
    if len(data) < 8:
        raise EmbeddingError(path, f"truncated safetensors file ({len(data)} bytes; the header alone needs 8+)")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8 or length > _MAX_HEADER:
        raise EmbeddingError(
            path,
            f"the safetensors header claims {length} bytes but the file has only {len(data) - 8} after the "
            "length field: the file is truncated or not a safetensors file",
        )
    try:
        header = json.loads(data[8 : 8 + length].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise EmbeddingError(path, f"the safetensors header is not valid JSON ({short(exc)}); the file is damaged") from None
    if not isinstance(header, dict):
        raise EmbeddingError(path, f"the safetensors header is a JSON {type(header).__name__}, expected an object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise EmbeddingError(path, "the safetensors __metadata__ must map names to strings; the file is damaged")
    body = len(data) - 8 - length
    for name, entry in header.items():
        _check_entry(path, name, entry, body)
    if limits is not None:
        check_limits(path, header, limits)
    return header, meta


def check_limits(path: Path, header: Mapping[str, dict], limits: Limits) -> None:
    """Tensor count, per-tensor and total values of a parsed header within ``limits`` (EmbeddingError)."""
    article = "an" if limits.kind[:1].lower() in "aeiou" else "a"
    if len(header) > limits.max_tensors:
        raise EmbeddingError(path, f"holds {len(header)} tensors ({_summary(header, 3)}), more than {article} "
                             f"{limits.kind} ever has ({limits.max_tensors}): this is a model or LoRA, not "
                             f"{article} {limits.kind}; keep it out of the {limits.kind}s folder")
    total = 0
    for name, entry in header.items():
        values = math.prod(entry["shape"])
        total += values
        if values > limits.max_tensor_values:
            raise EmbeddingError(path, f"safetensors tensor {name!r} [{', '.join(map(str, entry['shape']))}] holds "
                                 f"{values:,} values, far more than any {limits.kind} holds "
                                 f"({limits.max_tensor_values:,} values at most)")
    if total > limits.max_total_values:
        raise EmbeddingError(path, f"its tensors hold {total:,} values in all, far more than any {limits.kind} holds "
                             f"({limits.max_total_values:,} values at most)")


def _check_entry(path: Path, name: str, entry: object, body: int) -> None:
    where = f"safetensors tensor {name!r}"
    if not isinstance(entry, dict):
        raise EmbeddingError(path, f"{where}: header entry is not an object; the file is damaged")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPE_BYTES:
        raise EmbeddingError(path, f"{where}: unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise EmbeddingError(path, f"{where}: shape {shape!r} is not a list of sizes")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        and 0 <= offsets[0] <= offsets[1] <= body
    ):
        raise EmbeddingError(
            path, f"{where}: byte range {offsets!r} lies outside the {body} data bytes: the file is truncated"
        )
    if offsets[1] - offsets[0] != math.prod(shape) * _DTYPE_BYTES[dtype]:
        raise EmbeddingError(
            path, f"{where}: shape {shape} {dtype} needs {math.prod(shape) * _DTYPE_BYTES[dtype]} bytes but the "
            f"header gives it {offsets[1] - offsets[0]}: the file is damaged",
        )


def _summary(header: Mapping[str, dict], limit: int = 6) -> str:
    parts = [f"{name!r} [{', '.join(map(str, entry['shape']))}] {entry['dtype']}" for name, entry in list(header.items())[:limit]]
    if len(header) > limit:
        parts.append(f"... {len(header) - limit} more")
    return ", ".join(parts)


def load_safetensors_file(path: Path, data: bytes, limits: Limits = EMBEDDING_LIMITS, *,
                          error: type[EmbeddingError] = EmbeddingError) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, string metadata) of a safetensors file, after the header checks within ``limits``.

    Raises ``error(path, reason)`` (an :class:`EmbeddingError` by default).
    """
    _header, meta = parse_header(path, data, limits, error=error)
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    try:
        tensors: dict[str, torch.Tensor] = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError, TypeError) as exc:
        raise error(path, f"cannot decode the safetensors data ({short(exc)}); the file is damaged") from None
    return tensors, meta


def read_safetensors(path: Path, data: bytes, limits: Limits = EMBEDDING_LIMITS) -> EmbeddingData:
    """Parse the bytes of a safetensors embedding; raise EmbeddingError with the reason on failure."""
    header, _meta = parse_header(path, data, None)
    if any(name.startswith("bundle_emb.") for name in header):
        raise EmbeddingError(
            path,
            "this is a LoRA with bundled embeddings (bundle_emb.* keys); put it in a LoRA folder (--loras, "
            "default ./loras): its embeddings are usable from there while the file is in it",
        )
    check_limits(path, header, limits)
    tensors, meta = load_safetensors_file(path, data, limits)
    return recognise(tensors, path, "safetensors", metadata=meta)


def encode_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The bytes of a safetensors file holding ``tensors`` (contiguous CPU) and string ``metadata``."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
