"""Finding bare embedding names (A1111's habit of writing ``EasyNegative`` without brackets) in prompt text.

The rule is the prompt language's (``core/prompt.py``): a name matches as a whole word (not preceded or
followed by a word character or ``-``), case-insensitively, the longest name first, scanning left to
right. One regular expression of every name implements it, but compiling one for thousands of names
costs tens to hundreds of milliseconds, paid again whenever the library changes, which a busy folder does
many times a second. Most names are one run of word characters and ``-``, and such a name can only match
a whole run, so those are found with a set lookup per run; only the few names holding other characters
(spaces, dots) go into a (small) regular expression, and the two kinds of match are merged in the
order the single expression would have produced.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

_RUN = re.compile(r"[\w-]+")


class BareMatch:
    """One match, with the part of :class:`re.Match` the prompt parser uses."""

    __slots__ = ("_text", "_start", "_end")

    def __init__(self, text: str, start: int, end: int) -> None:
        self._text, self._start, self._end = text, start, end

    def start(self) -> int:
        return self._start

    def end(self) -> int:
        return self._end

    def group(self, index: int = 0) -> str:
        return self._text[self._start : self._end]


class BareNames:
    """A matcher for a fixed set of names; ``finditer(text)`` yields matches like the one-regex rule."""

    def __init__(self, names: Iterable[str]) -> None:
        unique = {n for n in names if n.strip()}
        self.simple = {n.lower() for n in unique if _RUN.fullmatch(n)}
        other = sorted((n for n in unique if not _RUN.fullmatch(n)), key=lambda n: (-len(n), n))
        self.other = (re.compile(rf"(?<![\w-])(?:{'|'.join(re.escape(n) for n in other)})(?![\w-])", re.I)
                      if other else None)

    def __bool__(self) -> bool:
        return bool(self.simple) or self.other is not None

    def finditer(self, text: str) -> Iterator[BareMatch | re.Match[str]]:
        runs = [m.span() for m in _RUN.finditer(text) if m.group(0).lower() in self.simple] if self.simple else []
        pos, index = 0, 0
        while True:
            while index < len(runs) and runs[index][0] < pos:
                index += 1
            run = runs[index] if index < len(runs) else None
            other = self.other.search(text, pos) if self.other is not None else None
            if run is None and other is None:
                return
            if other is not None and (run is None or other.start() < run[0]
                                      or (other.start() == run[0] and other.end() > run[1])):
                yield other
                pos = other.end()
            else:
                yield BareMatch(text, *run)
                pos = run[1]
