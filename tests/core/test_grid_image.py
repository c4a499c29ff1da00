"""``core/grid_image.py``: the labelled grid's layout, pixels and labels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdrepl.core.grid_image import BACKGROUND, compose_grid, load_font, plan_layout, wrap


def picture(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def blank(region: Image.Image) -> bool:
    return bool((np.asarray(region) == np.array(BACKGROUND, dtype=np.uint8)).all())


def test_a_3x2_grid_is_the_cells_plus_label_margins_with_every_cell_pixel_exact():
    cells = {(ix, iy, 0): picture(64, 48, ix + 10 * iy) for ix in range(3) for iy in range(2)}
    grid, layout = compose_grid(cells, 3, 2, 1, ["cat-100", "cat-200", "cat-300"], ["CFG Scale: 3", "CFG Scale: 7"], [])
    assert layout.left > 0 and layout.top > 0 and layout.z_band == 0
    assert grid.size == (layout.left + 3 * 64, layout.top + 2 * 48) == (layout.width, layout.height)
    for (ix, iy, iz), cell in cells.items():
        box = layout.cell_box(ix, iy, iz, cell.size)
        assert np.array_equal(np.asarray(grid.crop(box)), np.asarray(cell))
    # Each label area has ink; the corner above the y labels and left of the x labels stays blank.
    for ix in range(3):
        left, top, right, _ = layout.slot(ix, 0, 0)
        assert not blank(grid.crop((left, 0, right, top)))
    for iy in range(2):
        _, top, _, bottom = layout.slot(0, iy, 0)
        assert not blank(grid.crop((0, top, layout.left, bottom)))
    assert blank(grid.crop((0, 0, layout.left, layout.top)))


def test_only_an_x_axis_has_no_left_margin():
    cells = {(ix, 0, 0): picture(32, 32, ix) for ix in range(2)}
    grid, layout = compose_grid(cells, 2, 1, 1, ["Seed: 1", "Seed: 2"], [], [])
    assert layout.left == 0 and grid.height == layout.top + 32


def test_z_values_are_sub_grids_side_by_side_each_under_its_label():
    cells = {(ix, 0, iz): picture(32, 32, ix + 5 * iz) for ix in range(2) for iz in range(3)}
    grid, layout = compose_grid(cells, 2, 1, 3, ["a", "b"], [], ["Steps: 1", "Steps: 2", "Steps: 3"])
    assert layout.z_band > 0 and layout.planes == 3
    assert grid.size == (3 * layout.sub_width + 2 * layout.gap, layout.z_band + layout.top + 32)
    for iz in range(3):
        ox, _ = layout.origin(iz)
        assert not blank(grid.crop((ox, 0, ox + layout.sub_width, layout.z_band)))  # the z label
        box = layout.cell_box(1, 0, iz, (32, 32))
        assert np.array_equal(np.asarray(grid.crop(box)), np.asarray(cells[(1, 0, iz)]))


def test_cells_of_several_sizes_are_centred_in_slots_of_the_largest():
    cells = {(0, 0, 0): picture(32, 32, 1), (1, 0, 0): picture(64, 48, 2)}
    grid, layout = compose_grid(cells, 2, 1, 1, ["Size: 32x32", "Size: 64x48"], [], [])
    assert (layout.cell_w, layout.cell_h) == (64, 48)
    box = layout.cell_box(0, 0, 0, (32, 32))
    assert box[:2] == (layout.slot(0, 0, 0)[0] + 16, layout.top + 8)
    assert np.array_equal(np.asarray(grid.crop(box)), np.asarray(cells[(0, 0, 0)]))


def test_narrow_cells_get_columns_wide_enough_for_a_label_word():
    layout = plan_layout([(16, 16)], 2, 1, 1, ["checkpoint-1500", "checkpoint-3000"], [], [])
    font = load_font(layout.font_px)
    assert layout.cell_w > 16
    assert wrap("checkpoint-1500", font, layout.cell_w - 4) == ["checkpoint-1500"]


def test_wrap_breaks_at_spaces_cuts_long_words_and_limits_lines():
    font = load_font(12)
    lines = wrap("a fairly long label that will not fit", font, 60)
    assert len(lines) > 1 and all(font.getlength(line) <= 60 for line in lines)
    cut = wrap("x" * 200, font, 40, max_lines=2)
    assert len(cut) == 2 and cut[-1].endswith("...")


@pytest.mark.parametrize("label", ["evil\x1b]0;title\x07", "zero\u200bwidth", "new\nline"])
def test_labels_are_drawn_visible_never_raw(label):
    font = load_font(12)
    text = " ".join(wrap(label, font, 400))
    assert "\x1b" not in text and "\u200b" not in text and "\n" not in text
    assert "\\" in text  # the escape is shown
