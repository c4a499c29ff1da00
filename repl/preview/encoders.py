"""The escape sequences that put a picture on a terminal: kitty, iTerm2, sixel, and unicode half-blocks.

Hand-written rather than taken from a library (see docs/architecture.md, "Pictures in the terminal"): each
protocol is a few lines, the bytes are exactly the documented forms (so tests parse them back), and
nothing here touches the terminal: every encoder returns a string for the caller to write above the
prompt. Each result leaves the terminal as it found it: no reply asked for (kitty ``q=2``), colours reset
at the end of every half-block line.

- kitty (``https://sw.kovidgoyal.net/kitty/graphics-protocol/``): ``ESC _G a=T,f=100,q=2,m=1;<base64
  PNG, 4096 bytes> ESC \\``, then ``ESC _G m=1;<4096> ESC \\`` ... the last chunk with ``m=0`` (``c=C,r=R``
  scale it into a cell box when given).
- iTerm2 (``https://iterm2.com/documentation-images.html``): ``ESC ]1337;File=inline=1;size=N;width=W;
  height=H;preserveAspectRatio=1:<base64 file> BEL``.
- sixel (DEC VT330/340): ``ESC P q "1;1;W;H #i;2;r;g;b ... <bands> ESC \\``: a palette in percent, then
  bands of six pixel rows, one ``#i`` run per colour separated by ``$`` (back to the band's start), ``-``
  to the next band, ``!n`` repeating a character.
- half-blocks: ``▀`` per cell, foreground = the upper pixel, background = the lower, in 24-bit colour
  (``ESC [38;2;r;g;bm``) or the xterm 256-colour cube and grey ramp (``ESC [38;5;nm``).
"""

from __future__ import annotations

import base64
import io
import re
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image as PILImage

ESC = "\x1b"
ST = ESC + "\\"
#: Kitty's documented chunk size for the base64 payload of one escape.
KITTY_CHUNK = 4096
#: Colours of a sixel palette (what VT340-compatible terminals guarantee at least; xterm and foot take 256).
SIXEL_COLOURS = 256
HALF_BLOCK = "\u2580"  # ▀ upper half block
RESET = ESC + "[0m"


def png_bytes(image: PILImage.Image) -> bytes:
    """The picture as PNG bytes (what the kitty and iTerm2 protocols carry)."""
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def kitty(png: bytes, cols: int | None = None, rows: int | None = None) -> str:
    """Kitty graphics protocol: transmit and display the PNG, no reply asked for; at its own pixel size, or
    scaled into a ``cols`` x ``rows`` cell box when given."""
    return "".join(kitty_parts(png, cols, rows))


def kitty_parts(png: bytes, cols: int | None = None, rows: int | None = None) -> list[str]:
    """:func:`kitty`'s escapes one by one (tmux passthrough wraps each on its own)."""
    data = base64.standard_b64encode(png).decode("ascii")
    chunks = [data[i:i + KITTY_CHUNK] for i in range(0, len(data), KITTY_CHUNK)] or [""]
    out = []
    for i, chunk in enumerate(chunks):
        more = 1 if i < len(chunks) - 1 else 0
        box = "".join(f"{k}={v}," for k, v in (("c", cols), ("r", rows)) if v is not None)
        keys = f"a=T,f=100,{box}q=2,m={more}" if i == 0 else f"m={more}"
        out.append(f"{ESC}_G{keys};{chunk}{ST}")
    return out


def iterm(png: bytes, width: str = "auto", height: str = "auto") -> str:
    """iTerm2 inline image (OSC 1337, also WezTerm, mintty): the PNG in a ``width`` x ``height`` box, each
    ``N`` (cells), ``Npx``, ``N%`` or ``auto`` (the picture's own size), as iTerm2 documents."""
    data = base64.standard_b64encode(png).decode("ascii")
    return (f"{ESC}]1337;File=inline=1;size={len(png)};width={width};height={height};preserveAspectRatio=1:"
            f"{data}\a")


def quantise(image: PILImage.Image, colours: int = SIXEL_COLOURS) -> PILImage.Image:
    """A palette ("P") picture of at most ``colours`` colours (median cut, no dithering: it is a thumbnail)."""
    from PIL import Image

    return image.convert("RGB").quantize(colors=colours, method=Image.Quantize.MEDIANCUT,
                                         dither=Image.Dither.NONE)


