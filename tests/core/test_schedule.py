"""Prompt editing, alternation and AND: exact schedules for A1111's documented examples and its rules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdrepl.core.schedule import plan_prompts, prompt_schedule, split_and, when_step


def entries(text: str, steps: int, **kwargs) -> list[list]:
    return [[end, t] for end, t in prompt_schedule(text, steps, **kwargs).entries]


# --- A1111's documented examples (wiki "Prompt editing" / "Alternating words", prompt_parser doctests) -----


def test_fantasy_to_cyberpunk_at_step_16():
    schedule = prompt_schedule("a [fantasy:cyberpunk:16] landscape", 20)
    assert schedule.entries == ((16, "a fantasy landscape"), (20, "a cyberpunk landscape"))
    # A1111 counts sampling steps from 0 and takes the first entry ending at or after the step
    assert [schedule.text_at(k) for k in range(20)] == ["a fantasy landscape"] * 17 + ["a cyberpunk landscape"] * 3


def test_cow_horse_alternates_every_step():
    schedule = prompt_schedule("[cow|horse] in a field", 20)
    assert schedule.entries == tuple((k, "cow in a field" if k % 2 else "horse in a field") for k in range(1, 21))
    used = [schedule.text_at(k) for k in range(20)]
    assert used[:4] == ["cow in a field", "cow in a field", "horse in a field", "cow in a field"]
    assert schedule.texts() == ["cow in a field", "horse in a field"]


def test_adding_after_a_quarter():
    assert entries("a cat [:in foreground:0.25]", 20) == [[5, "a cat "], [20, "a cat in foreground"]]
    assert entries("a cat [in foreground:0.25]", 20) == [[5, "a cat "], [20, "a cat in foreground"]]


def test_removing_after_a_fraction():
    assert entries("a cat[ in foreground::0.6]", 10) == [[6, "a cat in foreground"], [10, "a cat"]]


def test_the_wiki_landscape_over_100_steps():
    prompt = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
              "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]")
    assert entries(prompt, 100) == [
        [25, "fantasy landscape with a mountain and an oak in foreground shoddy"],
        [50, "fantasy landscape with a lake and an oak in foreground in background shoddy"],
        [60, "fantasy landscape with a lake and an oak in foreground in background masterful"],
        [75, "fantasy landscape with a lake and an oak in background masterful"],
        [100, "fantasy landscape with a lake and a christmas tree in background masterful"],
    ]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("test", [[10, "test"]]),
        ("a [b:3]", [[3, "a "], [10, "a b"]]),
        ("a [b: 3]", [[3, "a "], [10, "a b"]]),
        ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
        ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
        ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
        ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),  # nested editing
        ("a [unbalanced", [[10, "a [unbalanced"]]),
        ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
        ("a [{b|d{:.5] c", [[10, "a [{b|d{:.5] c"]]),  # its doctest predates '|' in the grammar: unreadable
        ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
        ("[a|(b:1.1)]", [[k, "a" if k % 2 else "(b:1.1)"] for k in range(1, 11)]),
        ("[fe|]male", [[k, "female" if k % 2 else "male"] for k in range(1, 11)]),
        ("[fe|||]male", [[k, "female" if k % 4 == 1 else "male"] for k in range(1, 11)]),
    ],
)
def test_a1111_doctests(prompt, expected):
    assert entries(prompt, 10) == expected


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("a [b:.5] c", [[10, "a b c"]]), ("a [b:1.5] c", [[5, "a  c"], [10, "a b c"]])],
)
def test_a_hires_pass_counts_fractions_from_one(prompt, expected):
    assert entries(prompt, 10, base_steps=10) == expected


# --- the rules ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "steps", "expected"),
    [("16", 20, 16), ("0.25", 20, 5), (".5", 10, 5), ("1.0", 20, 20), ("1", 20, 1), ("1e1", 20, 10),
     ("30", 20, 20), ("1.3", 20, 20), ("0.99", 20, 19), ("-1", 20, -1), ("0", 20, 0), ("1e400", 20, 20)],
)
def test_when_is_a_fraction_with_a_decimal_point_else_a_step(number, steps, expected):
    assert when_step(number, steps) == expected


def test_misused_text_weight_in_square_brackets_is_dropped_as_in_a1111():
    # [blurry:1.3] means "add 'blurry' after 130% of the steps": never
    assert entries("a photo, [blurry:1.3]", 20) == [[20, "a photo, "]]
    assert entries("a photo, [blurry:30]", 20) == [[20, "a photo, "]]


def test_a_when_below_one_uses_the_second_text_from_the_start():
    assert entries("[a:b:0]", 10) == [[10, "b"]]
    assert entries("[a:b:0.01]", 10) == [[10, "b"]]


def test_a_prompt_the_grammar_cannot_read_is_used_as_it_is():
    for prompt in ("a | b [c:d:2]", "(a|b) [c:d:2]", "[a|b", "x [c:d:2] \\"):
        assert entries(prompt, 10) == [[10, prompt]]


def test_escaped_brackets_and_plain_colons_are_text():
    assert entries(r"\[a:b:3\] score:9", 10) == [[10, r"\[a:b:3\] score:9"]]
    assert entries("embedding:foo, [x:y:2]", 10) == [[2, "embedding:foo, x"], [10, "embedding:foo, y"]]


def test_constructs_inside_emphasis_and_alternation_are_scheduled():
    assert entries("(a [b:c:3]:1.2)", 10) == [[3, "(a b:1.2)"], [10, "(a c:1.2)"]]
    assert entries("[a|[b:c:2]]", 4) == [[1, "a"], [2, "b"], [3, "a"], [4, "c"]]


def test_stray_brackets_right_after_an_edit_keep_the_edit():
    # A1111's lark parser reads some of these literally (an ambiguity it resolves by parse order); sdrepl
    # takes the edit the user wrote (README: departures from A1111)
    assert entries("[a:b:2]]]", 4) == [[2, "a]]"], [4, "b]]"]]


def test_spans_and_changes():
    schedule = prompt_schedule("a [b:c:2] d", 5)
    assert [(s.first, s.last, s.text) for s in schedule.spans()] == [(0, 2, "a b d"), (3, 4, "a c d")]
    assert schedule.spans()[0].describe() == {"steps": [1, 3], "text": "a b d"}
    assert schedule.changes
    assert not prompt_schedule("a [b:c:20] d", 5).changes  # capped at the steps: never switches


def test_deep_nesting_is_not_scheduled_but_does_not_fail():
    prompt = "[" * 300 + "a:2" + "]" * 300
    assert prompt_schedule(prompt, 4).texts() == [prompt]


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="ab :|[]()\\.12", max_size=30), steps=st.integers(1, 12))
def test_any_text_gives_a_schedule_covering_every_step(text, steps):
    schedule = prompt_schedule(text, steps)
    ends = [end for end, _ in schedule.entries]
    assert ends == sorted(set(ends)) and ends[-1] == steps and ends[0] >= 1
    assert len(schedule.spans()) >= 1 and sum(s.last - s.first + 1 for s in schedule.spans()) == steps


# --- AND and trailing weights ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a cat AND a dog", [("a cat", 1.0), (" a dog", 1.0)]),
        ("a cat:1.2 AND a dog :0.5", [("a cat", 1.2), (" a dog", 0.5)]),
        ("masterpiece, score:9", [("masterpiece, score", 9.0)]),  # A1111: a trailing number is the weight
        ("x: -.5 ", [("x", -0.5)]),
        ("(a:1.2)", [("(a:1.2)", 1.0)]),
        ("[b:0.5]", [("[b:0.5]", 1.0)]),
        ("a:1e5", [("a:1e5", 1.0)]),
        ("ANDROID AND BAND", [("ANDROID", 1.0), (" BAND", 1.0)]),
        ("a and b", [("a and b", 1.0)]),
        ("AND x", [("", 1.0), (" x", 1.0)]),
    ],
)
def test_split_and(prompt, expected):
    assert split_and(prompt) == expected


def test_a_plan_schedules_each_part_and_the_negative_without_and():
    plan = plan_prompts("a [cat:dog:2] AND a hat:0.5", "blurry AND [ugly:2]", 4)
    assert [(p.text, p.weight) for p in plan.parts] == [("a [cat:dog:2]", 1.0), (" a hat", 0.5)]
    assert plan.parts[0].schedule.texts() == ["a cat", "a dog"]
    assert plan.negative.texts() == ["blurry AND ", "blurry AND ugly"]  # AND is text in a negative prompt
    assert plan.composed and plan.changes
    assert plan.texts() == ["a cat", "a dog", " a hat", "blurry AND ", "blurry AND ugly"]
    plain = plan_prompts("a cat", "", 4)
    assert not plain.composed and not plain.changes and plain.texts() == ["a cat", ""]
