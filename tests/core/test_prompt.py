"""The prompt language parser: emphasis, BREAK, the three ways to name an embedding, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdrepl.core.embedding import SINGLE, Embedding, EmbeddingData
from sdrepl.core.errors import PromptError
from sdrepl.core.prompt import (
    BREAK,
    EmbeddingPiece,
    PromptOptions,
    StaticLookup,
    TextPiece,
    parse_prompt,
)


def make_embedding(name: str, n: int, folder: str = "") -> Embedding:
    data = EmbeddingData({SINGLE: torch.zeros(n, 768)}, "a1111")
    qualified = f"{folder}/{name}" if folder else name
    return Embedding(name, qualified, Path(f"/emb/{qualified}.pt"), data, "0" * 64)


@pytest.fixture
def lookup() -> StaticLookup:
    return StaticLookup(
        [
            make_embedding("bad-hands-5", 2),
            make_embedding("bad", 1),
            make_embedding("EasyNegative", 8),
            make_embedding("cat-toy", 1, folder="objects"),
        ]
    )


def texts(parsed) -> list[tuple[str, float]]:
    return [(p.text, round(p.weight, 6)) for p in parsed.pieces if isinstance(p, TextPiece)]


# --- emphasis -------------------------------------------------------------------------------------------

W11, W121, SQ = 1.1, round(1.1 * 1.1, 6), round(1 / 1.1, 6)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a cat", [("a cat", 1.0)]),
        ("a (cat) b", [("a ", 1.0), ("cat", W11), (" b", 1.0)]),
        ("[cat]", [("cat", SQ)]),
        ("(cat:1.3)", [("cat", 1.3)]),
        ("(cat: 0.5 )", [("cat", 0.5)]),
        ("((cat))", [("cat", W121)]),
        ("([cat])", [("cat", 1.0)]),
        ("(red (cat:1.5))", [("red ", W11), ("cat", 1.65)]),
        ("(cat", [("cat", W11)]),  # unclosed: applies to the rest
        ("[cat dog", [("cat dog", SQ)]),
        ("cat)", [("cat)", 1.0)]),  # a stray closer is text
        (r"\(cat\)", [("(cat)", 1.0)]),  # escaped brackets are literal
        (r"(a \(b\))", [("a (b)", W11)]),
        (r"\[x\]", [("[x]", 1.0)]),
        ("(a:x)", [("a:x", W11)]),  # not a number: the colon is text
        ("red(cat:1.0)", [("red", 1.0), ("cat", 1.0)]),  # brackets separate words (A1111 glues "redcat")
        ("a:b", [("a:b", 1.0)]),
    ],
)
def test_emphasis_weights(prompt, expected, lookup):
    assert texts(parse_prompt(prompt, lookup)) == expected


def test_break_is_an_upper_case_word_of_its_own(lookup):
    assert parse_prompt("cat BREAK dog", lookup).pieces == (TextPiece("cat"), BREAK, TextPiece("dog"))
    assert BREAK not in parse_prompt("cat break dog BREAKFAST aBREAK", lookup).pieces


def test_break_inside_brackets_still_breaks(lookup):
    pieces = parse_prompt("(cat BREAK dog)", lookup).pieces
    assert pieces[1] is BREAK
    assert [round(p.weight, 6) for p in pieces if isinstance(p, TextPiece)] == [W11, W11]


# --- embedding references -------------------------------------------------------------------------------


def refs(parsed) -> list[tuple[str, str, float]]:
    return [
        (p.embedding.trigger, p.form, round(p.weight, 6))
        for p in parsed.pieces
        if isinstance(p, EmbeddingPiece)
    ]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a photo of <bad-hands-5>", [("bad-hands-5", "angle", 1.0)]),
        ("<BAD-HANDS-5>", [("bad-hands-5", "angle", 1.0)]),  # case-insensitive
        ("<objects/cat-toy>", [("cat-toy", "angle", 1.0)]),  # folder/name
        ("(<cat-toy>:1.2)", [("cat-toy", "angle", 1.2)]),  # takes the weight of its segment
        ("[[<bad>]]", [("bad", "angle", round(1 / 1.21, 6))]),
        ("embedding:EasyNegative", [("EasyNegative", "comfy", 1.0)]),
        ("embedding:EasyNegative, cat", [("EasyNegative", "comfy", 1.0)]),
        ("embedding:EasyNegative.safetensors", [("EasyNegative", "comfy", 1.0)]),
        ("(embedding:easynegative:1.2)", [("EasyNegative", "comfy", 1.2)]),
        ("EasyNegative, bad-hands-5", [("EasyNegative", "bare", 1.0), ("bad-hands-5", "bare", 1.0)]),
        ("easynegative", [("EasyNegative", "bare", 1.0)]),
        ("bad-hands-5", [("bad-hands-5", "bare", 1.0)]),  # longest name first: not "bad" + text
        ("bad hands", [("bad", "bare", 1.0)]),
        ("EasyNegatives myEasyNegative bad-hands-5-v2 bad_luck", []),  # whole words only
        ("(EasyNegative:0.8)", [("EasyNegative", "bare", 0.8)]),
    ],
)
def test_embedding_references(prompt, expected, lookup):
    assert refs(parse_prompt(prompt, lookup)) == expected


def test_references_never_reach_the_model_as_text(lookup):
    parsed = parse_prompt("a <bad-hands-5> and embedding:EasyNegative", lookup)
    assert all(
        "<" not in p.text and "embedding" not in p.text for p in parsed.pieces if isinstance(p, TextPiece)
    )


def test_bare_names_can_be_switched_off(lookup):
    parsed = parse_prompt("EasyNegative, <bad> embedding:bad", lookup, bare_names=False)
    assert refs(parsed) == [("bad", "angle", 1.0), ("bad", "comfy", 1.0)]
    assert texts(parsed)[0] == ("EasyNegative, ", 1.0)
    assert parsed.bare == ()


def test_options_default_to_bare_names_on():
    assert PromptOptions() == PromptOptions(bare_names=True, comma_window=20, clip_skip=1)


def test_used_and_bare_names_are_reported_once_in_order(lookup):
    parsed = parse_prompt("EasyNegative <bad-hands-5> easynegative <objects/cat-toy>", lookup)
    assert parsed.embeddings == ("EasyNegative", "bad-hands-5", "objects/cat-toy")
    assert parsed.bare == ("EasyNegative", "easynegative")


def test_angle_brackets_with_spaces_around_are_text(lookup):
    assert refs(parse_prompt("a < b > c, 1<2", lookup)) == []


def test_escaped_angle_bracket_is_literal(lookup):
    parsed = parse_prompt(r"\<bad-hands-5>", lookup, bare_names=False)
    assert texts(parsed) == [("<bad-hands-5>", 1.0)]


# --- errors ---------------------------------------------------------------------------------------------


def test_unknown_name_suggests_the_closest(lookup):
    with pytest.raises(
        PromptError, match=r"<bad-hand> is not a loaded embedding: did you mean <bad-hands-5> or <bad>\?"
    ):
        parse_prompt("a photo of <bad-hand>", lookup)


def test_unknown_name_without_suggestion_says_where_to_look(lookup):
    with pytest.raises(PromptError, match=r"<zzzz> is not a loaded embedding \(!embeddings lists"):
        parse_prompt("<zzzz>", lookup)


def test_every_unknown_name_is_reported(lookup):
    with pytest.raises(PromptError) as info:
        parse_prompt("(<nope-one>:1.2) embedding:EasyNegativ, <nope-two>", lookup)
    message = str(info.value)
    assert "<nope-one>" in message and "<nope-two>" in message
    assert "embedding:EasyNegativ is not a loaded embedding: did you mean <EasyNegative>?" in message


def test_lora_tags_are_refused_with_a_reason(lookup):
    with pytest.raises(PromptError, match="LoRA and hypernetwork tags are not supported"):
        parse_prompt("a cat <lora:detail:0.8>", lookup)


def test_removed_embedding_becomes_an_error(lookup):
    parse_prompt("<bad>", lookup)
    lookup.remove("bad")
    with pytest.raises(PromptError):
        parse_prompt("<bad>", lookup)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab ():[]\\1.5,BREAK<>", max_size=40))
def test_any_text_without_a_reference_parses(text):
    lookup = StaticLookup([make_embedding("ab", 1)])
    try:
        parsed = parse_prompt(text, lookup)
    except PromptError as exc:  # only ever for something written as a reference
        assert "<" in text and ">" in text, exc
        return
    for piece in parsed.pieces:
        assert piece is BREAK or piece.weight > 0
