"""Scheduled prompts through the budget and the encoder: max over schedules, per-part budgets, per-step
tensors, padding as A1111 does it, and the emphasis modes."""

from __future__ import annotations

import pytest
import torch

from sdrepl.core.budget import count_tokens
from sdrepl.core.conditioning import encode_prompts, encode_text
from sdrepl.core.errors import PromptError
from sdrepl.core.plan_budget import scheduled_prompt_budget
from sdrepl.core.plan_conditioning import encode_scheduled, pad_with_last
from sdrepl.core.prompt import PromptOptions, StaticLookup, emphasis_mode, parse_prompt
from sdrepl.core.schedule import prompt_schedule

LOOKUP = StaticLookup()


def cats(n: int) -> str:
    return " ".join(["cat"] * n)


# --- the budget -----------------------------------------------------------------------------------------


def test_the_budget_of_an_edited_prompt_is_the_largest_of_its_texts(tokenizer):
    prompt = f"a [{cats(80)}:dog:0.5] house"
    budget = scheduled_prompt_budget(prompt, "", tokenizer, LOOKUP, steps=20)
    texts = prompt_schedule(prompt, 20).texts()
    counts = [count_tokens(t, tokenizer, LOOKUP).count for t in texts]
    assert budget["count"] == max(counts) == 82 and budget["limit"] == 150 and budget["chunks"] == 2
    assert budget["changes"] is True
    assert [(s["text"], s["steps"], s["count"]) for s in budget["schedule"]] == [
        (f"a {cats(80)} house", [[1, 11]], 82),
        ("a dog house", [[12, 20]], 3),
    ]
    assert budget["negative"]["count"] == 0 and budget["negative"]["changes"] is False


def test_alternation_lists_each_text_with_its_steps(tokenizer):
    budget = scheduled_prompt_budget("[cow|horse] in a field", "", tokenizer, LOOKUP, steps=6)
    assert [(s["text"], s["steps"]) for s in budget["schedule"]] == [
        ("cow in a field", [[1, 2], [4, 4], [6, 6]]),
        ("horse in a field", [[3, 3], [5, 5]]),
    ]


def test_the_step_count_decides_which_texts_are_used(tokenizer):
    prompt = f"[{cats(80)}:dog:0.05]"  # 0.05 of 10 steps is step 0: the long text is never used
    assert scheduled_prompt_budget(prompt, "", tokenizer, LOOKUP, steps=10)["count"] == 1
    assert scheduled_prompt_budget(prompt, "", tokenizer, LOOKUP, steps=40)["count"] == 80


def test_and_parts_each_have_a_budget_and_the_largest_is_shown(tokenizer):
    budget = scheduled_prompt_budget(f"a cat AND {cats(76)}:0.5", "", tokenizer, LOOKUP, steps=20)
    assert [(p["text"], p["weight"], p["count"], p["limit"]) for p in budget["parts"]] == [
        ("a cat", 1.0, 2, 75), (f" {cats(76)}", 0.5, 76, 150)]
    assert (budget["count"], budget["limit"], budget["chunks"]) == (76, 150, 2)


def test_a_plain_prompt_keeps_its_old_budget(tokenizer):
    from sdrepl.core.budget import prompt_budget

    old = prompt_budget("a photo, (tree:1.2)", "blurry", tokenizer, LOOKUP)
    new = scheduled_prompt_budget("a photo, (tree:1.2)", "blurry", tokenizer, LOOKUP, steps=20)
    assert {k: new[k] for k in old if k != "negative"} == {k: v for k, v in old.items() if k != "negative"}
    assert "schedule" not in new and "parts" not in new and new["changes"] is False
    assert new["negative"]["count"] == old["negative"]["count"]


def test_a_trailing_weight_is_shown_as_a_part(tokenizer):
    budget = scheduled_prompt_budget("masterpiece, score:9", "", tokenizer, LOOKUP, steps=20)
    assert [(p["text"], p["weight"]) for p in budget["parts"]] == [("masterpiece, score", 9.0)]


# --- the conditioning -----------------------------------------------------------------------------------


def test_each_step_gets_the_text_a1111s_schedule_says(tiny_model):
    cond = encode_scheduled(tiny_model, "a [fantasy:cyberpunk:16] landscape", "blurry", LOOKUP, steps=20)
    fantasy = encode_text(tiny_model, "a fantasy landscape", LOOKUP)
    cyberpunk = encode_text(tiny_model, "a cyberpunk landscape", LOOKUP)
    for k in range(20):
        step = cond.at(k)
        assert torch.equal(step.parts[0][0], fantasy if k <= 16 else cyberpunk), k
        assert torch.equal(step.negative, encode_text(tiny_model, "blurry", LOOKUP))
    assert set(cond.embeds) == {"a fantasy landscape", "a cyberpunk landscape", "blurry"}  # each once


def test_a_plain_prompt_gives_the_tensors_it_gave_before(tiny_model):
    old = encode_prompts(tiny_model, f"{cats(80)}, (tree:1.2)", "blurry", LOOKUP)
    new = encode_scheduled(tiny_model, f"{cats(80)}, (tree:1.2)", "blurry", LOOKUP, steps=4).at(0)
    assert new.plain
    assert torch.equal(new.parts[0][0], old.prompt_embeds) and torch.equal(new.negative, old.negative_prompt_embeds)


