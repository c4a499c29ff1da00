"""The prompt language: text -> weighted pieces of text, embedding references and ``BREAK`` markers.

The rules are AUTOMATIC1111's (most prompts found online are written for it) plus the ``<trigger>`` form
the REPL completes (the full description is ``shared/spec/prompt-language.md``). In short:

- ``<name>`` / ``<folder/name>`` reference an embedding (case-insensitive); an unknown name is a
  :class:`PromptError` with a "did you mean" hint, never text passed to the model.
- ``embedding:name`` (ComfyUI) references one too; a bare trigger written as a whole word (A1111 habit) does
  as well unless switched off, longest name first, and is reported in :attr:`ParsedPrompt.bare` so the
  REPL can show it: nothing becomes an embedding silently.
- ``(x)`` x1.1, ``[x]`` /1.1, ``(x:1.3)`` sets, nesting multiplies, ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\<``
  are literal, unclosed brackets apply to the rest; an embedding takes the weight of the text around it.
- ``BREAK`` (upper case, its own word) closes the current 75-token chunk.

This module only parses; token counting and chunking are :mod:`sdrepl.core.budget`'s job, so the parser
needs nothing but an :class:`EmbeddingLookup` (the library, or a small fake in tests).
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from sdrepl.core.bare_names import BareNames
from sdrepl.core.errors import PromptError

if TYPE_CHECKING:  # annotations only: the CLI parses --emphasis with this module before torch is imported
    from sdrepl.core.embedding import Embedding


class EmbeddingLookup(Protocol):
    """What the prompt language needs from the embedding library (``core.library.EmbeddingLibrary``)."""

    def get(self, name: str) -> Embedding | None:
        """The embedding named ``name`` (case-insensitive; ``folder/name`` allowed), or None."""

    def suggest(self, name: str, limit: int = 3) -> list[str]:
        """Up to ``limit`` loaded names close to ``name``, best first (for "did you mean")."""

    def triggers(self) -> list[str]:
        """Every name usable as a bare word."""


class StaticLookup:
    """An :class:`EmbeddingLookup` over embeddings given in code: for tests, scripts, and the trainer,
    whose embedding being trained is in no folder yet. Names are case-insensitive, as in the library."""

    def __init__(self, embeddings: Iterable[Embedding] = ()) -> None:
        self._by_name: dict[str, Embedding] = {}
        for emb in embeddings:
            self.add(emb)

    def add(self, emb: Embedding) -> None:
        self._by_name[emb.key] = emb
        self._by_name[emb.qualified.lower()] = emb

    def remove(self, name: str) -> None:
        emb = self.get(name)
        if emb is not None:
            self._by_name = {k: e for k, e in self._by_name.items() if e is not emb}

    def get(self, name: str) -> Embedding | None:
        return self._by_name.get(name.strip().lower())

    def suggest(self, name: str, limit: int = 3) -> list[str]:
        triggers = {e.key: e.trigger for e in self._by_name.values()}
        return [
            triggers[k] for k in difflib.get_close_matches(name.lower(), list(triggers), n=limit, cutoff=0.5)
        ]

    def triggers(self) -> list[str]:
        return sorted({e.trigger for e in self._by_name.values()})


#: A1111's emphasis settings. ``Original``: weights scale the encoder output, then each chunk's mean is
#: restored; ``No norm``: the scaling without the restoring; ``Ignore``: brackets are read but every weight
#: is 1; ``None``: no emphasis syntax at all, brackets are text (``<name>`` and ``BREAK`` still work).
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")
#: The largest comma backtrack window A1111 allows (its setting's slider stops at 74).
MAX_COMMA_WINDOW = 74


def emphasis_mode(name: str) -> str:
    """The canonical name of an emphasis mode, matched ignoring case, spaces, ``_`` and ``-``."""
    folded = re.sub(r"[\s_\-]+", "", str(name).lower())
    for mode in EMPHASIS_MODES:
        if mode.lower().replace(" ", "") == folded:
            return mode
    raise PromptError(f"unknown emphasis {name!r}; use one of: {', '.join(EMPHASIS_MODES)} (A1111's names)")


@dataclass
class PromptOptions:
    """Settings of the prompt language; they flow from session settings to parser, budget and encoder."""

    #: Whether a trigger written as a plain word (``EasyNegative``) is taken as the embedding.
    bare_names: bool = True
    #: Comma backtrack window in tokens (A1111's ``comma_padding_backtrack``); 0 turns it off.
    comma_window: int = 20
    #: A1111's "CLIP skip": 1 = the last layer, 2 = the penultimate hidden state (then the final norm).
    clip_skip: int = 1
    #: One of :data:`EMPHASIS_MODES`.
    emphasis: str = "Original"


@dataclass(frozen=True)
class TextPiece:
    """Plain text with the weight emphasis gave it."""

    text: str
    weight: float = 1.0


@dataclass(frozen=True)
class EmbeddingPiece:
    """A reference to a loaded embedding; it costs ``embedding.num_vectors`` tokens."""

    embedding: Embedding
    weight: float = 1.0
    #: How the prompt wrote it: ``<bad-hands-5>``, ``embedding:EasyNegative`` or the bare word.
    written: str = ""
    #: ``"angle"``, ``"comfy"`` or ``"bare"``.
    form: str = "angle"

    @property
    def name(self) -> str:
        """The name to show: the qualified name when the prompt used one (a collision), else the trigger."""
        return self.embedding.qualified if "/" in self.written else self.embedding.trigger


@dataclass(frozen=True)
class BreakPiece:
    """``BREAK``: close the current chunk."""


BREAK = BreakPiece()
Piece = TextPiece | EmbeddingPiece | BreakPiece


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt as pieces in order, with the names it uses (for the toolbar and ``!tokens``)."""

    pieces: tuple[Piece, ...]
    #: Embeddings used, in order of first use, each once.
    embeddings: tuple[str, ...] = field(default=())
    #: Bare words that were taken as embeddings, as written, each once.
    bare: tuple[str, ...] = field(default=())


