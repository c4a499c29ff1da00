"""The executor of REPL lines, shared by the interactive REPL, scripted sessions and ``!replay``.

A :class:`Session` holds what a user changes while working (the ``!set`` defaults, the folder paths are
relative to) and a daemon client; :meth:`Session.execute` runs one logical line and always returns a
:class:`LineResult`. It never raises for anything a user or the daemon can cause: a remote error, a
typo, a missing file all become ``ok=False`` with ``{"type", "message"}``; a bug of our own becomes
``InternalError`` with one line (the traceback goes to the log, never to the screen). Only cancellation
(Ctrl-C cancelling the task) propagates, after asking the daemon to drop the work.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdrepl.core.errors import SdreplError, UsageError
from sdrepl.core.samplers import DEFAULT_SAMPLER
from sdrepl.repl import actions
from sdrepl.repl.commands import find_command, split_command
from sdrepl.repl.lines import QUOTES, LogicalLine, logical_text
from sdrepl.repl.parse import parse_generation
from sdrepl.repl.view_command import REMEMBERED, output_paths

log = logging.getLogger("sdrepl.repl")

#: What users of Ollama, InvokeAI and shells type alone to leave or ask for help: never a 20-step picture.
HABITS = {"/bye": "!quit", "exit": "!quit", "quit": "!quit", "/exit": "!quit", "/quit": "!quit", ":q": "!quit",
          "/help": "!help", "/?": "!help", "?": "!help", "help": "!help"}
#: InvokeAI's ``!NN``: history entry NN (as ``!history`` numbers it) back into the edit buffer.
RECALL = re.compile(r"!\d+")


@dataclass
class SessionDefaults:
    """What ``!set`` changes; an option on a generation line overrides it for that line."""

    steps: int = 20
    cfg: float = 7.0
    seed: int | None = None  # None: a new random seed per line (reported in the result)
    size: tuple[int, int] | None = None  # None: the model's native size
    sampler: str = DEFAULT_SAMPLER
    negative: str = ""
    n: int = 1
    clip_skip: int = 1
    #: A1111's prompt settings; None leaves the daemon's own (``--emphasis``, ``--comma-padding-backtrack``).
    emphasis: str | None = None
    comma_padding_backtrack: int | None = None
    #: Pictures in the interactive REPL: off, auto (detected), kitty, iterm, sixel or blocks.
    preview: str = "auto"


@dataclass
class LineResult:
    """The outcome of one line: JSON-shaped ``result`` (or ``error``) plus its human rendering.

    ``kind`` is ``generate``, a command name (``tokens``, ``set``, ...; ``quit`` for ``!exit`` too),
    ``empty`` for a blank or comment line, or ``command`` for an unknown ``!name``.
    ``edit_buffer`` is text the interactive UI should put in its edit buffer (``!fetch``);
    ``quit`` asks the caller to end the session; ``pictures`` are for the interactive REPL to draw.
    """

    ok: bool
    kind: str
    result: dict[str, Any]
    error: dict[str, str] | None
    text: str
    edit_buffer: str | None = None
    quit: bool = False
    pictures: tuple[Any, ...] = ()

    def to_json(self, number: int, source: str) -> dict[str, Any]:
        """The scripted ``--json`` object for this line (interface.md: line, input, ok, result or error)."""
        out: dict[str, Any] = {"line": number, "input": source, "ok": self.ok}
        out.update((k, v) for k, v in self.result.items() if k not in out and k != "error")
        if not self.ok:
            out["error"] = self.error
        return out


def error_dict(exc: BaseException) -> dict[str, str]:
    """``{"type", "message"}`` for an error: the daemon's own for a RemoteError, the class name for ours."""
    type_name = getattr(exc, "type_name", None)
    if type_name and hasattr(exc, "message") and not isinstance(exc, SdreplError):
        return {"type": str(type_name), "message": str(exc.message)}
    if isinstance(exc, SdreplError):
        message = getattr(exc, "message", None) or str(exc)
        return {"type": exc.type_name, "message": str(message)}
    if isinstance(exc, (ConnectionError, EOFError)):
        return {"type": "DaemonUnavailable",
                "message": f"lost the connection to the daemon ({exc or type(exc).__name__}); "
                           "see `sdrepl status` and the daemon log beside its socket"}
    log.error("unexpected error while running a line", exc_info=exc)
    text = " ".join(str(exc).split()) or "no message"
    return {"type": "InternalError",
            "message": f"unexpected {type(exc).__name__}: {text} (a bug in sdrepl; the traceback is in the log)"}


