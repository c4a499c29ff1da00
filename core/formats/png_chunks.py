"""A PNG's chunk list, walked from the bytes without decoding a pixel: dimensions and the card's text.

Pillow's ``Image.open`` is lazy, but reading ``image.text`` loads (decodes) the whole picture to find text
chunks after the pixel data, and its zTXt limit (1 MiB) is unrelated to what a card may hold. Walking
the chunk headers ourselves gives the declared width and height before anything is decoded, and the
``sd-ti-embedding`` text (tEXt, zTXt or iTXt, anywhere in the file) inflated at most to a bound.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: More chunks than any picture a card generator writes (Pillow writes 64 KiB IDAT chunks).
MAX_CHUNKS = 65_536


class PngRefused(Exception):
    """The chunk list is damaged or declares more than allowed; ``damaged`` tells the two apart."""

    def __init__(self, reason: str, *, damaged: bool = True) -> None:
        self.reason = reason
        self.damaged = damaged
        super().__init__(reason)


@dataclass(frozen=True)
class PngHeader:
    width: int
    height: int
    #: The text stored under the requested keyword (latin-1 / utf-8 decoded), or None.
    text: str | None


def _inflate(body: bytes, limit: int, keyword: str) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise PngRefused(f"its compressed {keyword} text chunk does not decompress ({exc})") from None
    if len(out) > limit:
        raise PngRefused(f"its {keyword} text chunk inflates to more than {limit:,} bytes, more than any card holds",
                         damaged=False)
    return out


def _text(kind: bytes, body: bytes, keyword: str, limit: int) -> str | None:
    name, sep, rest = body.partition(b"\x00")
    if not sep or name.decode("latin-1") != keyword:
        return None
    if kind == b"tEXt":
        raw = rest
    elif kind == b"zTXt":
        raw = _inflate(rest[1:], limit, keyword)
    else:  # iTXt: flag, method, language\0, translated keyword\0, text
        flag = rest[:1]
        parts = rest[2:].split(b"\x00", 2)
        if len(parts) != 3:
            raise PngRefused(f"its {keyword} iTXt chunk is malformed")
        raw = _inflate(parts[2], limit, keyword) if flag == b"\x01" else parts[2]
    if len(raw) > limit:
        raise PngRefused(f"its {keyword} text chunk is {len(raw):,} bytes, more than any card holds ({limit:,})",
                         damaged=False)
    return raw.decode("utf-8" if kind == b"iTXt" else "latin-1", "replace")


def read_png_header(data: bytes, keyword: str, text_limit: int) -> PngHeader:
    """Width, height and the ``keyword`` text of a PNG, from its chunk list; raise :class:`PngRefused`."""
    if not data.startswith(PNG_MAGIC):
        raise PngRefused("it does not start with the PNG signature")
    pos, count = len(PNG_MAGIC), 0
    width = height = -1
    text: str | None = None
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if len(body) < length:
            raise PngRefused(f"it is truncated inside its {kind!r} chunk")
        count += 1
        if count > MAX_CHUNKS:
            raise PngRefused(f"it has more than {MAX_CHUNKS:,} chunks", damaged=False)
        if count == 1:
            if kind != b"IHDR" or length != 13:
                raise PngRefused("its first chunk is not a valid IHDR header")
            width, height = struct.unpack(">II", body[:8])
        elif kind in (b"tEXt", b"zTXt", b"iTXt") and text is None:
            text = _text(kind, body, keyword, text_limit)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if width < 0:
        raise PngRefused("it is truncated before its IHDR header")
    return PngHeader(width, height, text)
