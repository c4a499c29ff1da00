"""Prompt templates: the built-in lists, template files, ``--property``, and filling ``[filewords]``."""

from __future__ import annotations

import pytest

from sdrepl.core.errors import TrainingError
from sdrepl.core.training.templates import (
    BUILTIN,
    fill_filewords,
    load_template,
    template_for_property,
    uses_filewords,
)


@pytest.mark.parametrize("name", ["subject", "style", "subject_filewords", "style_filewords", "none"])
def test_every_builtin_line_has_name(name):
    lines = load_template(name)
    assert lines
    assert all("[name]" in line for line in lines)


@pytest.mark.parametrize(
    ("name", "filewords"),
    [("subject", False), ("style", False), ("subject_filewords", True), ("style_filewords", True), ("none", False)],
)
def test_only_the_filewords_templates_use_filewords(name, filewords):
    assert uses_filewords(BUILTIN[name]) is filewords


def test_none_is_the_bare_name():
    assert load_template("none") == ("[name]",)


def test_subject_filewords_reads_like_a1111():
    assert "a photo of a [name], [filewords]" in load_template("subject_filewords")


@pytest.mark.parametrize(("prop", "template"), [("object", "subject"), ("style", "style")])
def test_property_maps_to_a_template(prop, template):
    assert template_for_property(prop) == template


def test_an_unknown_property_names_the_choices():
    with pytest.raises(TrainingError, match="--property 'thing': expected object or style"):
        template_for_property("thing")


def test_a_template_file_has_one_line_each(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("# my templates\n\na drawing of [name]\n  [name] on a table, [filewords]  \n", encoding="utf-8")
    assert load_template(str(path)) == ("a drawing of [name]", "[name] on a table, [filewords]")


def test_a_template_file_line_without_name_is_reported_by_number(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("a drawing of [name]\na drawing of a cat\n", encoding="utf-8")
    with pytest.raises(TrainingError, match=r"line\(s\) 2 have no \[name\]"):
        load_template(str(path))


def test_an_empty_template_file_is_an_error(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(TrainingError, match="has no template lines"):
        load_template(str(path))


def test_neither_builtin_nor_file_lists_the_builtins(tmp_path):
    with pytest.raises(TrainingError, match="neither a built-in template .*subject_filewords.* nor an existing file"):
        load_template(str(tmp_path / "missing.txt"))


@pytest.mark.parametrize(
    ("line", "words", "expected"),
    [
        ("a photo of a [name], [filewords]", "red car", "a photo of a [name], red car"),
        ("a photo of a [name], [filewords]", "", "a photo of a [name]"),
        ("[name]", "ignored", "[name]"),
    ],
)
def test_fill_filewords(line, words, expected):
    assert fill_filewords(line, words) == expected
