"""Extra-network tags in prompts (spec section 1): cut out of the raw text before the prompt is parsed.

``<lora:NAME:W>``, ``<lora:NAME:TE:UNET>``, ``<lora:NAME:te=0.5:unet=1>``, the old ``<lyco:...>``
spelling, InvokeAI's ``withLora(NAME, W)`` and ``<hypernet:NAME:W>`` are found in the raw prompt, as
A1111 does before it parses anything, so they cost no tokens and their place in the prompt does not
matter. :func:`split_networks` returns the text without them and the tags; :func:`resolve_tags` turns
tags into (file, multipliers) with "did you mean" for unknown names. ``\\<lora:...>`` stays literal text.
The same name twice adds its multipliers (A1111); a weight of 0 disables it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sdrepl.core.errors import PromptError

_TAG = re.compile(r"(?<!\\)<(lora|lyco|hypernet):([^<>]*)>", re.IGNORECASE)
_WITH_LORA = re.compile(r"(?<![\w\\])withLora\(\s*([^,()]+?)\s*(?:,\s*([^,()]*?)\s*)?\)", re.IGNORECASE)
_MAX_WEIGHT = 100.0


@dataclass(frozen=True)
class NetworkTag:
    """One tag as written: ``kind`` is ``lora`` (``lyco`` and ``withLora`` too) or ``hypernet``."""

    kind: str
    name: str
    te: float
    unet: float
    written: str


def _number(text: str, tag: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise PromptError(f"{tag}: the {what} {text.strip()!r} is not a number (write e.g. <lora:name:0.8>)") from None
    if not math.isfinite(value) or abs(value) > _MAX_WEIGHT:
        raise PromptError(f"{tag}: the {what} {value} is out of range (-{_MAX_WEIGHT:g} to {_MAX_WEIGHT:g})")
    return value


def _parse_tag(kind: str, body: str, written: str) -> NetworkTag:
    parts = [p.strip() for p in body.split(":")]
    name = parts[0]
    if not name:
        raise PromptError(f"{written}: the tag names no {kind}; write <{kind}:NAME:WEIGHT>")
    kind = "lora" if kind.lower() in ("lora", "lyco") else "hypernet"
    positional: list[float] = []
    named: dict[str, float] = {}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        if eq:
            key = key.strip().lower()
            if key == "dyn":
                raise PromptError(f"{written}: dyn= (DyLoRA rank) is not supported; leave it out to use the full rank")
            if key not in ("te", "unet") or kind == "hypernet":
                raise PromptError(f"{written}: unknown option {key!r}; use te= and unet=")
            named[key] = _number(value, written, f"{key} weight")
        else:
            positional.append(_number(part, written, "weight"))
    if len(positional) > (1 if kind == "hypernet" else 2):
        raise PromptError(f"{written}: too many weights; write <{kind}:NAME:W>" +
                          ("" if kind == "hypernet" else " or <lora:NAME:TE:UNET>"))
    # A1111's order: te from the first weight, then te=; unet from the second weight, else te; then unet=.
    te = named.get("te", positional[0] if positional else 1.0)
    unet = named.get("unet", positional[1] if len(positional) > 1 else te)
    return NetworkTag(kind, name, te, unet, written)


def split_networks(text: str) -> tuple[str, list[NetworkTag]]:
    """``text`` without its extra-network tags, and the tags in order of appearance."""
    tags: list[tuple[int, NetworkTag]] = []

    def take(match: re.Match) -> str:
        tags.append((match.start(), _parse_tag(match.group(1), match.group(2), match.group(0))))
        return ""

    def take_with(match: re.Match) -> str:
        weight = match.group(2)
        w = _number(weight, match.group(0), "weight") if weight not in (None, "") else 1.0
        tags.append((match.start(), NetworkTag("lora", match.group(1).strip().strip("'\""), w, w, match.group(0))))
        return ""

    if "<" in text:
        text = _TAG.sub(take, text)
    if "withlora(" in text.lower():
        text = _WITH_LORA.sub(take_with, text)
    tags.sort(key=lambda item: item[0])
    return text, [tag for _, tag in tags]


def check_negative(negative: str) -> None:
    """Tags in a negative prompt are an error (A1111 drops them silently; say so instead)."""
    _, tags = split_networks(negative)
    if tags:
        raise PromptError(f"{tags[0].written} is in the negative prompt: LoRAs and hypernetworks apply to the whole "
                          "picture, not to the negative side; move the tag into the prompt")


def resolve_tags(tags: list[NetworkTag], kind: str, get: Callable[[str], Any], suggest: Callable[[str], list[str]],
                 listing: str) -> list[tuple[Any, float, float]]:
    """``[(network, te, unet)]`` for the tags of ``kind``; the same file twice adds its weights."""
    found: dict[int, list] = {}
    order: list[int] = []
    for tag in tags:
        if tag.kind != kind:
            continue
        net = get(tag.name)
        if net is None:
            close = suggest(tag.name)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; `{listing}` lists the loaded ones"
            what = "LoRA" if kind == "lora" else "hypernetwork"
            raise PromptError(f"{tag.written}: no loaded {what} is called {tag.name!r}{hint}")
        key = id(net)
        if key not in found:
            found[key] = [net, 0.0, 0.0]
            order.append(key)
        found[key][1] += tag.te
        found[key][2] += tag.unet
    return [tuple(found[k]) for k in order]  # type: ignore[misc]
