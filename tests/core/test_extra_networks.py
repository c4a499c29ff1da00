"""Extra-network tags: cut from the raw prompt before parsing, with A1111's weight rules."""

from __future__ import annotations

import pytest

from sdrepl.core.errors import PromptError
from sdrepl.core.extra_networks import check_negative, resolve_tags, split_networks


@pytest.mark.parametrize(("text", "te", "unet"), [
    ("<lora:x>", 1.0, 1.0),
    ("<lora:x:0.8>", 0.8, 0.8),
    ("<lora:x:0.5:1.2>", 0.5, 1.2),
    ("<lora:x:te=0.5:unet=1>", 0.5, 1.0),
    ("<lora:x:te=0.25>", 0.25, 0.25),
    ("<lora:x:0.7:unet=0.1>", 0.7, 0.1),
    ("<lyco:x:0.3>", 0.3, 0.3),
    ("<LoRA:x:2>", 2.0, 2.0),
    ("withLora(x, 0.6)", 0.6, 0.6),
    ("withLora(x)", 1.0, 1.0),
])
def test_weights(text, te, unet):
    rest, tags = split_networks(f"a photo {text}, cat")
    assert rest == "a photo , cat"
    assert [(t.kind, t.name, t.te, t.unet) for t in tags] == [("lora", "x", te, unet)]


def test_hypernet_and_order():
    rest, tags = split_networks("<hypernet:h:0.5> a <lora:b:1> b <lora:a>")
    assert rest == " a  b "
    assert [(t.kind, t.name) for t in tags] == [("hypernet", "h"), ("lora", "b"), ("lora", "a")]


def test_escaped_tag_is_text():
    rest, tags = split_networks(r"a \<lora:x:1> b")
    assert tags == [] and rest == r"a \<lora:x:1> b"


@pytest.mark.parametrize(("text", "message"), [
    ("<lora:x:abc>", "not a number"),
    ("<lora::1>", "names no lora"),
    ("<lora:x:1:2:3>", "too many weights"),
    ("<lora:x:dyn=4>", "dyn="),
    ("<lora:x:foo=1>", "unknown option"),
    ("<lora:x:1e9>", "out of range"),
])
def test_bad_tags(text, message):
    with pytest.raises(PromptError, match=message):
        split_networks(text)


def test_negative_prompt_tag_is_an_error():
    check_negative("blurry, ugly")
    with pytest.raises(PromptError, match="negative prompt"):
        check_negative("blurry <lora:x:1>")


def test_resolve_adds_duplicates_and_suggests():
    nets = {"style": object(), "other": object()}
    _, tags = split_networks("<lora:style:0.5> <lora:Style:0.25:1> <lora:other>")
    resolved = resolve_tags(tags, "lora", lambda n: nets.get(n.lower()), lambda n: ["style"], "!loras")
    assert [(te, unet) for _, te, unet in resolved] == [(0.75, 1.5), (1.0, 1.0)]
    _, tags = split_networks("<lora:stlye:1>")
    with pytest.raises(PromptError, match="did you mean style"):
        resolve_tags(tags, "lora", lambda n: None, lambda n: ["style"], "!loras")
