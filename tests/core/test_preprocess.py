"""``!preprocess SRC DST``: squares, split, flips, captions carried along, bad files skipped and reported."""

from __future__ import annotations

import pytest
from PIL import Image

from sdrepl.core.errors import TrainingError
from sdrepl.core.training.captions import read_caption
from sdrepl.core.training.preprocess import preprocess


@pytest.fixture()
def src(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    Image.new("RGB", (300, 200), (255, 0, 0)).save(folder / "000007-1-a red wall.png")
    Image.new("RGB", (100, 100), (0, 0, 255)).save(folder / "IMG_0001.jpg")
    (folder / "IMG_0001.txt").write_text("a blue square, studio light\n")
    (folder / "broken.png").write_bytes(b"nope")
    (folder / "notes.md").write_text("not a picture")
    return folder


def test_center_crop_writes_one_square_each_and_carries_captions(src, tmp_path):
    report = preprocess(src, tmp_path / "dst", 64, crop="center")
    outputs = sorted((tmp_path / "dst").glob("*.png"))
    assert report.written == 2 == len(outputs)
    assert all(Image.open(p).size == (64, 64) for p in outputs)
    assert {read_caption(p) for p in outputs} == {"a red wall", "a blue square, studio light"}
    assert {s["reason"].split(" (")[0] for s in report.skipped} == {"cannot read it", "not a picture"}
    assert report.describe()["dst"] == str(tmp_path / "dst")


def test_split_turns_an_oversized_picture_into_two_overlapping_squares(src, tmp_path):
    report = preprocess(src, tmp_path / "dst", 64, crop="split")
    names = sorted(p.name for p in (tmp_path / "dst").glob("*.png"))
    assert report.written == 3
    assert names == ["00001-0-a red wall.png", "00001-1-a red wall.png", "00002-0-IMG_0001.png"]


def test_flip_adds_a_mirrored_copy(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 16, 64))
    image.save(folder / "left.png")
    report = preprocess(folder, tmp_path / "dst", 64, flip=True)
    original, mirrored = (Image.open(p) for p in sorted((tmp_path / "dst").glob("*.png")))
    assert report.written == 2
    assert original.getpixel((2, 30)) == (255, 255, 255) and mirrored.getpixel((61, 30)) == (255, 255, 255)


def test_caption_writes_a_sidecar_for_every_output(src, tmp_path):
    preprocess(src, tmp_path / "dst", 64, caption=True)
    assert len(list((tmp_path / "dst").glob("*.txt"))) == 2


def test_none_stretches(src, tmp_path):
    preprocess(src, tmp_path / "dst", 64, crop="none")
    assert all(Image.open(p).size == (64, 64) for p in (tmp_path / "dst").glob("*.png"))


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [({"crop": "zoom"}, "--crop 'zoom'"), ({"size": 60}, "--size 60"), ({"same": True}, "is the source folder")],
)
def test_bad_requests_are_explained(src, tmp_path, kwargs, expected):
    dst = src if kwargs.pop("same", False) else tmp_path / "dst"
    with pytest.raises(TrainingError, match=expected):
        preprocess(src, dst, kwargs.pop("size", 64), **kwargs)


def test_a_missing_source_is_reported(tmp_path):
    with pytest.raises(TrainingError, match="is not a folder"):
        preprocess(tmp_path / "missing", tmp_path / "dst", 64)
