"""Physical input lines -> logical REPL lines: comments, blank lines and ``\"\"\"`` blocks.

Scripted sessions, ``!replay`` and the interactive prompt all read the same language, so the rules live
here once:

- a blank line, or one whose first non-blank character is ``#``, is skipped;
- a line holding only ``\"\"\"`` opens a block; every following line up to the closing ``\"\"\"`` belongs to
  one logical line (joined with newlines; ``#`` and blank lines inside a block are prompt text, not
  comments). Text after the closing quotes (``\"\"\" --steps 30``) is appended, so options can follow a
  long prompt. A block that is never closed is reported, never silently run;
- every logical line keeps the number of the physical line it started on, which is what scripted JSON
  reports as ``"line"``.

The reader is lazy (a generator over an iterable) because scripted sessions must run each line as it
arrives; :class:`LineAssembler` is the push form the interactive prompt uses one keystroke-line at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

QUOTES = '"""'


@dataclass(frozen=True)
class LogicalLine:
    """One command as the session executes it.

    ``number`` is the 1-based physical line it starts on; ``text`` is what gets executed (a block's
    content, newline-joined); ``source`` is the input as written (for ``"input"`` in scripted JSON);
    ``error`` is set, and ``text`` is empty, when the line cannot be run (an unclosed block).
    """

    number: int
    text: str
    source: str
    error: str | None = None


def is_skipped(physical: str) -> bool:
    """Blank lines and ``#`` comments outside blocks are not commands."""
    stripped = physical.strip()
    return not stripped or stripped.startswith("#")


def _opens_block(physical: str) -> bool:
    return physical.strip() == QUOTES


class LineAssembler:
    """Push physical lines in, get logical lines out (the interactive prompt's form of :func:`read_lines`).

    ``feed`` returns a :class:`LogicalLine` when one is complete, else None (a skipped line, or a line
    inside an open block); ``pending`` says a block is open (the prompt shows a continuation marker);
    ``finish`` is called at end of input and reports a block left open.
    """

    def __init__(self, first_number: int = 1) -> None:
        self._next_number = first_number
        self._block: list[str] | None = None
        self._block_start = 0

    @property
    def pending(self) -> bool:
        return self._block is not None

    @property
    def next_number(self) -> int:
        """The number the next physical line will get (for reporting a line that could not be read)."""
        return self._next_number

    def feed(self, physical: str) -> LogicalLine | None:
        line = physical.rstrip("\r\n")
        number = self._next_number
        self._next_number += 1
        if self._block is not None:
            if line.strip().startswith(QUOTES):
                return self._close_block(line)
            self._block.append(line)
            return None
        if is_skipped(line):
            return None
        if _opens_block(line):
            self._block = [line]
            self._block_start = number
            return None
        return LogicalLine(number, line.strip(), line.rstrip())

    def finish(self) -> LogicalLine | None:
        """End of input: an open block becomes an error line that names where it started."""
        if self._block is None:
            return None
        source = "\n".join(self._block)
        start = self._block_start
        self._block = None
        return LogicalLine(
            start, "", source,
            error=f'the """ block opened on line {start} is never closed; end it with a line holding only """',
        )

    def _close_block(self, closing: str) -> LogicalLine:
        assert self._block is not None
        content = self._block[1:]
        tail = closing.strip()[len(QUOTES):].strip()
        source = "\n".join([*self._block, closing.rstrip()])
        self._block = None
        text = "\n".join(content).strip()
        if tail:
            text = f"{text}\n{tail}" if text else tail
        return LogicalLine(self._block_start, text, source)


def read_lines(physical: Iterable[str], first_number: int = 1) -> Iterator[LogicalLine]:
    """Lazily turn physical lines into logical lines; pulls one physical line at a time."""
    assembler = LineAssembler(first_number)
    for line in physical:
        logical = assembler.feed(line)
        if logical is not None:
            yield logical
    tail = assembler.finish()
    if tail is not None:
        yield tail


def needs_more_input(text: str) -> bool:
    """For a multi-line edit buffer: True while ``text`` has an open ``\"\"\"`` block (Enter adds a line)."""
    assembler = LineAssembler()
    for line in text.split("\n"):
        assembler.feed(line)
    return assembler.pending


def logical_text(text: str) -> str:
    """What to execute for an edit buffer or a history entry that may hold a whole ``\"\"\"`` block.

    A plain one-line command comes back stripped; a block comes back as its content (plus any text after
    the closing quotes); comment-only or blank text comes back empty. An unclosed block is returned as its
    content so nothing the user typed is lost.
    """
    assembler = LineAssembler()
    parts: list[str] = []
    for line in text.split("\n"):
        logical = assembler.feed(line)
        if logical is not None:
            parts.append(logical.text)
    tail = assembler.finish()
    if tail is not None:
        parts.append("\n".join(tail.source.split("\n")[1:]).strip())
    return "\n".join(p for p in parts if p)
