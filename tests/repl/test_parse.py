"""Generation lines: the `` --`` rule, aliases, InvokeAI short options, value checks and their errors."""

from __future__ import annotations

import pytest

from sdrepl.core.errors import PromptError, SamplerError, UsageError
from sdrepl.repl.parse import escape, parse_generation, unescape


@pytest.mark.parametrize("line, expected", [
    ("a red fox", {"prompt": "a red fox"}),
    ("a red fox --steps 2 --size 64x64", {"prompt": "a red fox", "steps": 2, "width": 64, "height": 64}),
    ("a cat --neg blurry, low quality --cfg 5.5", {"prompt": "a cat", "negative": "blurry, low quality", "cfg": 5.5}),
    ("a cat --negative ugly --seed 7 --n 3", {"prompt": "a cat", "negative": "ugly", "seed": 7, "n": 3}),
    ("a cat --sampler DPM++ 2M Karras", {"prompt": "a cat", "sampler": "DPM++ 2M Karras"}),
    ("a cat --sampler dpmpp_2m_karras", {"prompt": "a cat", "sampler": "DPM++ 2M Karras"}),
    ("a cat --steps=12", {"prompt": "a cat", "steps": 12}),
    ("a cat --steps 5 --steps 9", {"prompt": "a cat", "steps": 9}),
    ("a cat --neg \"\"", {"prompt": "a cat", "negative": ""}),
    ("a cat --clip-skip 2 --width 512 --height 768",
     {"prompt": "a cat", "clip_skip": 2, "width": 512, "height": 768}),
    ("--steps 3", {"prompt": "", "steps": 3}),
    ("a\nmulti-line prompt\n--steps 4", {"prompt": "a\nmulti-line prompt", "steps": 4}),
])
def test_options(line, expected):
    parsed = parse_generation(line)
    for key, value in expected.items():
        assert getattr(parsed, key) == value, key


@pytest.mark.parametrize("line, expected", [
    ("a cat -s 30 -S 42 -C 7.5", {"steps": 30, "seed": 42, "cfg": 7.5}),
    ("a cat -s30 -S42 -C7.5 -W512 -H768 -n2", {"steps": 30, "seed": 42, "cfg": 7.5, "width": 512, "height": 768,
                                                 "n": 2}),
    ("a cat -Ak_euler_a", {"sampler": "Euler a"}),
    ("a cat -A k_lms", {"sampler": "LMS"}),
    ("a cat -A ddim", {"sampler": "DDIM"}),
    ('"a cat" -s 50 -W 512', {"steps": 50, "width": 512}),
])
def test_invokeai_short_options(line, expected):
    parsed = parse_generation(line)
    assert parsed.prompt == "a cat"
    for key, value in expected.items():
        assert getattr(parsed, key) == value, key


@pytest.mark.parametrize("line, prompt", [
    ("a cat -- a dog", "a cat -- a dog"),            # '--' then a space: text
    ("well-known t-shirt", "well-known t-shirt"),     # dashes inside words
    ("a \\--steps poster --cfg 3", "a --steps poster"),  # escaped: literal
    ("an -s-curve road", "an -s-curve road"),         # not an option: -s glued to a non-number
    ("rock-n-roll", "rock-n-roll"),
    ('a sign saying "open"', 'a sign saying "open"'),  # quotes inside the prompt stay
    ('"open" and "closed"', '"open" and "closed"'),
])
def test_text_that_looks_like_options_stays_text(line, prompt):
    assert parse_generation(line).prompt == prompt


@pytest.mark.parametrize("line, seed", [("x --seed random", None), ("x --seed -1", None), ("x --seed 0", 0)])
def test_seed_random_forms(line, seed):
    parsed = parse_generation(line)
    assert parsed.seed == seed and parsed.seed_given


def test_unknown_option_names_it_and_lists_the_valid_ones():
    with pytest.raises(UsageError) as err:
        parse_generation("a cat --stpes 20")
    message = str(err.value)
    assert "--stpes" in message and "--steps N" in message and "--neg TEXT" in message


def test_option_without_value():
    with pytest.raises(UsageError, match=r"--steps .*needs a value"):
        parse_generation("a cat --steps")


@pytest.mark.parametrize("line, fragment", [
    ("a --steps many", "whole number"),
    ("a --steps 0", "1 to 1000"),
    ("a --cfg hot", "not a number"),
    ("a --size 500x500", "multiples of 8"),
    ("a --size big", "WIDTHxHEIGHT"),
    ("a --n 0", "out of range"),
    ("a --seed abc", "seed"),
])
def test_bad_values_are_prompt_errors(line, fragment):
    with pytest.raises(PromptError, match=fragment):
        parse_generation(line)


def test_unknown_sampler_lists_samplers():
    with pytest.raises(SamplerError, match="Euler a"):
        parse_generation("a --sampler warp drive")


@pytest.mark.parametrize("text", ["a --b c", "--x", "plain", "a\n--steps in text", "a -- b"])
def test_escape_round_trips(text):
    escaped = escape(text)
    assert parse_generation(escaped).prompt == text.strip()
    assert unescape(escaped) == text
