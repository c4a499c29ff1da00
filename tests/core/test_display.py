"""core.display.visible: the one rule for showing untrusted text (file names, triggers, metadata)."""

from __future__ import annotations

import logging
import sys
import unicodedata

import pytest

from sdrepl.core.display import VisibleFormatter, needs_escape, visible


@pytest.mark.parametrize(("raw", "shown"), [
    ("bad-hands-5", "bad-hands-5"),
    ("日本語 café", "日本語 café"),
    ("back\\slash", "back\\slash"),
    ("x\x1b]2;PWNED\x07.pt", "x\\x1b]2;PWNED\\x07.pt"),  # OSC title
    ("\x1b]52;c;aGk=\x07", "\\x1b]52;c;aGk=\\x07"),  # OSC 52: the clipboard
    ("a\nembeddings new: <evil>", "a\\nembeddings new: <evil>"),
    ("cr\rtab\tdel\x7f", "cr\\rtab\\tdel\\x7f"),
    ("c1\x9b31m", "c1\\u009b31m"),  # the one-character CSI
    ("abc\u202eexe.pt", "abc\\u202eexe.pt"),  # right-to-left override
    ("iso\u2066late\u2069", "iso\\u2066late\\u2069"),
    ("zero\u200bwidth\u200d\ufeff", "zero\\u200bwidth\\u200d\\ufeff"),
    ("line\u2028sep", "line\\u2028sep"),
    ("tag\U000e0041", "tag\\U000e0041"),
    ("bad\udcffname", "bad\\xffname"),  # a file-name byte that is not UTF-8 (surrogateescape)
    ("lone\ud800", "lone\\ud800"),
])
def test_visible_escapes_what_controls_or_hides(raw: str, shown: str) -> None:
    assert visible(raw) == shown


def test_visible_keeps_our_own_line_breaks_when_asked() -> None:
    assert visible("one\ntwo\x1b[2J", newlines=True) == "one\ntwo\\x1b[2J"


def test_the_result_is_printable_and_stable() -> None:
    nasty = "".join(chr(c) for c in range(0x00, 0xA0)) + "\u202e\u200b\udcff"
    shown = visible(nasty)
    assert shown.isprintable() and visible(shown) == shown
    shown.encode("utf-8")  # no surrogates left


def test_every_control_format_and_separator_character_is_escaped() -> None:
    """All of Unicode's Cc, Cf, Cs, Zl, Zp characters (as this Python knows them), and nothing printable."""
    for code in range(sys.maxunicode + 1):
        ch = chr(code)
        hidden = unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp")
        assert needs_escape(ch) is hidden, hex(code)


def test_non_strings_are_shown_through_str() -> None:
    assert visible(12) == "12" and visible(None) == "None"


def test_log_records_stay_one_line_and_escaped() -> None:
    formatter = VisibleFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord("t", logging.WARNING, __file__, 1, "skipped %s: %s", ("x\x1b]2;P\x07.pt",
                                                                                   "bad\nfake line"), None)
    assert formatter.format(record) == "WARNING skipped x\\x1b]2;P\\x07.pt: bad\\nfake line"
