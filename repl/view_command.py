"""``!view FILE|N`` and ``!train plot [NAME]``: a picture checked and measured here, drawn by the REPL.

Both return the picture's facts as JSON (``"view"``/``"plot"``: path, width, height) and attach the
decoded pixels for the interactive REPL to draw (``Outcome.pictures``); a scripted session prints the JSON
only, never an escape byte.

``N`` counts this session's pictures newest first: ``!view 1`` (or ``!view``) is the last picture made,
``!view 2`` the one before; a generation of ``--n 4`` adds four, a grid adds its grid picture. A bare
number is always N; write ``./3`` for a file called ``3``. The session remembers the last
:data:`REMEMBERED` pictures (``Session.outputs``, filled by :func:`output_paths` for every line).
"""

from __future__ import annotations

import base64
import binascii
import shlex
from typing import TYPE_CHECKING, Any

from sdrepl.core.display import visible
from sdrepl.core.errors import UsageError
from sdrepl.repl.actions import Outcome
from sdrepl.repl.preview.picture import PreviewError, Shown, decode, open_file
from sdrepl.repl.render import display_path

if TYPE_CHECKING:
    from sdrepl.repl.session import Session

USAGE = "!view [FILE|N]"
HELP = ("Shows a picture in the terminal: FILE (relative to the session's folder; PNG, JPEG or WEBP), or N, "
        "this session's Nth latest picture (1, the default, is the last one made; a generation of --n 4 "
        "counts four, a grid its grid picture; write ./3 for a file named 3). The picture fills the "
        "terminal (kitty, iTerm2, sixel or coloured half-blocks, as !set preview says). Scripted sessions "
        "print its path, width and height as JSON instead, never a picture.")
#: How many of a session's pictures ``!view N`` can reach.
REMEMBERED = 1000


def parse_view(args: str) -> int | str:
    """``1`` for no argument, an int for ``N``, else the file name as typed (quotes allowed)."""
    text = args.strip()
    if not text:
        return 1
    if text.isdigit():
        number = int(text)
        if number < 1:
            raise UsageError(f"!view {text}: N counts from 1 (the latest picture); usage: {USAGE}")
        return number
    try:
        words = shlex.split(text)
    except ValueError:
        words = [text]
    return words[0] if len(words) == 1 else text


def output_paths(result: dict[str, Any]) -> list[str]:
    """The pictures a line made, oldest first: a generation's ``images``, a grid's ``grid`` picture."""
    grid = result.get("grid")
    if isinstance(grid, dict) and grid.get("path"):
        return [str(grid["path"])]
    return [str(i["path"]) for i in result.get("images") or [] if isinstance(i, dict) and i.get("path")]


def recent(session: Session, number: int) -> str:
    outputs = list(getattr(session, "outputs", ()) or ())
    if number > len(outputs):
        have = f"only {len(outputs)}" if outputs else "none yet"
        raise UsageError(f"!view {number}: this session has {have} picture(s); !view 1 is the latest, or give a "
                         "FILE")
    return outputs[-number]


async def run_view(session: Session, target: int | str, started: Any) -> Outcome:
    path = session.resolve(recent(session, target) if isinstance(target, int) else target)
    image = open_file(path)
    view = {"path": str(path), "width": image.width, "height": image.height}
    if isinstance(target, int):
        view["n"] = target
    text = f"{display_path(str(path), session.cwd)}  ({image.width}x{image.height})"
    return Outcome({"view": view}, text, pictures=(Shown(image, large=True),))


async def run_train_plot(session: Session, name: str | None, started: Any) -> Outcome:
    """``!train plot [NAME]``: the log folder's ``loss.png``, fetched over the protocol (the daemon may be remote)."""
    reply = await session.client.request("train_plot", **({"name": name} if name else {}))
    where = f"the loss plot of {visible(reply.get('name') or name or '?')}"
    try:
        data = base64.b64decode(str(reply.get("data", "")), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PreviewError(f"{where}: the daemon sent it in a broken form ({exc})") from None
    image = decode(data, where)
    plot = {k: reply.get(k) for k in ("name", "path", "log_dir", "step")}
    plot.update(width=image.width, height=image.height)
    step = f", step {reply['step']}" if isinstance(reply.get("step"), int) else ""
    text = f"loss plot of {visible(plot['name'])}: {visible(plot['path'])}  ({image.width}x{image.height}{step})"
    return Outcome({"plot": plot}, text, pictures=(Shown(image, large=True),))
