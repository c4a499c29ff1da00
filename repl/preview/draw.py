"""From a line's result to the text that shows its pictures: which pictures, which protocol, what size.

The interactive REPL calls :func:`pictures_of` on every result and :func:`picture_text` for what it
returns, then writes that text above the prompt (``InteractiveRepl.show_pictures``). Scripted sessions
never come here. The pictures of a line: what its executor attached (``!view``, ``!train plot``), else a
grid's picture (``result["grid"]["path"]``, as large as the terminal allows: it is for comparing), else
a generation's files (``result["images"]``), several put side by side as one thumbnail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdrepl.repl.preview.detect import PROTOCOLS, Terminal
from sdrepl.repl.preview.picture import MAX_SHEET, PreviewError, Shown, contact_sheet, load
from sdrepl.repl.preview.render import DEFAULT_CELL, box, encode


def pictures_of(result: Any) -> tuple[Shown, ...]:
    """The pictures a line's result (a ``LineResult``) has to show; empty for a failed line."""
    if not getattr(result, "ok", False):
        return ()
    attached = tuple(getattr(result, "pictures", ()) or ())
    if attached:
        return attached
    data = getattr(result, "result", None) or {}
    grid = data.get("grid")
    if isinstance(grid, dict) and grid.get("path"):
        return (Shown(Path(str(grid["path"])), large=True),)  # a grid is for comparing: as large as fits
    if getattr(result, "kind", "") == "generate":
        return tuple(Shown(Path(str(i["path"]))) for i in data.get("images") or [] if isinstance(i, dict)
                     and i.get("path"))[:MAX_SHEET]
    return ()


def protocol_for(mode: str, terminal: Terminal | None) -> str | None:
    """``!set preview``'s mode against what was detected: ``auto`` follows detection, a protocol is forced."""
    if mode in PROTOCOLS:
        return mode
    if mode == "auto" and terminal is not None:
        return terminal.protocol
    return None


def picture_text(shown: tuple[Shown, ...], protocol: str, *, columns: int, rows: int,
                 cell: tuple[int, int] = DEFAULT_CELL, terminal: Terminal | None = None) -> str:
    """The text drawing ``shown``: thumbnails side by side as one picture, each large picture on its own.

    Raises :class:`PreviewError` (naming the file) for a picture that cannot be read or decoded.
    """
    truecolor = terminal.truecolor if terminal is not None else True
    tmux = bool(terminal is not None and terminal.tmux and terminal.protocol == protocol)
    thumbs = [load(s.source) for s in shown if not s.large]
    parts = []
    if thumbs:
        max_cols, max_rows = box(columns, rows, large=False)
        parts.append(encode(contact_sheet(thumbs), protocol, max_cols, max_rows, cell=cell, truecolor=truecolor,
                            tmux=tmux))
    for item in shown:
        if item.large:
            max_cols, max_rows = box(columns, rows, large=True)
            parts.append(encode(load(item.source), protocol, max_cols, max_rows, cell=cell, truecolor=truecolor,
                                tmux=tmux))
    return "".join(parts)


__all__ = ["PreviewError", "Shown", "picture_text", "pictures_of", "protocol_for"]
