"""Untrusted text made safe to show on a terminal or in a log: :func:`visible`, the one rule for it.

File names, triggers and metadata fields (``sd_checkpoint_name``, ``init_text``, a PNG card's name) come
from files other people made. Printed raw, ``x\\x1b]2;PWNED\\x07.pt`` retitles the terminal, OSC 52
writes the clipboard, a newline prints a fake ``embeddings new:`` line, a bidi override shows a name
backwards and a zero-width space makes two names look alike. :func:`visible` writes every such character
as a visible escape instead:

- C0 controls and DEL: ``\\n``, ``\\r``, ``\\t``, else ``\\x1b`` (two hex digits);
- C1 controls (U+0080..U+009F, e.g. the one-byte CSI U+009B), format characters (Unicode category Cf:
  bidi embeddings, overrides and isolates, zero-width spaces and joiners, the BOM, soft hyphen, tag
  characters) and the line and paragraph separators U+2028/U+2029: ``\\u202e`` (or ``\\U000e0041``);
- a byte of a file name that is not UTF-8 (Python's surrogateescape form, U+DC80..U+DCFF, as the
  protocol carries it): ``\\xff``; any other lone surrogate: ``\\udXXX``.

Everything else, ``\\`` included, is left as it is: the result is for eyes, not for parsing (JSON output
carries the exact text). Use :func:`visible` at the point where a value is put into human text, so the
text's own line breaks stay and a value's cannot pass for one.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from typing import Any

#: ASCII characters that are never shown raw (C0 controls and DEL).
_ASCII_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
#: Unicode categories shown escaped: controls, format characters, surrogates, line/paragraph separators.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    if code < 0x80 or 0xDC80 <= code <= 0xDCFF:  # a control, or an undecodable file-name byte
        return f"\\x{code & 0xFF:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def needs_escape(ch: str) -> bool:
    """Whether :func:`visible` writes ``ch`` (one character) as an escape."""
    if ch.isascii():
        return _ASCII_CONTROL.match(ch) is not None
    return unicodedata.category(ch) in _HIDDEN_CATEGORIES


def visible(text: object, *, newlines: bool = False) -> str:
    """``text`` (``str()`` of it) with every hidden or terminal-controlling character escaped.

    ``newlines=True`` keeps ``\\n`` as a line break: for whole blocks of our own text (a log record, a
    result printed above the prompt) whose values were already escaped one by one.
    """
    text = text if isinstance(text, str) else str(text)
    if text.isascii() and _ASCII_CONTROL.search(text) is None:
        return text  # the common case, at toolbar speed
    return "".join(_escape(ch) if needs_escape(ch) and not (newlines and ch == "\n") else ch for ch in text)


class VisibleFormatter(logging.Formatter):
    """Log records with file names, reasons and metadata made visible: a log line stays one line, and
    reading the log (``tail -f``) cannot retitle or reprogram the reader's terminal."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = visible(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return visible(super().formatException(ei), newlines=True)

    def formatStack(self, stack_info: str) -> str:
        return visible(super().formatStack(stack_info), newlines=True)
