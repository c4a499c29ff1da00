"""The ``!mix`` expression language: parsing, evaluation per encoder, and errors that say where and what."""

from __future__ import annotations

import pytest
import torch

from sdrepl.core.mix import MixError, evaluate, names, parse

A = {"text_encoder": torch.arange(8, dtype=torch.float32).reshape(2, 4)}
B = {"text_encoder": torch.ones(2, 4)}
C = {"text_encoder": torch.full((3, 4), 2.0)}
PAIR = {"clip_l": torch.ones(2, 3), "clip_g": torch.full((2, 5), 3.0)}
LIB = {"a": A, "b": B, "c": C, "pair": PAIR, "x/y": B}


def text(words: str) -> dict[str, torch.Tensor]:
    return {"text_encoder": torch.full((len(words.split()), 4), 7.0)}


def mix(source: str) -> dict[str, torch.Tensor]:
    return evaluate(parse(source), source, LIB.__getitem__, text)


def test_one_times_is_bit_identical():
    assert torch.equal(mix("1*<a>")["text_encoder"], A["text_encoder"])
    assert torch.equal(mix("<a>")["text_encoder"], A["text_encoder"])


def test_weighted_sums_scaling_and_precedence():
    assert torch.equal(mix("0.5*<a> + 0.5*<b>")["text_encoder"], 0.5 * A["text_encoder"] + 0.5 * B["text_encoder"])
    assert torch.equal(mix("<a> - <b>/2")["text_encoder"], A["text_encoder"] - B["text_encoder"] / 2)
    assert torch.equal(mix("-(<a> + <b>) * 2")["text_encoder"], -(A["text_encoder"] + B["text_encoder"]) * 2)
    assert torch.equal(mix("(1 + 1) * <b>")["text_encoder"], 2 * B["text_encoder"])


def test_concatenation_and_slices():
    assert mix("<a> <c>")["text_encoder"].shape == (5, 4)
    assert torch.equal(mix("<a> <b>")["text_encoder"], torch.cat([A["text_encoder"], B["text_encoder"]]))
    assert torch.equal(mix("<a>[1]")["text_encoder"], A["text_encoder"][1:2])
    assert torch.equal(mix("<a>[-1]")["text_encoder"], A["text_encoder"][1:2])
    assert torch.equal(mix("<a>[::-1]")["text_encoder"], A["text_encoder"].flip(0))
    assert torch.equal(mix("(<a> <c>)[1:3]")["text_encoder"][0], A["text_encoder"][1])
    assert mix('"red fox" <a>[0]')["text_encoder"].shape == (3, 4)
    assert mix("<x/y> 0.5*<a>")["text_encoder"].shape == (4, 4)


def test_sdxl_pairs_mix_per_encoder():
    out = mix("2*<pair> <pair>[0]")
    assert out["clip_l"].shape == (3, 3) and out["clip_g"].shape == (3, 5)
    assert torch.equal(out["clip_g"][0], torch.full((5,), 6.0))


def test_names_in_order_of_first_use():
    assert names(parse("<b> + <a> <b>[0] <x/y>")) == ["b", "a", "x/y"]


@pytest.mark.parametrize("source, column, says", [
    ("0.5*<a> +", 10, "expected a term"),
    ("<a>[0:2", 8, "expected ']'"),
    ("0.5 <a>", 1, "a lone number"),
    ("<a> + <c>", 5, "same number of vectors"),
    ("<a> * <b>", 5, "a number on one side of *"),
    ("<a> + <pair>", 5, "same text encoders"),
    ("<a>[5]", 4, "an index from -2 to 1"),
    ("<a>[2:]", 4, "at least one vector"),
    ("<a> / 0", 5, "other than 0"),
    ("2 * 3", 3, "vectors"),
    ("<a> $ <b>", 5, "found '$'"),
    ('<a> "open', 5, "unterminated"),
    ("(<a>", 5, "')' to close the '(' at column 1"),
])
def test_errors_give_the_column_and_what_was_expected(source, column, says):
    with pytest.raises(MixError) as info:
        mix(source)
    message = str(info.value)
    assert f"column {column}:" in message and says in message, message
    assert message.splitlines()[-1].index("^") - 2 == column - 1  # the caret under the column


def test_bounds():
    with pytest.raises(MixError, match="at most 75 vectors"):
        mix(" ".join(["<c>"] * 26))
    with pytest.raises(MixError, match="characters long"):
        parse("<a>" + " + <a>" * 400)
    with pytest.raises(MixError, match="nesting"):
        parse("(" * 60 + "<a>" + ")" * 60)
    with pytest.raises(MixError, match="empty"):
        parse("  ")
