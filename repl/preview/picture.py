"""Pictures to show, read as untrusted files: size checked from the header before a pixel is decoded.

``!view FILE`` may name anything, and a picture from elsewhere may declare 100,000 x 100,000 pixels in a
few hundred bytes. Files are opened by ``core.picture_files.open_picture`` (the one bounded way sdrepl
decodes a picture: through ``core.safe_open``, so a FIFO or device never blocks, at most
``MAX_PICTURE_FILE_BYTES`` read, the declared size checked against ``MAX_PICTURE_PIXELS`` first); PNG
bytes from the daemon (``!train plot``) get the same checks here, the PNG's size read from its chunk list.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sdrepl.core.display import visible
from sdrepl.core.errors import SdreplError

if TYPE_CHECKING:
    from PIL import Image as PILImage

#: How many pictures of one generation are put side by side in its preview.
MAX_SHEET = 16


class PreviewError(SdreplError):
    """A picture that cannot be shown: missing, not a picture, damaged, or larger than allowed."""


@dataclass(frozen=True)
class Shown:
    """A picture for the interactive REPL to draw after a line: a file, PNG bytes, or decoded pixels.

    ``large`` asks for the whole terminal (``!view``, ``!train plot``) instead of a thumbnail.
    """

    source: Path | bytes | PILImage.Image
    large: bool = False


def declared_size(data: bytes, where: str) -> tuple[int, int]:
    """Width and height the picture's header declares, without decoding it; :class:`PreviewError` otherwise."""
    from PIL import Image, UnidentifiedImageError

    from sdrepl.core.formats.png_chunks import PNG_MAGIC, PngRefused, read_png_header
    from sdrepl.core.pnginfo import MAX_PARAMETERS_BYTES

    try:
        if data.startswith(PNG_MAGIC):
            header = read_png_header(data, "parameters", MAX_PARAMETERS_BYTES)  # as !fetch reads it
            return header.width, header.height
        with Image.open(io.BytesIO(data)) as image:  # lazy: reads the header only
            return image.size
    except PngRefused as exc:
        raise PreviewError(f"{where}: not a readable picture ({exc.reason})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
            Image.DecompressionBombError) as exc:
        raise PreviewError(f"{where}: not a readable picture ({type(exc).__name__}: {visible(exc)}); give a "
                           "PNG, JPEG or WEBP file") from None


def decode(data: bytes, where: str) -> PILImage.Image:
    """The picture in ``data`` as RGB pixels, its declared size checked first (see the module docstring)."""
    from PIL import Image

    from sdrepl.core.picture_files import MAX_PICTURE_FILE_BYTES, MAX_PICTURE_PIXELS

    if len(data) > MAX_PICTURE_FILE_BYTES:
        raise PreviewError(f"{where}: {len(data):,} bytes, more than the {MAX_PICTURE_FILE_BYTES:,} sdrepl reads")
    width, height = declared_size(data, where)
    if width <= 0 or height <= 0:
        raise PreviewError(f"{where}: the picture declares {width}x{height} pixels")
    if width * height > MAX_PICTURE_PIXELS:
        raise PreviewError(f"{where}: a {width}x{height} picture is larger than the {MAX_PICTURE_PIXELS:,} pixels "
                           "sdrepl decodes; it was not decoded")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.size != (width, height):
                raise ValueError(f"Pillow reads {image.size[0]}x{image.size[1]}, the header says {width}x{height}")
            image.seek(0)
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                flat = Image.new("RGB", rgba.size, (0, 0, 0))
                flat.paste(rgba, mask=rgba.getchannel("A"))
                return flat
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError) as exc:
        raise PreviewError(f"{where}: the picture's pixels cannot be decoded ({type(exc).__name__}: "
                           f"{visible(exc)}); the file is damaged") from None


def open_file(path: Path) -> PILImage.Image:
    """A picture file as RGB pixels, by ``core.picture_files.open_picture``; :class:`PreviewError` otherwise."""
    from sdrepl.core.picture_files import PictureError, open_picture

    try:
        return open_picture(path)
    except PictureError as exc:
        hint = ("; give the path of a picture (relative to the session's folder), or !view N for this session's "
                "Nth latest picture" if exc.reason == "no such file" else "")
        raise PreviewError(f"{visible(str(path))}: {exc.reason}{hint}") from None


def load(source: Path | bytes | PILImage.Image, where: str | None = None) -> PILImage.Image:
    """A :class:`Shown` source as RGB pixels (bytes by :func:`decode`, a file by :func:`open_file`)."""
    if isinstance(source, bytes):
        return decode(source, where or "the picture")
    if isinstance(source, (Path, str)):
        return open_file(Path(source))
    return source  # already decoded (and checked) by the command that shows it


def contact_sheet(images: list[PILImage.Image], gap: int = 4) -> PILImage.Image:
    """Up to :data:`MAX_SHEET` pictures side by side in rows (a square-ish grid), on black, for one preview."""
    from PIL import Image

    images = images[:MAX_SHEET]
    if len(images) == 1:
        return images[0]
    columns = 1
    while columns * columns < len(images):
        columns += 1
    rows = -(-len(images) // columns)
    cell_w = max(i.width for i in images)
    cell_h = max(i.height for i in images)
    sheet = Image.new("RGB", (columns * cell_w + (columns - 1) * gap, rows * cell_h + (rows - 1) * gap))
    for n, image in enumerate(images):
        sheet.paste(image, ((n % columns) * (cell_w + gap), (n // columns) * (cell_h + gap)))
    return sheet
