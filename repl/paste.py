"""What a bracketed paste becomes in the edit buffer: one entry, never several lines run one by one.

A terminal with bracketed paste (every current one; prompt_toolkit turns it on) hands a paste over as one
piece. Three cases:

- an A1111 ``parameters`` block (prompt lines, ``Negative prompt: ...``, ``Steps: N, Sampler: ...``), as
  copied from A1111's PNG Info tab or civitai: one generation line with those settings, built by the same
  parser and builder as ``!fetch`` (``core.pnginfo.parse_parameters``, ``actions.fetch_line``), plus a
  notice naming the fields sdrepl cannot honour (Hires, Denoising, ADetailer...);
- several lines of anything else: one ``\"\"\"`` block, i.e. one multi-line prompt (unless it already
  holds ``\"\"\"`` lines, or every line is a ``!command``: then it is kept as pasted);
- one line: as pasted.

The result is shown in the buffer for the user to edit; nothing runs before Enter.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdrepl.core.pnginfo import parse_parameters
from sdrepl.repl.actions import fetch_line, unsupported_fields, unsupported_notice
from sdrepl.repl.lines import QUOTES


@dataclass(frozen=True)
class Pasted:
    """The text for the buffer and an optional notice for above the prompt."""

    text: str
    notice: str | None = None


def is_parameters(text: str) -> bool:
    """Whether ``text`` has A1111's ``parameters`` shape: its last line is the ``Steps: ...`` pairs line."""
    parsed = parse_parameters(text)
    return parsed["steps"] is not None and text.strip().splitlines()[-1].lstrip().startswith("Steps:")


def paste_entry(data: str) -> Pasted:
    """What a paste of ``data`` puts into the buffer (see the module docstring)."""
    text = data.replace("\r\n", "\n").replace("\r", "\n").strip("\n")
    if "\n" not in text.strip() and not text.lstrip().startswith("Steps:"):
        return Pasted(text)
    if is_parameters(text):
        parsed = parse_parameters(text)
        unsupported = unsupported_fields(parsed)
        line = fetch_line(parsed)
        notice = "pasted A1111 parameters: Enter makes the picture"
        if unsupported:
            notice += "; " + unsupported_notice(unsupported).removeprefix("note: ")
        return Pasted(line, notice)
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if any(ln.strip().startswith(QUOTES) for ln in lines) or all(ln.lstrip().startswith("!") for ln in lines):
        return Pasted(text)
    return Pasted(f"{QUOTES}\n{text}\n{QUOTES}", f"pasted {len(lines)} lines as one prompt (a {QUOTES} block)")
