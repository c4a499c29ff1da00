"""Prompt editing and alternation: one prompt text -> the flat texts it stands for at each sampling step.

AUTOMATIC1111's scheduling language (its ``prompt_parser`` semantics, implemented here from the rules):

- ``[from:to:when]`` is ``from`` until step ``when``, then ``to``; ``[to:when]`` adds ``to`` after ``when``;
  ``[from::when]`` removes ``from`` after ``when``. ``when`` with a decimal point (``0.25``, ``.5``, ``1.0``)
  is a fraction of the steps, without one (``16``, ``1e1``) a step number; either is capped at the step count.
- ``[a|b|c]`` alternates, one option per step (``[fe|]male``: an option may be empty).
- Constructs nest (``a[b:[c:d:2]:1]e``); ``(x)``, ``(x:1.2)`` and ``[x]`` are passed through as they are
  (their weights are :mod:`sdrepl.core.prompt`'s business), so is every ``\\``-escaped character.
- Stray brackets and colons at the top level are text (``a [unbalanced``, ``score:9``). A prompt the
  grammar cannot read at all (a ``|`` outside ``[...]``, a trailing lone backslash) is used as it is, at
  every step, exactly as A1111 does.

A1111's schedule is a list of ``(end_at_step, text)``; sampling step ``i`` (counted from 0) uses the first
entry with ``i <= end_at_step``, which is :meth:`PromptSchedule.text_at`. So ``[a:b:16]`` of 20 steps draws
``a`` on steps 0..16 and ``b`` on 17..19, as in A1111.

``AND`` (composable diffusion) is split off before scheduling, as A1111 does: each part of a positive prompt
has its own schedule and a weight from a trailing ``:number`` (``a cat AND a dog:0.5``); a positive prompt
without ``AND`` is one part, so a trailing ``score:9`` is that prompt's weight (A1111's rule). Negative
prompts have neither.

This module knows nothing of tokenizers or encoders: it yields texts, and each model family encodes them
its own way (:mod:`sdrepl.core.conditioning` for SD 1.x/2.x). Extra-network tags (``<lora:...>``) are
taken out of the raw text before any of this runs, as in A1111.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

#: Text outside any construct: everything but ``\\ [ ] ( ) : |``.
_PLAIN = re.compile(r"[^\\\[\]():|]+")
#: ``when`` and the closing bracket, with optional whitespace around the number (a signed int or float).
_WHEN = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*\]")
#: Nesting deeper than this is not scheduled (the text is used as it is); no real prompt comes close.
MAX_DEPTH = 100


class _Unreadable(Exception):
    """The grammar has no reading of the prompt: it is used unscheduled."""


@dataclass(frozen=True)
class _Edit:
    """``[before:after:when]``; ``before`` is None for ``[after:when]``."""

    before: tuple | None
    after: tuple
    when: str


@dataclass(frozen=True)
class _Alternate:
    options: tuple[tuple, ...]


class _Parser:
    """A recursive-descent reading of one prompt into text, :class:`_Edit` and :class:`_Alternate` nodes."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.memo: dict[tuple[int, int], tuple[tuple, int] | None] = {}

    def sequence(self, pos: int, depth: int) -> tuple[list, int]:
        """Nodes from ``pos`` up to a delimiter of the enclosing construct (depth 0: to the end)."""
        text, nodes = self.text, []
        top = depth == 0
        while pos < len(text):
            char = text[pos]
            if char == "\\":
                if pos + 1 < len(text) and text[pos + 1] != "\n":
                    nodes.append(text[pos : pos + 2])
                    pos += 2
                    continue
                raise _Unreadable
            if char in "[(":
                found = self.construct(pos, depth + 1)
                if found is not None:
                    nodes.extend(found[0])
                    pos = found[1]
                    continue
                if not top:
                    break
                nodes.append(char)  # an unmatched opener at the top level is text
                pos += 1
            elif char in "]):":
                if not top:
                    break
                nodes.append(char)
                pos += 1
            elif char == "|":
                if not top:
                    break
                raise _Unreadable  # A1111's grammar has no '|' outside an alternation
            else:
                match = _PLAIN.match(text, pos)
                assert match is not None
                nodes.append(match.group())
                pos = match.end()
        return nodes, pos

    def construct(self, pos: int, depth: int) -> tuple[tuple, int] | None:
        """The construct opening at ``pos`` as (nodes, end), or None when there is none there."""
        key = (pos, depth)
        if key not in self.memo:
            if depth > MAX_DEPTH:
                raise _Unreadable
            self.memo[key] = self._square(pos, depth) if self.text[pos] == "[" else self._round(pos, depth)
        return self.memo[key]

    def _round(self, pos: int, depth: int) -> tuple[tuple, int] | None:
        """``(x)`` or ``(x:y)``: kept as written, with any constructs inside it resolved."""
        inner, at = self.sequence(pos + 1, depth)
        nodes = ["(", *inner]
        if self._at(at, ":"):
            weight, at = self.sequence(at + 1, depth)
            nodes += [":", *weight]
        if not self._at(at, ")"):
            return None
        return (*nodes, ")"), at + 1

    def _square(self, pos: int, depth: int) -> tuple[tuple, int] | None:
        first, at = self.sequence(pos + 1, depth)
        if self._at(at, "]"):
            return ("[", *first, "]"), at + 1
        if self._at(at, "|"):
            options = [tuple(first)]
            while self._at(at, "|"):
                option, at = self.sequence(at + 1, depth)
                options.append(tuple(option))
            if not self._at(at, "]"):
                return None
            return (_Alternate(tuple(options)),), at + 1
        if not self._at(at, ":"):
            return None
        when = _WHEN.match(self.text, at + 1)
        if when:  # [to:when]
            return (_Edit(None, tuple(first), when.group(1)),), when.end()
        second, at = self.sequence(at + 1, depth)
        if not self._at(at, ":"):
            return None
        when = _WHEN.match(self.text, at + 1)
        if not when:
            return None
        return (_Edit(tuple(first), tuple(second), when.group(1)),), when.end()

    def _at(self, pos: int, char: str) -> bool:
        return pos < len(self.text) and self.text[pos] == char


