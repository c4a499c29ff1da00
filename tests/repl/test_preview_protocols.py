"""Each picture protocol's bytes parsed back by its documented form (``preview_decoders``), for small pictures."""

from __future__ import annotations

import io

import numpy as np
import preview_decoders as decode
import pytest
from PIL import Image

from sdrepl.repl.preview import encoders, render


def gradient(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float64)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float64)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                          np.broadcast_to((x + y) / 2, (height, width, 1))], axis=2)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


# -- kitty --------------------------------------------------------------------------------------------

def test_kitty_is_one_a_T_f_100_escape_for_a_small_picture():
    image = gradient(8, 4)
    png = encoders.png_bytes(image)
    keys, payload = decode.kitty(encoders.kitty(png, 3, 2))
    assert len(keys) == 1
    assert keys[0] == {"a": "T", "f": "100", "c": "3", "r": "2", "q": "2", "m": "0"}
    assert payload == png
    assert np.array_equal(pixels(payload), np.asarray(image))


def test_kitty_chunks_a_large_payload_at_4096_with_m_1_until_the_last():
    image = noise(64, 64)  # noise does not compress: the PNG is > 12 KiB, several chunks
    png = encoders.png_bytes(image)
    text = encoders.kitty(png, 10, 5)
    keys, payload = decode.kitty(text)
    assert len(keys) == -(-len(encoders.base64.b64encode(png)) // 4096) >= 3
    assert keys[0]["a"] == "T" and keys[0]["f"] == "100" and keys[0]["q"] == "2"
    assert [k["m"] for k in keys] == ["1"] * (len(keys) - 1) + ["0"]
    assert all(set(k) == {"m"} for k in keys[1:])  # later chunks carry only m, as the protocol says
    chunks = decode.KITTY.findall(text)
    assert all(len(c) == 4096 for _, c in chunks[:-1])
    assert payload == png


# -- iTerm2 -------------------------------------------------------------------------------------------

def test_iterm_is_osc_1337_file_inline_with_size_and_the_base64_file():
    image = gradient(6, 6)
    png = encoders.png_bytes(image)
    args, payload = decode.iterm(encoders.iterm(png, 4, 2))
    assert args == {"inline": "1", "size": str(len(png)), "width": "4", "height": "2", "preserveAspectRatio": "1"}
    assert payload == png
    assert np.array_equal(pixels(payload), np.asarray(image))


# -- sixel --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(5, 6), (7, 13), (16, 16)])
def test_sixel_decodes_to_the_quantised_picture(size):
    image = gradient(*size)
    quantised = encoders.quantise(image)
    text = encoders.sixel(image)
    assert text.startswith("\x1bPq") and text.endswith("\x1b\\")
    index, palette, raster = decode.sixel(text)
    assert raster == size
    expected = np.asarray(quantised)
    assert np.array_equal(index, expected)  # every pixel drawn, in its quantised colour
    rgb = np.array(quantised.getpalette()[: 3 * 256]).reshape(-1, 3)
    for i in np.unique(expected):
        assert palette[int(i)] == tuple(round(c * 100 / 255) for c in rgb[i])  # percent, as sixel's #i;2;r;g;b


def test_sixel_run_length_encodes_flat_areas():
    image = Image.new("RGB", (40, 6), (255, 0, 0))
    text = encoders.sixel(image)
    assert "!40~" in text  # 40 columns of all six pixels set: one repeat
    index, palette, _ = decode.sixel(text)
    assert (index == index[0, 0]).all() and palette[int(index[0, 0])] == (100, 0, 0)


def test_sixel_keeps_at_most_256_colours():
    text = encoders.sixel(noise(32, 32, seed=3))
    _, palette, _ = decode.sixel(text)
    assert 1 < len(palette) <= 256


# -- half-blocks --------------------------------------------------------------------------------------

def test_half_blocks_of_a_2x2_picture_cell_by_cell_in_truecolour():
    image = Image.new("RGB", (2, 2))
    colours = {(0, 0): (255, 0, 0), (1, 0): (0, 255, 0), (0, 1): (0, 0, 255), (1, 1): (250, 251, 252)}
    for xy, rgb in colours.items():
        image.putpixel(xy, rgb)
    cells = decode.blocks(encoders.blocks(image, truecolor=True))
    assert len(cells) == 1 and len(cells[0]) == 2
    for x, (char, fg, bg) in enumerate(cells[0]):
        assert char == "▀"
        assert fg == ("rgb", *colours[(x, 0)])  # top pixel = foreground
        assert bg == ("rgb", *colours[(x, 1)])  # bottom pixel = background


def test_half_blocks_in_256_colours_use_the_xterm_palette():
    image = Image.new("RGB", (2, 2))
    for xy, rgb in {(0, 0): (255, 0, 0), (1, 0): (0, 0, 0), (0, 1): (128, 128, 128), (1, 1): (255, 255, 255)}.items():
        image.putpixel(xy, rgb)
    cells = decode.blocks(encoders.blocks(image, truecolor=False))
    assert [(fg, bg) for _, fg, bg in cells[0]] == [(("256", 196), ("256", 244)), (("256", 16), ("256", 231))]


def test_half_blocks_odd_height_leave_the_last_lower_half_to_the_terminal():
    image = Image.new("RGB", (1, 3), (10, 20, 30))
    cells = decode.blocks(encoders.blocks(image))
    assert len(cells) == 2
    assert cells[0][0][2] == ("rgb", 10, 20, 30)
    assert cells[1][0][1] == ("rgb", 10, 20, 30) and cells[1][0][2] is None


def test_xterm_256_maps_cube_and_grey_ramp():
    assert encoders.xterm_256((0, 0, 0)) == 16
    assert encoders.xterm_256((255, 255, 255)) == 231
    assert encoders.xterm_256((95, 135, 175)) == 16 + 36 * 1 + 6 * 2 + 3
    assert encoders.xterm_256((8, 8, 8)) == 232
    assert encoders.xterm_256((238, 238, 238)) == 255


# -- sizing -------------------------------------------------------------------------------------------

def test_fit_keeps_the_aspect_and_never_enlarges():
    assert render.fit(512, 512, 80, 20, (10, 20)) == (40, 20)  # 51x26 native does not fit 20 rows
    assert render.fit(64, 64, 80, 20, (10, 20)) == (6, 3)  # native size
    assert render.fit(768, 512, 200, 100, (10, 20)) == (77, 26)
    cols, rows = render.fit(512, 512, 80, 24, (1, 2))  # half-blocks: 1x2 pixels a cell
    assert (cols, rows) == (48, 24)


def test_thumbnail_box_is_at_most_half_the_screen():
    assert render.box(120, 40, large=False) == (119, 20)
    assert render.box(120, 40, large=True) == (119, 36)


def test_encode_blocks_fits_the_box():
    text = render.encode(gradient(512, 256), "blocks", 40, 30)
    cells = decode.blocks(text)
    assert len(cells[0]) == 40 and len(cells) == 10  # 512x256 -> 40 columns, 20 pixel rows


def test_encode_sixel_is_resized_to_the_cells():
    text = render.encode(gradient(512, 512), "sixel", 100, 10, cell=(8, 16))
    _, _, raster = decode.sixel(text.rstrip("\r\n"))
    assert raster == (160, 160)  # 10 rows of 16 px


def test_encode_kitty_in_tmux_wraps_every_escape_for_passthrough():
    text = render.encode(noise(64, 64), "kitty", 10, 5, cell=(8, 16), tmux=True)
    wrapped = text[text.index("\x1bPtmux;"):text.rindex("\x1b\\") + 2]
    pieces = wrapped.split("\x1bPtmux;")[1:]
    assert len(pieces) >= 2
    inner = "".join(p[:-2].replace("\x1b\x1b", "\x1b") for p in pieces)  # undo the doubling, drop each ST
    keys, payload = decode.kitty(inner)
    assert keys[0]["a"] == "T" and Image.open(io.BytesIO(payload)).size == (64, 64)
