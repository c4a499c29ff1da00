"""A picture fitted to the terminal and encoded for its protocol: the text the REPL writes above its prompt.

Sizing is in cells: a thumbnail (a generation's picture) takes at most half the screen's height, a large
picture (``!view``, ``!train plot``) the screen less the lines the prompt, toolbar and result need; the
cell's pixel size (from ``TIOCGWINSZ`` where the terminal fills it in, else 10x20) says how many pixels
fit; kitty, iTerm2 and sixel pictures are sent at that pixel size and shown pixel for pixel (aspect kept
whatever the real cell size), half-blocks take two pixels a cell. A picture is never enlarged.
"""

from __future__ import annotations

import fcntl
import struct
import termios
from typing import TYPE_CHECKING

from sdrepl.repl.preview import encoders
from sdrepl.repl.preview.detect import tmux_wrap

if TYPE_CHECKING:
    from PIL import Image as PILImage

#: Pixels of one cell when the terminal does not say (a common 10x20 font).
DEFAULT_CELL = (10, 20)
#: Lines kept free below a large picture: the result's line, the prompt and the toolbar.
RESERVED_ROWS = 4


def cell_pixels(fd: int = 1) -> tuple[int, int]:
    """The pixel size of one cell, from the terminal's window size report; :data:`DEFAULT_CELL` if unknown."""
    try:
        rows, cols, xpixel, ypixel = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return DEFAULT_CELL
    if rows and cols and xpixel >= cols and ypixel >= rows:
        return max(1, xpixel // cols), max(1, ypixel // rows)
    return DEFAULT_CELL


def box(columns: int, rows: int, *, large: bool) -> tuple[int, int]:
    """The largest cell box a picture may take on a ``columns`` x ``rows`` screen."""
    max_cols = max(1, columns - 1)
    max_rows = max(2, rows - RESERVED_ROWS)
    if not large:
        max_rows = max(2, min(max_rows, rows // 2))
    return max_cols, max_rows


def fit(width: int, height: int, max_cols: int, max_rows: int, cell: tuple[int, int],
        *, enlarge: bool = False) -> tuple[int, int]:
    """Cells (columns, rows) for a ``width`` x ``height`` picture in the box, aspect kept, at least 1x1."""
    native_cols, native_rows = width / cell[0], height / cell[1]
    scale = min(max_cols / native_cols, max_rows / native_rows)
    if not enlarge:
        scale = min(scale, 1.0)
    return max(1, round(native_cols * scale)), max(1, round(native_rows * scale))


def pixel_size(width: int, height: int, max_cols: int, max_rows: int, cell: tuple[int, int]) -> tuple[int, int]:
    """The pixels a picture is shown at: its own, or scaled down (aspect kept) to fit the cell box.

    The kitty, iTerm2 and sixel pictures are sent at exactly this size and shown pixel for pixel, so the
    aspect ratio never depends on the cell size being known exactly.
    """
    scale = min(1.0, max_cols * cell[0] / width, max_rows * cell[1] / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _resized(image: PILImage.Image, size: tuple[int, int]) -> PILImage.Image:
    from PIL import Image

    size = (max(1, size[0]), max(1, size[1]))
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


def encode(image: PILImage.Image, protocol: str, max_cols: int, max_rows: int, *,
           cell: tuple[int, int] = DEFAULT_CELL, truecolor: bool = True, tmux: bool = False) -> str:
    """The text that draws ``image`` in at most ``max_cols`` x ``max_rows`` cells and ends on a new line.

    Inside tmux (``tmux``), kitty and iTerm2 escapes are wrapped for passthrough, after making room with
    new lines: tmux does not know the picture is there, so the cursor is moved below it by hand.
    """
    width, height = image.size
    if protocol == "blocks":
        cols, rows = fit(width, height, max_cols, max_rows, (1, 2))
        return encoders.blocks(_resized(image, (cols, rows * 2)), truecolor) + "\n"
    small = _resized(image, pixel_size(width, height, max_cols, max_rows, cell))
    rows = -(-small.height // cell[1])
    if protocol == "sixel":
        return encoders.sixel(small) + "\r\n"
    png = encoders.png_bytes(small)
    if protocol == "kitty":
        parts = encoders.kitty_parts(png)
    elif protocol == "iterm":
        parts = [encoders.iterm(png, f"{small.width}px", f"{small.height}px")]
    else:
        raise ValueError(f"unknown picture protocol {protocol!r}")
    if not tmux:
        return "".join(parts) + "\r\n"
    return "\n" * rows + f"\x1b[{rows}A" + "".join(map(tmux_wrap, parts)) + f"\r\x1b[{rows}B"