@functools.lru_cache(maxsize=256)
def _parse(text: str) -> tuple | None:
    """The prompt's nodes, or None when the grammar has no reading of it (cached: typed on every key)."""
    try:
        nodes, end = _Parser(text).sequence(0, 0)
    except (_Unreadable, RecursionError):
        return None
    assert end == len(text)
    return tuple(nodes)


def when_step(number: str, steps: int, *, base_steps: int | None = None) -> int:
    """A1111's step for ``when``: with a decimal point a fraction of ``steps``, else a step number; capped
    at ``steps``. ``base_steps`` is for a hires pass (its schedule counts on from the first pass's steps,
    fractions from 1.0), A1111's rule for the second pass."""
    value = float(number)
    int_offset, float_offset = (base_steps, 1.0) if base_steps is not None else (0, 0.0)
    value = (value - float_offset) * steps if "." in number else value - int_offset
    if math.isnan(value) or value == -math.inf:
        return 0
    return steps if value >= steps else int(value)


def _walk(nodes: tuple, visit) -> None:
    for node in nodes:
        if isinstance(node, _Edit):
            visit(node)
            if node.before:
                _walk(node.before, visit)
            _walk(node.after, visit)
        elif isinstance(node, _Alternate):
            visit(node)
            for option in node.options:
                _walk(option, visit)


def _render(nodes: tuple, step: int, whens: dict[int, int]) -> str:
    out: list[str] = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Edit):
            chosen = (node.before or ()) if step <= whens[id(node)] else node.after
            out.append(_render(chosen, step, whens))
        else:
            out.append(_render(node.options[(step - 1) % len(node.options)], step, whens))
    return "".join(out)


@dataclass(frozen=True)
class Span:
    """One text over consecutive sampling steps ``first..last`` (counted from 0, both included)."""

    first: int
    last: int
    text: str

    def describe(self) -> dict:
        """JSON-safe, with the steps counted from 1 as a user counts them (``"steps": [1, 17]``)."""
        return {"steps": [self.first + 1, self.last + 1], "text": self.text}


