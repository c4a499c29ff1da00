"""The labelled grid picture of ``!grid``, drawn as A1111's X/Y/Z plot draws it (Pillow only).

Layout: every cell gets a slot the size of the largest cell (a ``size`` axis makes cells of several sizes;
each is centred in its slot, never scaled, so the grid shows the pixels the cell files hold); columns of
pictures narrower than a label's longest word are widened to it. The x values
are written above the columns, the y values left of the rows; with a z axis there is one such sub-grid per
z value, side by side, each under its z label (A1111 draws one sub-grid per z value too). Labels are the
values as typed, made visible (``core.display.visible``: no control characters reach a font), wrapped to
their column. The font is the one that ships with Pillow (``ImageFont.load_default``, scalable since
Pillow 10.1; older Pillows get its fixed bitmap font).

:func:`plan_layout` is pure arithmetic, so tests and the daemon know where every cell lands
(:meth:`GridLayout.cell_box`) without drawing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sdrepl.core.display import visible

BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
#: A label never gets a font smaller than this (A1111's size/25 rule is unreadable on 64 px cells).
MIN_FONT = 12
#: Space between sub-grids of a z axis.
Z_GAP_FACTOR = 0.5


def font_size(cell_w: int, cell_h: int) -> int:
    """A1111's rule (``(width + height) // 25`` of a cell), at least :data:`MIN_FONT`."""
    return max(MIN_FONT, (cell_w + cell_h) // 25)


def load_font(size: int) -> Any:
    """Pillow's own font at ``size`` pixels (no font file needed on any machine)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font, one size
        return ImageFont.load_default()


def _text_width(font: Any, text: str) -> int:
    left, _top, right, _bottom = font.getbbox(text)
    return int(right - left)


def _line_height(font: Any) -> int:
    _left, top, _right, bottom = font.getbbox("Ag|")
    return int(bottom - top) + max(2, int((bottom - top) * 0.3))


def wrap(text: str, font: Any, width: int, max_lines: int = 4) -> list[str]:
    """``text`` broken into lines no wider than ``width`` (at spaces; a word too long is cut by characters),
    at most ``max_lines`` (the last ends with ``...`` when text was left out)."""
    words = visible(text).split(" ")
    lines: list[str] = []
    current = ""
    for word in words:
        candidate = f"{current} {word}".strip() if current else word
        if _text_width(font, candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = ""
        while _text_width(font, word) > width and len(word) > 1:  # a long word: split it by characters
            cut = len(word)
            while cut > 1 and _text_width(font, word[:cut]) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current or not lines:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and _text_width(font, last + "...") > width:
            last = last[:-1]
        lines[-1] = last + "..."
    return lines


@dataclass(frozen=True)
class GridLayout:
    """Where everything goes: slot size, label margins, sub-grid offsets, the whole picture's size."""

    columns: int
    rows: int
    planes: int
    cell_w: int
    cell_h: int
    left: int  # the y labels' margin
    top: int  # the x labels' margin
    z_band: int  # the z labels' band above each sub-grid (0 without a z axis)
    gap: int  # between sub-grids
    font_px: int

    @property
    def sub_width(self) -> int:
        return self.left + self.columns * self.cell_w

    @property
    def sub_height(self) -> int:
        return self.z_band + self.top + self.rows * self.cell_h

    @property
    def width(self) -> int:
        return self.planes * self.sub_width + (self.planes - 1) * self.gap

    @property
    def height(self) -> int:
        return self.sub_height

    def origin(self, iz: int) -> tuple[int, int]:
        """The top-left corner of sub-grid ``iz``."""
        return iz * (self.sub_width + self.gap), 0

    def slot(self, ix: int, iy: int, iz: int) -> tuple[int, int, int, int]:
        """The box of a cell's slot (left, top, right, bottom)."""
        ox, oy = self.origin(iz)
        left = ox + self.left + ix * self.cell_w
        top = oy + self.z_band + self.top + iy * self.cell_h
        return left, top, left + self.cell_w, top + self.cell_h

    def cell_box(self, ix: int, iy: int, iz: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """Where a picture of ``size`` is pasted: centred in its slot."""
        left, top, _right, _bottom = self.slot(ix, iy, iz)
        x = left + (self.cell_w - size[0]) // 2
        y = top + (self.cell_h - size[1]) // 2
        return x, y, x + size[0], y + size[1]


def plan_layout(sizes: Sequence[tuple[int, int]], columns: int, rows: int, planes: int,
                x_labels: Sequence[str], y_labels: Sequence[str], z_labels: Sequence[str]) -> GridLayout:
    """The layout for cells of ``sizes`` in ``columns`` x ``rows`` x ``planes`` with these labels (an empty
    label list: that axis is absent and gets no margin)."""
    cell_w = max(w for w, _ in sizes)
    cell_h = max(h for _, h in sizes)
    px = font_size(cell_w, cell_h)
    font = load_font(px)
    # Columns narrower than a label's longest word are widened (the cells centred in them), so small
    # pictures do not get their labels cut into letters.
    words = [word for text in x_labels for word in visible(text).split(" ")]
    cell_w = max([cell_w] + [min(_text_width(font, word) + 4, max(4 * cell_w, 320)) for word in words])
    line = _line_height(font)
    pad = max(4, px // 2)
    top = (max(len(wrap(t, font, cell_w - 4)) for t in x_labels) * line + 2 * pad) if x_labels else 0
    left = 0
    if y_labels:
        room = max(cell_w * 3 // 4, 6 * px)
        widest = max(_text_width(font, ln) for t in y_labels for ln in wrap(t, font, room))
        left = widest + 2 * pad
    z_band = 0
    if z_labels:
        z_band = max(len(wrap(t, font, cell_w * columns + left - 4)) for t in z_labels) * line + 2 * pad
    gap = int(cell_w * Z_GAP_FACTOR) if planes > 1 else 0
    return GridLayout(columns, rows, planes, cell_w, cell_h, left, top, z_band, gap, px)


def _centred(draw: Any, font: Any, lines: list[str], box: tuple[int, int, int, int]) -> None:
    left, top, right, bottom = box
    line = _line_height(font)
    y = top + (bottom - top - line * len(lines)) // 2
    for text in lines:
        x = left + (right - left - _text_width(font, text)) // 2
        draw.text((x, y), text, font=font, fill=INK)
        y += line


def compose_grid(pictures: dict[tuple[int, int, int], Any], columns: int, rows: int, planes: int,
                 x_labels: Sequence[str], y_labels: Sequence[str], z_labels: Sequence[str]) -> tuple[Any, GridLayout]:
    """The grid picture (RGB) of ``pictures`` keyed ``(ix, iy, iz)``, and its layout."""
    from PIL import Image, ImageDraw

    layout = plan_layout([p.size for p in pictures.values()], columns, rows, planes, x_labels, y_labels, z_labels)
    grid = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = load_font(layout.font_px)
    for (ix, iy, iz), picture in pictures.items():
        grid.paste(picture.convert("RGB"), layout.cell_box(ix, iy, iz, picture.size)[:2])
    for iz in range(planes):
        ox, oy = layout.origin(iz)
        if z_labels:
            band = (ox, oy, ox + layout.sub_width, oy + layout.z_band)
            _centred(draw, font, wrap(z_labels[iz], font, layout.sub_width - 4), band)
        for ix, text in enumerate(x_labels):
            left, top, right, _ = layout.slot(ix, 0, iz)
            _centred(draw, font, wrap(text, font, layout.cell_w - 4), (left, top - layout.top, right, top))
        for iy, text in enumerate(y_labels):
            left, top, _right, bottom = layout.slot(0, iy, iz)
            room = layout.left - max(4, layout.font_px // 2)
            _centred(draw, font, wrap(text, font, room), (left - layout.left, top, left, bottom))
    return grid, layout
