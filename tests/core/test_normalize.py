"""A1111's text normalisation (ftfy ``fix_text``, then whitespace) in the one tokenization path.

One test per normalisation class: each compares a pasted prompt with the ASCII prompt A1111's tokenizer
stack turns it into, through the budget (count and chunk texts) and through the conditioning tensor.
"""

from __future__ import annotations

import pytest
import torch

from sdrepl.core.budget import chunk_prompt, count_tokens, tokenize_text
from sdrepl.core.conditioning import encode_text
from sdrepl.core.normalize import normalize_text
from sdrepl.core.prompt import PromptOptions, StaticLookup

LOOKUP = StaticLookup()

CLASSES = {
    "full-width forms": ("１girl，solo，smile，ｌｏｎｇ hair", "1girl,solo,smile,long hair"),
    "HTML entities": ("black &amp; white, caf&eacute;, &lt;3", "black & white, café, <3"),
    "typographic quotes": ("“red” ‘fox’", "\"red\" 'fox'"),
    "ligatures": ("ﬁne ﬂowers, ﬀ", "fine flowers, ff"),
    "control characters": ("a\x00 cat\x07 on\x1b a mat\x7f", "a cat on a mat"),
    "mojibake": ("cafÃ© au lait", "café au lait"),
    "whitespace": ("  a\tcat \n\n on\u3000a   mat ", "a cat on a mat"),
}


@pytest.mark.parametrize("kind", list(CLASSES))
def test_each_class_normalises_to_what_a1111_tokenizes(kind, tokenizer):
    pasted, plain = CLASSES[kind]
    assert normalize_text(pasted) == plain
    assert tokenize_text(pasted, tokenizer) == tokenizer(plain, add_special_tokens=False)["input_ids"]
    assert count_tokens(pasted, tokenizer, LOOKUP).describe() == count_tokens(plain, tokenizer, LOOKUP).describe()


@pytest.mark.parametrize("kind", ["full-width forms", "HTML entities", "ligatures"])
def test_the_conditioning_is_the_normalised_text(kind, tiny_model):
    pasted, plain = CLASSES[kind]
    assert torch.equal(encode_text(tiny_model, pasted, LOOKUP), encode_text(tiny_model, plain, LOOKUP))


def test_full_width_commas_count_as_commas_including_the_backtrack(tokenizer):
    pasted = "1girl，solo，smile"
    ascii_ = "1girl,solo,smile"
    assert count_tokens(pasted, tokenizer, LOOKUP).count == count_tokens(ascii_, tokenizer, LOOKUP).count == 6
    # a long tag list: the comma backtrack moves the same tags to the second chunk in both spellings
    tags = [f"tag{i}" for i in range(40)]  # "tag12" is 2 tokens: the 75th token is not a comma
    for window in (0, 20):
        options = PromptOptions(comma_window=window)
        wide, _ = chunk_prompt("，".join(tags), tokenizer, LOOKUP, options)
        narrow, _ = chunk_prompt(",".join(tags), tokenizer, LOOKUP, options)
        assert [c.tokens for c in wide] == [c.tokens for c in narrow]
        assert len(wide) == 2
    with_backtrack = chunk_prompt("，".join(tags), tokenizer, LOOKUP)[0]
    without = chunk_prompt("，".join(tags), tokenizer, LOOKUP, PromptOptions(comma_window=0))[0]
    comma = tokenizer(",", add_special_tokens=False)["input_ids"][0]
    assert with_backtrack[0].tokens[-1] == comma  # the first chunk ends at a comma
    assert len(with_backtrack[0].tokens) < len(without[0].tokens) == 75


def test_full_width_brackets_are_text_not_emphasis(tokenizer):
    # A1111 parses the raw prompt, then its tokenizer normalises each piece: （ｂｅｓｔ） becomes "(best)" text
    budget = count_tokens("（ｂｅｓｔ）", tokenizer, LOOKUP)
    assert budget.count == len(tokenizer("(best)", add_special_tokens=False)["input_ids"])
    chunks, _ = chunk_prompt("（ｂｅｓｔ）", tokenizer, LOOKUP)
    assert set(chunks[0].weights) == {1.0}


def test_ascii_text_is_left_alone():
    text = "a (photo:1.2) of <cat-toy>, 5 & 6 [b:c:0.5]"
    assert normalize_text(text) == text