class Session:
    """Runs REPL lines against one daemon connection.

    ``history`` supplies the lines for ``!history`` (the interactive REPL passes its persistent history);
    without it, the lines this session has executed are used. ``cwd`` anchors relative paths
    (``!fetch``, ``!replay``, ``--data``). ``on_replay_result``, when set, is called with
    ``(line number, input, LineResult)`` for each line of a ``!replay`` as it finishes, so a UI can show
    progress; the ``!replay`` result text is then only the summary.
    """

    def __init__(self, client: Any, *, defaults: SessionDefaults | None = None,
                 history: Callable[[], list[str]] | None = None, cwd: Path | None = None) -> None:
        self.client = client
        self.defaults = defaults if defaults is not None else SessionDefaults()
        self.cwd = (cwd or Path.cwd()).absolute()
        self.seen: list[str] = []
        #: The pictures this session made, oldest first (``!view N``; repl/view_command.py).
        self.outputs: deque[str] = deque(maxlen=REMEMBERED)
        self.replay_depth = 0
        self.on_replay_result: Callable[[int, str, LineResult], None] | None = None
        #: Set by an executor that Ctrl-C interrupted when "cancelled" would mislead (``!train --wait``).
        self.cancel_note: str | None = None
        self._history = history

    def history_lines(self) -> list[str]:
        """The provider's history, else the lines run before the current one (``!history`` not listing itself)."""
        return list(self._history()) if self._history is not None else list(self.seen[:-1])

    def resolve(self, text: str) -> Path:
        """A user-typed path, relative to the session's folder unless absolute (``~`` expanded)."""
        return actions.resolve(self.cwd, text)

    async def execute(self, line: str, *, on_request_started: Callable[[int], None] | None = None) -> LineResult:
        """Run one line as typed (a whole ``\"\"\"`` block is accepted too); see the class docstring."""
        text = logical_text(line) if line.lstrip().startswith(QUOTES) else line.strip()
        if not text or (text.startswith("#") and "\n" not in text):
            return LineResult(True, "empty", {}, None, "")
        return await self._run(text, on_request_started)

    async def execute_logical(self, logical: LogicalLine, *,
                              on_request_started: Callable[[int], None] | None = None) -> LineResult:
        """Run a line from :mod:`lines` (its text is final: a block's ``#`` lines are prompt text)."""
        if logical.error:
            return LineResult(False, "block", {}, {"type": UsageError.__name__, "message": logical.error},
                              f"error: {logical.error}")
        return await self._run(logical.text, on_request_started)

    async def _run(self, text: str, started: Callable[[int], None] | None) -> LineResult:
        self.seen.append(text)
        kind = "generate"
        text = HABITS.get(text.strip().lower(), text)
        try:
            if RECALL.fullmatch(text):
                kind = "recall"
                outcome = actions.recall(self, int(text[1:]))
            elif text.startswith("!"):
                name, args = split_command(text)
                kind = "command"
                command = find_command(name)
                kind = command.name
                outcome = await command.run(self, command.parse(args), started)
            else:
                outcome = await actions.run_generate(self, parse_generation(text), started)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = error_dict(exc)
            return LineResult(False, kind, {}, error, f"error: {error['type']}: {error['message']}")
        self.outputs.extend(output_paths(outcome.result))
        if outcome.error is not None:
            return LineResult(False, kind, outcome.result, outcome.error, outcome.text)
        return LineResult(True, kind, outcome.result, None, outcome.text, outcome.edit_buffer, outcome.quit,
                          outcome.pictures)
