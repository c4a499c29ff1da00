"""``core.picture_files.open_picture``: every picture sdrepl decodes is bounded by its header first."""

from __future__ import annotations

import os

import pytest
from attack_corpus import png
from PIL import Image

from sdrepl.core.picture_files import MAX_PICTURE_PIXELS, PictureError, open_picture


def test_an_ordinary_picture_opens_as_rgb_with_exif_orientation(tmp_path):
    path = tmp_path / "photo.jpg"
    image = Image.new("RGB", (6, 4), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(path, exif=exif)
    opened = open_picture(path)
    assert opened.mode == "RGB" and opened.size == (4, 6)


@pytest.mark.parametrize("side, expected", [
    (9000, r"declares 9000x9000 pixels, more than the 64,000,000"),  # under Pillow's own bomb limit
    (20000, r"declares a picture too large to decode"),  # over it: Pillow refuses while opening
])
def test_a_header_declaring_a_huge_picture_is_refused_before_decoding(tmp_path, side, expected):
    path = tmp_path / "bomb.png"
    path.write_bytes(png(side, side))
    assert os.path.getsize(path) < 1024 * 1024  # 81 or 400 megapixels in well under a MiB
    with pytest.raises(PictureError, match=expected + ".*scale it down"):
        open_picture(path)


def test_the_pixel_limit_is_one_number_callers_can_lower(tmp_path):
    path = tmp_path / "small.png"
    Image.new("RGB", (10, 10)).save(path)
    assert open_picture(path).size == (10, 10)
    with pytest.raises(PictureError, match="more than the 99"):
        open_picture(path, max_pixels=99)
    assert MAX_PICTURE_PIXELS >= 24_000_000  # a camera photo is a normal training picture


@pytest.mark.parametrize("make, expected", [
    (lambda p: None, "no such file"),
    (lambda p: p.write_bytes(b"not a picture at all"), "not a picture Pillow recognises"),
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40), "not a picture"),
    (lambda p: os.mkfifo(p), "FIFO"),
    (lambda p: p.mkdir(), "folder"),
])
def test_bad_files_give_one_clear_error(tmp_path, make, expected):
    path = tmp_path / "x.png"
    make(path)
    with pytest.raises(PictureError, match=expected) as info:
        open_picture(path)
    assert info.value.path == str(path)


def test_a_truncated_picture_is_an_error_not_a_partial_picture(tmp_path):
    path = tmp_path / "cut.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(PictureError, match="not a picture that can be read"):
        open_picture(path)