# --- emphasis -------------------------------------------------------------------------------------------

ROUND = 1.1
SQUARE = 1 / 1.1

#: ``<name>``: no brackets or backslashes inside, no space at either end (so ``a < b > c`` stays text).
_ANGLE = r"<[^<>\s()\[\]\\](?:[^<>()\[\]\\\n]*[^<>\s()\[\]\\])?>"
# A1111's ``re_attention`` with the ``<name>`` atom first, so emphasis never looks inside a reference.
_ATTENTION = re.compile(
    rf"""
    (?P<angle>{_ANGLE})|
    \\\(|\\\)|\\\[|\\\]|\\\\|\\[<>]|\\|
    \(|\[|
    :\s*(?P<weight>[+-]?[.\d]+)\s*\)|
    \)|\]|
    [^\\()\[\]:<]+|
    :|<
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_COMFY = re.compile(r"(?<![\w-])embedding:(?P<name>[\w\-./]*[\w\-])", re.I)
_FILE_SUFFIX = re.compile(r"\.(pt|bin|safetensors|ckpt|png|webp)$", re.I)
_UNSUPPORTED_TAG = re.compile(r"^<(lora|lyco|hypernet|hypernetwork|lycoris)\s*:", re.I)


def _emphasis(text: str) -> list[tuple[str, str, float]]:
    """Split ``text`` into (kind, text, weight) with kind ``"text"``, ``"angle"`` or ``"break"``.

    A1111's ``parse_prompt_attention``, with three differences: ``BREAK`` is recognised inside brackets too
    (A1111 gives it a weight there and then misses it); a lone backslash stays literal; and text is joined
    back only where it was contiguous in the prompt (A1111 joins all runs of equal weight, turning
    ``red(cat:1.0)`` into ``redcat``; here brackets separate words, as a reader expects, while ``a:b`` or
    ``embedding:x``, which the regex cuts at the colon, come back whole).
    """
    res: list[list] = []  # [kind, text, weight, start, end]
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for item in res[start:]:
            item[2] *= factor

    for m in _ATTENTION.finditer(text):
        token = m.group(0)
        weight = m.group("weight")
        if m.group("angle"):
            res.append(["angle", token, 1.0, m.start(), m.end()])
        elif token.startswith("\\"):
            res.append(["text", token[1:] or "\\", 1.0, m.start(), m.end()])
        elif token == "(":
            round_open.append(len(res))
        elif token == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            if not _is_float(weight):  # A1111 fails here too; say so instead of guessing
                raise PromptError(
                    f"{token.strip()!r} at character {m.start() + 1}: {weight!r} is not a number; an emphasis "
                    "weight is one number, as in (text:1.2) (write \\( \\) for literal brackets)"
                )
            multiply(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            pos = 0
            for b in _BREAK.finditer(token):
                if b.start() > pos:
                    res.append(["text", token[pos : b.start()], 1.0, m.start() + pos, m.start() + b.start()])
                res.append(["break", "BREAK", 1.0, -1, -1])
                pos = b.end()
            if pos < len(token):
                res.append(["text", token[pos:], 1.0, m.start() + pos, m.end()])
    for start in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    merged: list[list] = []
    for item in res:
        prev = merged[-1] if merged else None
        if prev and item[0] == prev[0] == "text" and prev[4] == item[3] and prev[2] == item[2]:
            prev[1] += item[1]
            prev[4] = item[4]
        else:
            merged.append(item)
    return [(kind, part, weight) for kind, part, weight, _, _ in merged]


_LITERAL = re.compile(rf"\\\\(?P<escaped>[<>])|(?P<angle>{_ANGLE})")


def _literal(text: str) -> list[tuple[str, str, float]]:
    """Emphasis ``None``: the text as it is, weight 1, only ``<name>`` references and ``BREAK`` taken out
    (``\\<`` still writes a literal ``<``)."""
    res: list[tuple[str, str, float]] = []
    plain: list[str] = []

    def flush() -> None:
        run = "".join(plain)
        plain.clear()
        pos = 0
        for b in _BREAK.finditer(run):
            if b.start() > pos:
                res.append(("text", run[pos : b.start()], 1.0))
            res.append(("break", "BREAK", 1.0))
            pos = b.end()
        if pos < len(run):
            res.append(("text", run[pos:], 1.0))

    pos = 0
    for m in _LITERAL.finditer(text):
        plain.append(text[pos : m.start()])
        if m.group("escaped"):
            plain.append(m.group("escaped"))
        else:
            flush()
            res.append(("angle", m.group("angle"), 1.0))
        pos = m.end()
    plain.append(text[pos:])
    flush()
    return res


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# --- embedding references -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _bare_pattern(names: tuple[str, ...]) -> BareNames | None:
    """A matcher of ``names`` as whole words, longest first (cached per set of names; see core/bare_names)."""
    matcher = BareNames(names)
    return matcher if matcher else None


class _Resolver:
    """Turns names into embeddings for one parse, collecting unknown names and what was used."""

    def __init__(self, lookup: EmbeddingLookup) -> None:
        self.lookup = lookup
        self.unknown: list[str] = []
        self.used: dict[str, None] = {}
        self.bare: dict[str, None] = {}

    def angle(self, written: str, weight: float) -> EmbeddingPiece | None:
        name = written[1:-1].strip()
        if _UNSUPPORTED_TAG.match(written):
            raise PromptError(
                f"{written}: LoRA and hypernetwork tags are not supported (sdrepl uses textual-inversion "
                "embeddings only); remove the tag from the prompt"
            )
        emb = self.lookup.get(name)
        if emb is None:
            self.unknown.append(written)
            return None
        return self._piece(emb, weight, written, "angle")

    def comfy(self, written: str, name: str, weight: float) -> EmbeddingPiece | None:
        emb = self.lookup.get(name)
        if emb is None and _FILE_SUFFIX.search(name):  # ComfyUI accepts file names: embedding:x.pt
            emb = self.lookup.get(_FILE_SUFFIX.sub("", name))
        if emb is None:
            self.unknown.append(written)
            return None
        return self._piece(emb, weight, written, "comfy")

    def bare_word(self, written: str, weight: float) -> EmbeddingPiece | None:
        emb = self.lookup.get(written)
        if emb is None:
            return None
        self.bare.setdefault(written, None)
        return self._piece(emb, weight, written, "bare")

    def _piece(self, emb: Embedding, weight: float, written: str, form: str) -> EmbeddingPiece:
        piece = EmbeddingPiece(emb, weight, written, form)
        self.used.setdefault(piece.name, None)
        return piece

    def error(self) -> PromptError:
        parts = []
        for written in dict.fromkeys(self.unknown):
            name = written[1:-1] if written.startswith("<") else written.split(":", 1)[1]
            hints = list(self.lookup.suggest(name, limit=3))[:3]
            if hints:
                parts.append(f"{written} is not a loaded embedding: did you mean {_or_list(hints)}?")
            else:
                parts.append(f"{written} is not a loaded embedding (!embeddings lists the loaded ones)")
        return PromptError("; ".join(parts))


def _or_list(names: Sequence[str]) -> str:
    quoted = [f"<{n}>" for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _split_text(text: str, weight: float, resolver: _Resolver, bare: BareNames | None) -> list[Piece]:
    """Find ``embedding:name`` and bare names in a run of plain text."""
    pieces: list[Piece] = []
    pos = 0
    for m in _COMFY.finditer(text):
        pieces += _split_bare(text[pos : m.start()], weight, resolver, bare)
        ref = resolver.comfy(m.group(0), m.group("name"), weight)
        if ref is not None:
            pieces.append(ref)
        pos = m.end()
    pieces += _split_bare(text[pos:], weight, resolver, bare)
    return pieces


def _split_bare(text: str, weight: float, resolver: _Resolver, bare: BareNames | None) -> list[Piece]:
    if not text:
        return []
    if bare is None:
        return [TextPiece(text, weight)]
    pieces: list[Piece] = []
    pos = 0
    for m in bare.finditer(text):
        ref = resolver.bare_word(m.group(0), weight)
        if ref is None:
            continue
        if m.start() > pos:
            pieces.append(TextPiece(text[pos : m.start()], weight))
        pieces.append(ref)
        pos = m.end()
    if pos < len(text):
        pieces.append(TextPiece(text[pos:], weight))
    return pieces


def parse_prompt(
    text: str, lookup: EmbeddingLookup, *, bare_names: bool = True, emphasis: str = "Original"
) -> ParsedPrompt:
    """Parse ``text`` into weighted pieces; raise :class:`PromptError` naming every unknown reference.

    ``emphasis`` is one of :data:`EMPHASIS_MODES`: ``None`` reads brackets as text, ``Ignore`` reads them
    and drops their weights, the other two keep the weights (the encoder applies them)."""
    mode = emphasis_mode(emphasis)
    resolver = _Resolver(lookup)
    bare = _bare_pattern(tuple(lookup.triggers())) if bare_names else None
    pieces: list[Piece] = []
    parts = _literal(text) if mode == "None" else _emphasis(text)
    if mode == "Ignore":
        parts = [(kind, part, 1.0) for kind, part, _ in parts]
    for kind, part, weight in parts:
        if kind == "break":
            pieces.append(BREAK)
        elif kind == "angle":
            ref = resolver.angle(part, weight)
            if ref is not None:
                pieces.append(ref)
        else:
            pieces += _split_text(part, weight, resolver, bare)
    if resolver.unknown:
        raise resolver.error()
    return ParsedPrompt(tuple(pieces), tuple(resolver.used), tuple(resolver.bare))
