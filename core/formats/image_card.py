"""A1111 "image embeddings": an embedding carried by a PNG/WEBP picture, read and written.

Two carriers hold the same A1111 dict (spec section 2):

1. a PNG text chunk ``sd-ti-embedding``: base64 of JSON in which tensors are ``{"TORCHTENSOR": [[...]]}``;
2. a pixel "data cube" that survives image hosts stripping text chunks: the same JSON, zlib-compressed,
   split into low and high nibbles, each stream repeated cyclically into an RGB block of the picture's
   height, XOR-ed with a fixed LCG stream (low bits) and a decorative dot pattern (high bits), and pasted
   left (low) and right (high) of the preview, each behind a 1-pixel black column.

A picture with neither carrier is a preview or an ordinary picture: :class:`NotAnEmbedding`, skipped
silently. A picture that carries something that fails to decode is an :class:`EmbeddingError`.
The writer side builds the same picture, so the cards load in A1111 too.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import struct
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from sdrepl.core.embedding import EmbeddingData
from sdrepl.core.errors import EmbeddingError
from sdrepl.core.formats.common import NotAnEmbedding, short
from sdrepl.core.formats.layouts import recognise
from sdrepl.core.formats.limits import EMBEDDING_LIMITS, Limits
from sdrepl.core.formats.png_chunks import PNG_MAGIC, PngRefused, read_png_header

TEXT_KEY = "sd-ti-embedding"
TENSOR_KEY = "TORCHTENSOR"
_DEPTH = 3  # RGB


# ---------------------------------------------------------------- the LCG and the data cube


def _lcg_nibbles(count: int) -> np.ndarray:
    """The first ``count`` outputs of the LCG (m=2^32, a=1664525, c=1013904223, seed 0) % 255 & 0x0F."""
    return _lcg_table(max(1024, 1 << max(0, count - 1).bit_length()))[:count]


@lru_cache(maxsize=4)
def _lcg_table(count: int) -> np.ndarray:
    """``count`` LCG nibbles, computed by doubling instead of a Python loop over up to millions of values.

    x[k + j] = A_k * x[j] + C_k (mod 2^32) with A_k = a^k, C_k = c * (a^(k-1) + ... + 1); the products fit
    in uint64 because both factors are below 2^32.
    """
    a, c, mask = 1664525, 1013904223, (1 << 32) - 1
    values = np.array([c & mask], dtype=np.uint64)  # x1 = (a * 0 + c) mod 2^32
    step_a, step_c = a, c  # advances an element by len(values) positions
    while values.size < count:
        nxt = (values * np.uint64(step_a) + np.uint64(step_c)) & np.uint64(mask)
        values = np.concatenate([values, nxt])
        step_a, step_c = (step_a * step_a) & mask, (step_a * step_c + step_c) & mask
    out = ((values[:count] % np.uint64(255)) & np.uint64(0x0F)).astype(np.uint8)
    out.setflags(write=False)
    return out


def _xor_lcg(block: np.ndarray) -> np.ndarray:
    return np.bitwise_xor(block, _lcg_nibbles(block.size).reshape(block.shape))


def _crop_black(rgb: np.ndarray) -> np.ndarray:
    """Crop the border rows/columns in which no pixel is bright in all three channels (A1111's crop)."""
    lit = (rgb > 0).all(axis=2)
    cols, rows = lit.any(axis=0), lit.any(axis=1)
    if not cols.any():
        return rgb[:0, :0]
    c0, c1 = int(cols.argmax()), len(cols) - int(cols[::-1].argmax())
    r0, r1 = int(rows.argmax()), len(rows) - int(rows[::-1].argmax())
    return rgb[r0:r1, c0:c1]


def extract_payload(rgb: np.ndarray) -> bytes | None:
    """The zlib stream hidden in a picture's pixels, or None when the picture has no data cube."""
    nibbles = _crop_black(rgb) & 0x0F
    zero_cols = np.flatnonzero(nibbles.sum(axis=(0, 2)) == 0)
    if zero_cols.size < 2:
        return None
    low, high = nibbles[:, : zero_cols[0]], nibbles[:, zero_cols[-1] + 1 :]
    if low.size == 0 or low.shape != high.shape:
        return None
    payload = ((_xor_lcg(high) << 4) | _xor_lcg(low)).astype(np.uint8).tobytes()
    # A1111 compresses with zlib level 9: the stream starts with a valid zlib header (0x78 ..).
    if len(payload) < 2 or payload[0] != 0x78 or (payload[0] * 256 + payload[1]) % 31 or payload[1] & 0x20:
        return None
    return payload


def _style_block(block: np.ndarray, sequence: list[int]) -> np.ndarray:
    """XOR A1111's decorative dot pattern into the high nibbles (cosmetic; decoding masks it away)."""
    from PIL import Image, ImageDraw

    height, width = block.shape[:2]
    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    i = 0
    for x in range(-6, width, 8):
        for yi, y in enumerate(range(-6, height, 8)):
            offset = 4 if yi % 2 == 0 else 0
            shade = sequence[i % len(sequence)]
            i += 1
            draw.ellipse((x + offset, y, x + 6 + offset, y + 6), fill=(shade, shade, shade))
    return block ^ (np.asarray(canvas, dtype=np.uint8) & 0xF0)


def build_data_cube(payload: bytes, height: int, first_vector: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The low- and high-nibble RGB blocks (``[height, k, 3]`` uint8) for a compressed payload."""
    data = np.frombuffer(payload, dtype=np.uint8)
    size = data.size + (height - data.size % height)  # A1111's padding, kept for identical pictures
    size += height * _DEPTH - size % (height * _DEPTH)
    shades = first_vector.abs()[:1024]
    peak = float(shades.max()) or 1.0
    sequence = [int(v) for v in (shades / peak * 255).to(torch.uint8).tolist()] or [255]
    blocks = []
    for stream, seq in ((data & 0x0F, sequence), (data >> 4, sequence[::-1])):
        block = np.resize(stream, size).reshape(height, -1, _DEPTH).astype(np.uint8)
        blocks.append(_xor_lcg(_style_block(block, seq)))
    return blocks[0], blocks[1]


# ---------------------------------------------------------------- JSON with tensors


def _tensor_hook(obj: dict) -> object:
    if TENSOR_KEY in obj:
        return torch.tensor(obj[TENSOR_KEY], dtype=torch.float64)
    return obj


def _to_jsonable(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return {TENSOR_KEY: value.detach().cpu().tolist()}
    if isinstance(value, dict):
        return {k: _to_jsonable(v) for k, v in value.items()}
    return value


def encode_json(card: dict) -> bytes:
    """A1111's JSON of an embedding dict, tensors as ``{"TORCHTENSOR": nested lists}`` (exact for float32)."""
    return json.dumps(_to_jsonable(card)).encode("utf-8")


class _TooManyNumbers(ValueError):
    pass


def _decode_json(path: Path, raw: bytes, carrier: str, limits: Limits) -> object:
    """The card's JSON with tensors, parsing at most ``limits.max_json_numbers`` numbers."""
    if len(raw) > limits.max_json_bytes:
        raise EmbeddingError(path, f"the {carrier} holds {len(raw):,} bytes of JSON, more than any embedding card "
                             f"({limits.max_json_bytes:,}); it was not parsed")
    count = 0

    def number(text: str) -> float | int:
        nonlocal count
        count += 1
        if count > limits.max_json_numbers:
            raise _TooManyNumbers(f"more than {limits.max_json_numbers:,} numbers, more than any embedding holds")
        return float(text) if any(c in text for c in ".eE") else int(text)

    try:
        return json.loads(raw.decode("utf-8"), object_hook=_tensor_hook, parse_float=number, parse_int=number)
    except (ValueError, TypeError, RecursionError, OverflowError, RuntimeError) as exc:
        # JSON and unicode errors are ValueErrors; ragged TORCHTENSOR lists raise ValueError/TypeError in torch
        raise EmbeddingError(path, f"the {carrier} does not hold valid embedding JSON ({short(exc)})") from None


# ---------------------------------------------------------------- reading


def _text_card(path: Path, data: bytes, limits: Limits) -> tuple[int, int, str | None]:
    """(width, height, sd-ti-embedding text) of a PNG from its chunk list, nothing decoded."""
    text_limit = limits.max_json_bytes * 4 // 3 + 4
    try:
        header = read_png_header(data, TEXT_KEY, text_limit)
    except PngRefused as exc:
        if exc.damaged:
            raise EmbeddingError(path, f"cannot be read as a picture ({exc.reason}); the file is damaged or not a "
                                 "PNG/WEBP") from None
        raise EmbeddingError(path, f"{exc.reason}; it was not decoded") from None
    return header.width, header.height, header.text


def read_image(path: Path, data: bytes, limits: Limits = EMBEDDING_LIMITS) -> EmbeddingData:
    """Read an image card from its text chunk or, failing that, its pixels (see module docstring).

    Every size is checked before the matching work: the declared width x height before any pixel is
    decoded, the text chunk's length and inflated size, the JSON's length and count of numbers.
    """
    from PIL import Image

    kind = "png" if data.startswith(PNG_MAGIC) else "webp"  # by content: a .pt that is a PNG is a PNG card
    if data.startswith(PNG_MAGIC):
        width, height, text = _text_card(path, data, limits)
        image = None
    else:
        try:
            image = Image.open(io.BytesIO(data))  # lazy: reads the header only
            width, height = image.size
            text = image.info.get(TEXT_KEY)
        except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError) as exc:
            raise EmbeddingError(path, f"cannot be read as a picture ({type(exc).__name__}: {short(exc)}); "
                                 "the file is damaged or not a PNG/WEBP") from None
    if text is not None:
        try:
            raw = base64.b64decode(text, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise EmbeddingError(path, f"the {TEXT_KEY} text chunk is not base64 ({short(exc)})") from None
        obj = _decode_json(path, raw, f"{TEXT_KEY} text chunk", limits)
        return recognise(obj, path, f"{kind}-text", name_from_inner=True)
    if width * height > limits.max_image_pixels:
        raise NotAnEmbedding(path, f"a {width}x{height} picture without an {TEXT_KEY} text chunk")
    try:
        if image is None:
            image = Image.open(io.BytesIO(data))
        if image.size != (width, height):
            raise ValueError(f"Pillow reads {image.size[0]}x{image.size[1]}, the header says {width}x{height}")
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError) as exc:
        raise EmbeddingError(path, f"cannot decode the picture's pixels ({type(exc).__name__}: {short(exc)}); "
                             "the file is damaged") from None
    payload = extract_payload(rgb)
    if payload is None:
        raise NotAnEmbedding(path, "a picture that carries no embedding (a preview or ordinary picture)")
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(payload, limits.max_json_bytes + 1)
    except zlib.error as exc:
        raise EmbeddingError(path, f"the picture's embedded data does not decompress ({short(exc)}); the picture "
                             "was probably re-encoded lossily (JPEG, lossy WEBP) or edited") from None
    if len(raw) > limits.max_json_bytes:
        raise EmbeddingError(path, f"the picture's embedded data inflates to more than {limits.max_json_bytes:,} "
                             "bytes, more than any embedding card holds; it was not parsed")
    if inflater.unconsumed_tail or not inflater.eof:
        raise EmbeddingError(path, "the picture's embedded data is incomplete; the picture was probably cropped, "
                             "resized or re-encoded")
    obj = _decode_json(path, raw, "pixel data", limits)
    return recognise(obj, path, f"{kind}-pixels", name_from_inner=True)


# ---------------------------------------------------------------- writing


def default_preview(name: str, step: int | None, size: int = 256):
    """A plain preview with the name on it, for cards written without a picture."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (52, 56, 68))
    draw = ImageDraw.Draw(image)
    draw.text((12, size - 44), name[:40], fill=(236, 236, 236))
    if step is not None:
        draw.text((12, size - 24), f"step {step}", fill=(180, 180, 190))
    return image


def build_card_image(card: dict, vectors: torch.Tensor, preview, path: Path):
    """The card picture: low block | black | preview | black | high block, verified to decode back."""
    from PIL import Image

    preview = preview.convert("RGB")
    payload = zlib.compress(encode_json(card), level=9)
    low, high = build_data_cube(payload, preview.size[1], vectors[0])
    width = low.shape[1] + 1 + preview.size[0] + 1 + high.shape[1]
    canvas = Image.new("RGB", (width, preview.size[1]), (0, 0, 0))
    canvas.paste(Image.fromarray(low, mode="RGB"), (0, 0))
    canvas.paste(preview, (low.shape[1] + 1, 0))
    canvas.paste(Image.fromarray(high, mode="RGB"), (low.shape[1] + 1 + preview.size[0] + 1, 0))
    decoded = extract_payload(np.asarray(canvas, dtype=np.uint8))
    if decoded is None or not decoded.startswith(payload):
        raise EmbeddingError(
            path, "the data cube would not decode back from this preview picture; use a taller preview"
        )
    return canvas


def encode_text_chunk(card: dict) -> str:
    """The value of the ``sd-ti-embedding`` text chunk."""
    return base64.b64encode(encode_json(card)).decode("ascii")
