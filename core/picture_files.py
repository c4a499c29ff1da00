"""Opening a picture a user or a stranger put in a folder: bounded before any pixel is decoded.

A picture file can be small and still ask for GiBs: a PNG or JPEG header declaring 60000x60000 pixels
costs a few hundred bytes on disk and ~10 GiB once decoded to RGB. Pillow's own guard
(``Image.MAX_IMAGE_PIXELS``) only raises at twice ~89 megapixels and only warns below that; the
pictures sdrepl decodes (training data, ``!preprocess`` sources, img2img init pictures, pictures shown
in the terminal) are all checked here against :data:`MAX_PICTURE_PIXELS` from the header first, and the
file itself is opened through :mod:`sdrepl.core.safe_open` (a FIFO or device swapped in never blocks; at
most :data:`MAX_PICTURE_FILE_BYTES` are read).

One definition of the limits for every such reader; ``!fetch``'s metadata reader, which decodes no
pixels, shares the byte limit.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from sdrepl.core.errors import SdreplError
from sdrepl.core.safe_open import UnsafeFile, open_regular_file

#: The largest picture file read at all (a 100-megapixel camera TIFF is about this size).
MAX_PICTURE_FILE_BYTES = 256 * 1024 * 1024
#: The most pixels a picture may declare before it is decoded: 64 megapixels (8000x8000; a 24-megapixel
#: camera photo is well inside) is ~200 MB as RGB.
MAX_PICTURE_PIXELS = 64_000_000

#: What Pillow raises for a damaged or hostile file (besides UnidentifiedImageError, an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError)


class PictureError(SdreplError):
    """A picture file that was refused or cannot be read; ``reason`` is a phrase for a message."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def open_picture(path: Path | str, *, max_pixels: int = MAX_PICTURE_PIXELS,
                 max_bytes: int = MAX_PICTURE_FILE_BYTES, background: tuple[int, int, int] | None = None):
    """The picture at ``path`` decoded as an RGB ``PIL.Image`` (EXIF orientation applied, first frame).
    ``background``: transparency is composited onto this colour (img2img, as A1111's ``flatten``) rather
    than dropped.

    Raises :class:`PictureError` naming what was wrong: missing, not a regular file, too many bytes, a
    header declaring more than ``max_pixels``, or not a picture Pillow can decode. ``FileNotFoundError``
    is folded in too, so callers need one ``except``.
    """
    from PIL import Image, ImageOps

    from sdrepl.core.display import visible

    try:
        with open_regular_file(path, max_bytes) as (fh, _):
            try:
                with Image.open(fh) as image:  # lazy: the header only
                    width, height = image.size
                    if width * height > max_pixels:
                        raise PictureError(path, f"its header declares {width}x{height} pixels, more than the "
                                                 f"{max_pixels:,} sdrepl decodes; scale it down first")
                    image.load()
                    upright = ImageOps.exif_transpose(image)
                    if background is not None and _has_alpha(upright):
                        rgba = upright.convert("RGBA")
                        canvas = Image.new("RGBA", rgba.size, (*background, 255))
                        canvas.alpha_composite(rgba)
                        return canvas.convert("RGB")
                    return upright.convert("RGB")
            except Image.UnidentifiedImageError:
                raise PictureError(path, "not a picture Pillow recognises; use a PNG, JPEG or WEBP file") from None
            except Image.DecompressionBombError as exc:
                raise PictureError(path, f"its header declares a picture too large to decode (Pillow: {exc}); "
                                         "scale it down first") from None
            except _DECODE_ERRORS as exc:
                detail = visible(str(exc))[:160]
                raise PictureError(path, f"not a picture that can be read ({type(exc).__name__}: {detail}); "
                                         "use a PNG, JPEG or WEBP file") from None
    except FileNotFoundError:
        raise PictureError(path, "no such file") from None
    except UnsafeFile as exc:
        raise PictureError(path, exc.reason) from None
    except PermissionError:
        raise PictureError(path, "permission denied") from None
    except IsADirectoryError:
        raise PictureError(path, "a folder, not a picture file") from None


def _has_alpha(image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