_RUN = re.compile(r"(.)\1{3,}")


def _rle(text: str) -> str:
    """Sixel's repeat introducer: four or more of one character become ``!n<char>``."""
    return _RUN.sub(lambda m: f"!{len(m.group(0))}{m.group(1)}", text)


def sixel(image: PILImage.Image, colours: int = SIXEL_COLOURS) -> str:
    """The picture as one sixel image, quantised to ``colours`` (:func:`quantise`) at its own pixel size."""
    paletted = image if image.mode == "P" else quantise(image, colours)
    index = np.asarray(paletted, dtype=np.uint8)
    height, width = index.shape
    used = np.unique(index)
    raw = paletted.getpalette() or []
    palette = np.array(raw[: 3 * 256] + [0] * max(0, 768 - len(raw)), dtype=np.int64).reshape(256, 3)
    parts = [f'{ESC}Pq"1;1;{width};{height}']
    for i in used:
        r, g, b = (int(round(c * 100 / 255)) for c in palette[i])
        parts.append(f"#{i};2;{r};{g};{b}")
    columns = np.arange(width)
    for top in range(0, height, 6):
        band = index[top:top + 6]
        bits = np.zeros((256, width), dtype=np.uint8)  # per colour, per column: which of the six rows
        for row in range(band.shape[0]):
            bits[band[row], columns] |= np.uint8(1 << row)
        runs = []
        for i in np.flatnonzero(bits.any(axis=1)):
            text = (bits[i] + 63).tobytes().decode("ascii").rstrip("?")
            runs.append(f"#{i}{_rle(text)}")
        parts.append("$".join(runs) + "-")
    parts.append(ST)
    return "".join(parts)


def xterm_256(rgb: tuple[int, int, int]) -> int:
    """The nearest colour of xterm's 256-colour palette: the 6x6x6 cube (16-231) or the grey ramp (232-255)."""
    levels = (0, 95, 135, 175, 215, 255)

    def nearest_level(value: int) -> int:
        return min(range(6), key=lambda i: abs(levels[i] - value))

    r, g, b = rgb
    cube = tuple(nearest_level(c) for c in rgb)
    cube_rgb = tuple(levels[i] for i in cube)
    grey_index = min(23, max(0, round((sum(rgb) / 3 - 8) / 10)))
    grey = 8 + 10 * grey_index

    def distance(other: tuple[int, ...]) -> int:
        return sum((a - c) ** 2 for a, c in zip(rgb, other, strict=True))

    if distance((grey, grey, grey)) < distance(cube_rgb):
        return 232 + grey_index
    return 16 + 36 * cube[0] + 6 * cube[1] + cube[2]


def _sgr(layer: int, rgb: tuple[int, int, int], truecolor: bool) -> str:
    if truecolor:
        return f"{ESC}[{layer};2;{rgb[0]};{rgb[1]};{rgb[2]}m"
    return f"{ESC}[{layer};5;{xterm_256(rgb)}m"


def blocks(image: PILImage.Image, truecolor: bool = True) -> str:
    """One ``▀`` per cell, two pixels per cell (upper = foreground, lower = background); a line per cell row.

    An odd last pixel row gets the terminal's own background below it. Colours are written only where they
    change along a line; every line ends with a reset, so nothing leaks into the prompt.
    """
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    height, width = rgb.shape[:2]
    lines = []
    for y in range(0, height, 2):
        out, fg, bg = [], None, None
        for x in range(width):
            top = tuple(int(c) for c in rgb[y, x])
            low = tuple(int(c) for c in rgb[y + 1, x]) if y + 1 < height else None
            if top != fg:
                out.append(_sgr(38, top, truecolor))  # type: ignore[arg-type]
                fg = top
            if low != bg:
                out.append(_sgr(48, low, truecolor) if low is not None else f"{ESC}[49m")  # type: ignore[arg-type]
                bg = low
            out.append(HALF_BLOCK)
        lines.append("".join(out) + RESET)
    return "\n".join(lines)
