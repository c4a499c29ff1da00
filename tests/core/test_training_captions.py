"""``[filewords]``: captions from file names (A1111 rules), sidecar files, tag shuffling and dropout."""

from __future__ import annotations

import random

import pytest

from sdrepl.core.errors import TrainingError
from sdrepl.core.training.captions import (
    augment_caption,
    caption_from_name,
    compile_filename_regex,
    read_caption,
)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("000001-1-a man in suit.png", "a man in suit"),
        ("00012-0-red car.jpg", "red car"),
        ("0001-a dog.webp", "a dog"),
        ("a cat.png", "a cat"),
        ("2girls.png", "2girls"),  # a leading number that is part of the caption stays
        ("000001-1-.png", ""),
    ],
)
def test_the_numbering_and_extension_are_stripped(name, expected):
    assert caption_from_name(name) == expected


def test_filename_regex_keeps_matches_joined_with_join():
    regex = compile_filename_regex(r"\w+")
    assert caption_from_name("000001-1-a man in suit.png", regex, ", ") == "a, man, in, suit"


def test_filename_regex_without_join_uses_a_space():
    regex = compile_filename_regex(r"[a-z]+")
    assert caption_from_name("000001-1-a_man_in_suit.png", regex) == "a man in suit"


def test_a_bad_filename_regex_is_a_training_error_naming_the_option():
    with pytest.raises(TrainingError, match=r"--filename-regex '\(' is not a valid regular expression"):
        compile_filename_regex("(")


def test_a_sidecar_txt_wins_over_the_file_name(tmp_path):
    image = tmp_path / "000001-1-a man in suit.png"
    image.write_bytes(b"")
    (tmp_path / "000001-1-a man in suit.txt").write_text("portrait,  grey\nsuit \n", encoding="utf-8")
    assert read_caption(image) == "portrait, grey suit"


def test_without_a_sidecar_the_file_name_is_used(tmp_path):
    image = tmp_path / "000001-1-a man in suit.png"
    image.write_bytes(b"")
    assert read_caption(image, compile_filename_regex(r"\w+"), ", ") == "a, man, in, suit"


def test_no_augmentation_returns_the_caption_unchanged():
    rng = random.Random(0)
    state = rng.getstate()
    assert augment_caption("a, b, c", rng) == "a, b, c"
    assert rng.getstate() == state  # no draws when nothing is asked for


def test_shuffle_tags_is_a_permutation_decided_by_the_seed():
    caption = "a, b, c, d, e, f"
    first = augment_caption(caption, random.Random(7), shuffle=True)
    again = augment_caption(caption, random.Random(7), shuffle=True)
    assert first == again
    assert sorted(first.split(", ")) == ["a", "b", "c", "d", "e", "f"]
    assert first != caption  # seed 7 moves something (fixed by the seed)


def test_tag_dropout_drops_tags_with_the_given_probability():
    rng = random.Random(3)
    tags = ", ".join(f"t{i}" for i in range(1000))
    kept = augment_caption(tags, rng, dropout=0.25).split(", ")
    assert 700 < len(kept) < 800
    assert kept == sorted(kept, key=lambda t: int(t[1:]))  # dropout alone keeps the order


def test_dropout_replays_with_the_same_seed():
    caption = "red, green, blue, cyan, magenta"
    assert augment_caption(caption, random.Random(11), shuffle=True, dropout=0.5) == augment_caption(
        caption, random.Random(11), shuffle=True, dropout=0.5
    )