@dataclass(frozen=True)
class PromptSchedule:
    """The flat texts of one prompt over ``steps`` sampling steps (A1111's ``(end_at_step, text)`` list)."""

    steps: int
    entries: tuple[tuple[int, str], ...]

    def text_at(self, step: int) -> str:
        """The text sampling step ``step`` (from 0) uses: the first entry ending at or after it."""
        for end, text in self.entries:
            if step <= end:
                return text
        return self.entries[-1][1]

    def spans(self) -> list[Span]:
        """Every sampling step's text as runs of equal text, in step order."""
        return list(self._spans)

    @functools.cached_property
    def _spans(self) -> tuple[Span, ...]:
        spans: list[Span] = []
        entry = 0
        for step in range(self.steps):  # one sweep: the entries are sorted by their end
            while entry < len(self.entries) - 1 and step > self.entries[entry][0]:
                entry += 1
            text = self.entries[entry][1]
            if spans and spans[-1].text == text:
                spans[-1] = Span(spans[-1].first, step, text)
            else:
                spans.append(Span(step, step, text))
        return tuple(spans)

    def texts(self) -> list[str]:
        """The distinct texts the sampling steps use, in order of first use (each encoded once)."""
        return list(dict.fromkeys(span.text for span in self.spans()))

    @property
    def changes(self) -> bool:
        """Whether the text changes during sampling."""
        return len(self.texts()) > 1


def prompt_schedule(text: str, steps: int, *, base_steps: int | None = None) -> PromptSchedule:
    """The schedule of ``text`` over ``steps`` steps (``base_steps``: see :func:`when_step`)."""
    if steps < 1:
        raise ValueError(f"a schedule needs at least one step, got {steps}")
    nodes = _parse(text)
    if nodes is None:
        return PromptSchedule(steps, ((steps, text),))
    ends = {steps}
    whens: dict[int, int] = {}

    def visit(node: _Edit | _Alternate) -> None:
        if isinstance(node, _Alternate):
            ends.update(range(1, steps + 1))
            return
        when = whens[id(node)] = when_step(node.when, steps, base_steps=base_steps)
        if when >= 1:
            ends.add(when)

    _walk(nodes, visit)
    return PromptSchedule(steps, tuple((end, _render(nodes, end, whens)) for end in sorted(ends)))


# --- AND ------------------------------------------------------------------------------------------------

_AND = re.compile(r"\bAND\b")
#: A part's trailing weight: ``:`` and a plain decimal number (no exponent), whitespace allowed around.
_TRAILING_WEIGHT = re.compile(r"\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+))\s*$")


@dataclass(frozen=True)
class PromptPart:
    """One ``AND`` part of a positive prompt: its text (weight removed), weight and schedule."""

    text: str
    weight: float
    schedule: PromptSchedule


def split_and(prompt: str) -> list[tuple[str, float]]:
    """A positive prompt's ``AND`` parts as ``(text, weight)``; a trailing ``:number`` is the part's weight
    (default 1) and trailing whitespace is dropped, as A1111 does."""
    parts = []
    for part in _AND.split(prompt):
        match = _TRAILING_WEIGHT.search(part)
        if match:
            parts.append((part[: match.start()], float(match.group(1))))
        else:
            parts.append((part.rstrip(), 1.0))
    return parts


@dataclass(frozen=True)
class PromptPlan:
    """What sampling needs from a prompt pair: the positive parts and the negative schedule."""

    steps: int
    parts: tuple[PromptPart, ...]
    negative: PromptSchedule

    def texts(self) -> list[str]:
        """Every distinct flat text any step of any part (or the negative) uses, to encode each once."""
        out: dict[str, None] = {}
        for part in self.parts:
            out.update(dict.fromkeys(part.schedule.texts()))
        out.update(dict.fromkeys(self.negative.texts()))
        return list(out)

    @property
    def composed(self) -> bool:
        """Whether the noise prediction combines several parts or a weight other than 1 (A1111's AND)."""
        return len(self.parts) != 1 or self.parts[0].weight != 1.0

    @property
    def changes(self) -> bool:
        """Whether any conditioning changes during sampling."""
        return self.negative.changes or any(part.schedule.changes for part in self.parts)


def plan_prompts(prompt: str, negative: str, steps: int, *, base_steps: int | None = None) -> PromptPlan:
    """Split and schedule a prompt pair for ``steps`` sampling steps."""
    parts = tuple(
        PromptPart(text, weight, prompt_schedule(text, steps, base_steps=base_steps))
        for text, weight in split_and(prompt)
    )
    return PromptPlan(steps, parts, prompt_schedule(negative or "", steps, base_steps=base_steps))