def test_and_parts_are_padded_by_their_last_vector_and_the_negative_by_empty_chunks(tiny_model):
    cond = encode_scheduled(tiny_model, f"a cat AND {cats(80)}:0.5 AND a dog", "x", LOOKUP, steps=2)
    step = cond.at(0)
    assert [w for _, w in step.parts] == [1.0, 0.5, 1.0]
    assert all(z.shape[1] == 154 for z, _ in step.parts) and step.negative.shape[1] == 154
    short = encode_text(tiny_model, "a cat", LOOKUP)
    assert torch.equal(step.parts[0][0], pad_with_last(short, 154))
    assert torch.equal(step.parts[0][0][:, 77:], short[:, -1:].expand(-1, 77, -1))
    empty = encode_text(tiny_model, "", LOOKUP)
    assert torch.equal(step.negative[:, 77:], empty)


def test_every_distinct_text_is_encoded_once(tiny_model, monkeypatch):
    import sdrepl.core.conditioning as conditioning

    seen = []
    real = conditioning._encode_one
    monkeypatch.setattr(conditioning, "_encode_one", lambda m, text, *a: seen.append(text) or real(m, text, *a))
    encode_scheduled(tiny_model, "[cow|horse] in a field", "[cow|horse] in a field", LOOKUP, steps=20)
    assert seen == ["cow in a field", "horse in a field"]


# --- emphasis modes and errors --------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "mode"), [("original", "Original"), ("No norm", "No norm"), ("no_norm", "No norm"),
                                            ("NONE", "None"), ("ignore", "Ignore")])
def test_emphasis_names(name, mode):
    assert emphasis_mode(name) == mode


def test_an_unknown_emphasis_names_the_choices():
    with pytest.raises(PromptError, match="Original, No norm, Ignore, None"):
        emphasis_mode("strong")


def test_emphasis_none_reads_brackets_as_text_but_keeps_names_and_break(tokenizer):
    from sdrepl.core.prompt import BREAK, TextPiece

    parsed = parse_prompt("a (cat:1.5) BREAK [dog]", LOOKUP, emphasis="None")
    assert parsed.pieces == (TextPiece("a (cat:1.5)"), BREAK, TextPiece("[dog]"))
    none = count_tokens("(cat:1.5)", tokenizer, LOOKUP, PromptOptions(emphasis="None"))
    assert none.count == len(tokenizer("(cat:1.5)", add_special_tokens=False)["input_ids"])


def test_emphasis_ignore_drops_the_weights():
    parsed = parse_prompt("a (cat:1.5) [dog]", LOOKUP, emphasis="Ignore")
    assert {p.weight for p in parsed.pieces} == {1.0}


def test_no_norm_scales_without_restoring_the_mean(tiny_model):
    plain = encode_text(tiny_model, "a cat", LOOKUP)
    original = encode_text(tiny_model, "a (cat:1.5)", LOOKUP)
    no_norm = encode_text(tiny_model, "a (cat:1.5)", LOOKUP, PromptOptions(emphasis="No norm"))
    assert torch.allclose(no_norm[0, 2], plain[0, 2] * 1.5) and torch.equal(no_norm[0, 1], plain[0, 1])
    assert not torch.equal(original, no_norm)
    assert torch.equal(encode_text(tiny_model, "a (cat:1.5)", LOOKUP, PromptOptions(emphasis="Ignore")), plain)


@pytest.mark.parametrize("prompt", ["(a:1.2.3)", "x, (a: 1..2 )", "(a:.)"])
def test_a_weight_that_is_not_a_number_is_an_error(prompt):
    with pytest.raises(PromptError, match="is not a number; an emphasis weight is one number"):
        parse_prompt(prompt, LOOKUP)


def test_a_bad_weight_in_any_scheduled_text_fails_before_sampling(tiny_model):
    with pytest.raises(PromptError, match="1.2.3"):
        encode_scheduled(tiny_model, "[(a:1.2.3)::5] b", "", LOOKUP, steps=10)


# --- SDXL -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xl():
    from sdrepl.core.models import load_model

    return load_model("tiny-sdxl", device="cpu", dtype="fp32")


def test_sdxl_plain_prompts_give_the_tensors_they_gave_before(xl):
    from sdrepl.core.conditioning_sdxl import encode_prompts_sdxl

    for negative in ("blurry", ""):
        old = encode_prompts_sdxl(xl, "a (tree:1.2)", negative, LOOKUP)
        at = encode_scheduled(xl, "a (tree:1.2)", negative, LOOKUP, steps=3).at(0)
        assert torch.equal(at.parts[0][0], old.prompt_embeds) and torch.equal(at.negative, old.negative_prompt_embeds)
        assert torch.equal(at.pooled[0], old.pooled) and torch.equal(at.negative_pooled, old.negative_pooled)


def test_sdxl_schedules_switch_embeds_and_pooled_together(xl):
    from sdrepl.core.conditioning_sdxl import encode_prompts_sdxl

    cond = encode_scheduled(xl, "a [cat:dog:1] AND a hat:0.5", "", LOOKUP, steps=3)
    dog = encode_prompts_sdxl(xl, "a dog", "", LOOKUP)
    late = cond.at(2)
    assert torch.equal(late.parts[0][0], dog.prompt_embeds) and torch.equal(late.pooled[0], dog.pooled)
    assert [w for _, w in late.parts] == [1.0, 0.5]
    assert not torch.equal(cond.at(0).pooled[0], dog.pooled)
    assert torch.count_nonzero(late.negative) == 0 and torch.count_nonzero(late.negative_pooled) == 0
