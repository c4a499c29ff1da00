"""Logical lines: comments, blank lines, \"\"\" blocks, line numbers, laziness, the incremental form."""

from __future__ import annotations

import pytest

from sdrepl.repl.lines import LineAssembler, logical_text, needs_more_input, read_lines


def texts(source: str) -> list[tuple[int, str]]:
    return [(line.number, line.text) for line in read_lines(source.splitlines(keepends=True))]


@pytest.mark.parametrize("source, expected", [
    ("a red fox\n", [(1, "a red fox")]),
    ("# comment\n\n   \na cat\n  # indented comment\n!tokens x\n", [(4, "a cat"), (6, "!tokens x")]),
    ("  padded line  \r\n", [(1, "padded line")]),
    ("", []),
])
def test_plain_lines_comments_and_blanks(source, expected):
    assert texts(source) == expected


def test_block_joins_lines_and_keeps_the_opening_line_number():
    source = 'first\n"""\na portrait,\n# not a comment in a block\n\noil --steps 2\n"""\nlast\n'
    lines = list(read_lines(source.splitlines()))
    assert [(line.number, line.text) for line in lines] == [
        (1, "first"),
        (2, "a portrait,\n# not a comment in a block\n\noil --steps 2"),
        (8, "last"),
    ]
    assert lines[1].source == '"""\na portrait,\n# not a comment in a block\n\noil --steps 2\n"""'


def test_text_after_the_closing_quotes_is_appended():
    (line,) = read_lines(['"""', "a long prompt", '""" --steps 30'])
    assert line.text == "a long prompt\n--steps 30"


def test_unclosed_block_is_an_error_naming_its_line():
    lines = list(read_lines(["a", '"""', "never closed"]))
    assert lines[0].text == "a"
    assert lines[1].number == 2 and lines[1].text == ""
    assert "line 2" in lines[1].error and '"""' in lines[1].error


def test_reading_is_lazy():
    pulled: list[int] = []

    def source():
        for i in range(1, 4):
            pulled.append(i)
            yield f"line {i}"

    iterator = read_lines(source())
    assert next(iterator).text == "line 1"
    assert pulled == [1]


def test_assembler_reports_pending_blocks():
    asm = LineAssembler()
    assert asm.feed("# c") is None and not asm.pending
    assert asm.feed('"""') is None and asm.pending
    assert asm.feed("x") is None
    line = asm.feed('"""')
    assert line is not None and line.text == "x" and line.number == 2
    assert not asm.pending and asm.finish() is None


@pytest.mark.parametrize("buffer, more", [
    ("a cat", False), ('"""', True), ('"""\na cat', True), ('"""\na cat\n"""', False), ("", False),
])
def test_needs_more_input(buffer, more):
    assert needs_more_input(buffer) is more


@pytest.mark.parametrize("buffer, text", [
    ("  a cat  ", "a cat"), ('"""\na\nb\n"""', "a\nb"), ("# only a comment", ""), ('"""\nunclosed', "unclosed"),
])
def test_logical_text_of_an_edit_buffer(buffer, text):
    assert logical_text(buffer) == text
