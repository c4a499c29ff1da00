"""The interactive read-eval-print loop: one PromptSession, one state, the session executing lines.

Shape (prompt_toolkit's asyncio example, ptpython's repl): ``prompt_async`` in a loop inside
``patch_stdout``, background work (budget tracker, daemon events) started inside that block and stopped
in ``finally``. Daemon events change the state; the state redraws the screen and its notifications are
printed above the prompt. A line runs as a task while a SIGINT handler turns Ctrl-C into ``cancel``.
Only EOF (Ctrl-D) and ``!quit`` leave: any error of a line, or of the REPL itself, is printed (one line,
details in the log) and the loop goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.patch_stdout import patch_stdout
from prompt_toolkit.styles import Style

from sdrepl.core.display import visible
from sdrepl.repl.completion import make_completer
from sdrepl.repl.history import BlockHistory
from sdrepl.repl.keys import AbandonBlock, make_key_bindings, quiet_keyboard, sigint_handler
from sdrepl.repl.lines import LineAssembler, LogicalLine
from sdrepl.repl.state import ReplState, StateFeed
from sdrepl.repl.toolbar import BudgetTracker, render_toolbar, training_part

log = logging.getLogger("sdrepl.repl")

STYLE = Style.from_dict({
    "bottom-toolbar": "noreverse bg:#262626 #bcbcbc",
    "toolbar.error": "#ff5f5f bold",
    "toolbar.warn": "#ffd75f",
    "toolbar.embedding": "#87d7ff",
    "toolbar.train": "#afd787",
    "prompt": "#87afd7 bold",
})


def history_path() -> Path:
    """``$SDREPL_HISTORY``, else ``history`` in the user data dir (platformdirs), created on demand."""
    override = os.environ.get("SDREPL_HISTORY")
    if override:
        return Path(override).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("sdrepl")) / "history"


def open_history() -> History:
    """A FileHistory, or an in-memory one (with a warning) when the file cannot be written; blocks are one entry."""
    path = history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
        return BlockHistory(FileHistory(str(path)))
    except OSError as exc:
        print(f"sdrepl: history not saved: cannot write {path} ({exc.strerror}); set SDREPL_HISTORY to "
              "a writable file", file=sys.stderr)
        return BlockHistory(InMemoryHistory())


class InteractiveRepl:
    """The loop's parts wired together; ``run()`` is the loop. Tests pass a fake session, input and output."""

    def __init__(self, client: Any, settings: Any, *, session: Any = None, history: History | None = None,
                 input: Any = None, output: Any = None) -> None:
        self.client = client
        self.settings = settings
        self.state = ReplState()
        self.feed = StateFeed(client, self.state)
        self.lines = LineAssembler()
        self.block: list[str] | None = None  # the open """ block's lines, for the toolbar's count
        self.executing = False
        self._progress_shown = False
        self._progress_drawn_at = 0.0
        self._waiting_train = False  # a `!train ... --wait` runs: its progress is drawn instead
        self._terminal = sys.stdout  # the real one: run() patches sys.stdout for output above the prompt
        self.terminal: Any = None  # what repl.preview.detect found at start-up (None: not probed)
        history = history if history is not None else open_history()
        if session is None:
            from sdrepl.repl.session import Session, SessionDefaults

            session = Session(client, defaults=SessionDefaults(), history=history.get_strings, cwd=None)
            session.on_replay_result = self._replay_line_done
        self.session = session
        self.tracker = BudgetTracker(client, self.state, get_prefix=lambda: "\n".join(self.block or []),
                                     get_default_negative=self._default_negative,
                                     get_settings=self._budget_settings)
        self.prompt = PromptSession(
            history=history, completer=make_completer(
                lambda: self.state.embeddings,
                get_networks=lambda: {"lora": self.state.loras, "hypernet": self.state.hypernetworks}),
            complete_while_typing=True, bottom_toolbar=lambda: render_toolbar(self.state),
            key_bindings=make_key_bindings(in_block=lambda: self.block is not None),
            style=STYLE, input=input, output=output, refresh_interval=None,
        )
        self.prompt.default_buffer.on_text_changed += lambda buffer: self.tracker.on_text_changed(buffer.text)
        self.state.listeners.append(self._on_state_changed)

    # -- output ---------------------------------------------------------------------------------------

    def emit(self, text: str) -> None:
        """Print a line for the user: above the prompt while it is shown, else straight to the terminal.

        While a line runs no prompt is drawn, and patch_stdout's proxy would write from its own thread
        later, possibly after the next prompt appeared; writing directly keeps the order on the screen.
        Whatever the text holds, no control character reaches the terminal raw (``core.display``).
        """
        text = visible(text, newlines=True)
        if self.prompt.app.is_running:
            print(text.rstrip("\n"), flush=True)
            return
        self._write(("\r\x1b[K" if self._progress_shown else "") + text.rstrip("\n") + "\n")
        self._progress_shown = False

    def _write(self, text: str) -> None:
        try:
            self._terminal.write(text)
            self._terminal.flush()
        except (OSError, ValueError):  # a closed or broken terminal: nothing useful left to do with output
            log.warning("could not write to the terminal", exc_info=True)

    def _on_state_changed(self) -> None:
        while self.state.notifications:
            self.emit(self.state.notifications.popleft())
        if self.executing:
            self._draw_progress()
        app = self.prompt.app
        if app.is_running:
            app.invalidate()

    def _draw_progress(self) -> None:
        """``generating ━━━━━───── 12/30 (Ctrl-C cancels)`` on one line, at most ~10 times a second.

        While ``!train ... --wait`` waits, the training job's line (as in the toolbar) takes its place.
        """
        if self._waiting_train:
            part = training_part(self.state)
            now = time.monotonic()
            if part is not None and now - self._progress_drawn_at >= 0.1:
                self._progress_drawn_at = now
                self._write(f"\r{part[1]}  (Ctrl-C stops waiting; the job goes on)\x1b[K")
                self._progress_shown = True
            return
        progress = self.state.progress
        if not progress or progress.get("request") != self.state.running_request:
            return
        step, total = progress.get("step") or 0, progress.get("total") or 0
        if progress.get("queued") and not step:
            self._write(f"\rqueued (position {progress['queued']}) behind another request  (Ctrl-C cancels)\x1b[K")
            self._progress_shown = True
            return
        now = time.monotonic()
        if step < total and now - self._progress_drawn_at < 0.1:
            return
        self._progress_drawn_at = now
        filled = int(20 * step / total) if total else 0
        bar = "━" * filled + "─" * (20 - filled)
        self._write(f"\rgenerating {bar} {step}/{total}  (Ctrl-C cancels)\x1b[K")
        self._progress_shown = True

    def _width(self) -> int:
        try:
            return max(40, self.prompt.app.output.get_size().columns - 1)
        except Exception:  # no real terminal (tests): a common width
            return 100

    def _budget_settings(self) -> dict[str, Any]:
        from sdrepl.repl.actions import prompt_settings

        defaults = getattr(self.session, "defaults", None)
        return {"steps": getattr(defaults, "steps", None), **prompt_settings(defaults)}

    def _default_negative(self) -> str:
        defaults = getattr(self.session, "defaults", None)
        return str(getattr(defaults, "negative", "") or "")

    # -- the loop -------------------------------------------------------------------------------------

    async def run(self) -> int:
        self._terminal = sys.stdout
        self.terminal = probe_terminal()  # before prompt_toolkit owns the terminal (a DA1 query may be sent)
        await self.feed.start()
        self.client.add_event_listener(self.tracker.on_event)
        watch = None
        with patch_stdout(raw=True):
            self.emit(self.banner())
            self.tracker.start()
            if hasattr(self.client, "watch"):  # a repl.connection.Connection: survive the daemon
                self.client.on_lost.append(self._daemon_lost)
                self.client.on_back.append(self._daemon_back)
                self.client.on_status = lambda text: self.emit(f"sdrepl: {text}")
                watch = asyncio.ensure_future(self.client.watch())
            try:
                return await self._loop()
            finally:
                if watch is not None:
                    watch.cancel()
                    with contextlib.suppress(BaseException):
                        await watch
                await self.tracker.close()
                await self.feed.close()

    # -- the daemon going away and coming back ----------------------------------------------------------

    def _daemon_lost(self, why: str) -> None:
        """Said at once (not on the next line); buffer, history and ``!set`` defaults stay as they are."""
        self.state.daemon_gone = why
        self.state.notify(f"the daemon on {self.settings.target} went away ({why}); reconnecting when one answers "
                          "again, or the next line starts one")

    async def _daemon_back(self, client: Any) -> None:
        await self.feed.resync()
        self.tracker.refresh()
        hello = getattr(client, "hello", None) or {}
        model = (hello.get("model") or {}).get("model", "?")
        self.state.notify(f"reconnected to the daemon on {self.settings.target} (pid {hello.get('pid', '?')}, model "
                          f"{model}; {len(self.state.embeddings)} embeddings)")

    async def _ensure_daemon(self, line: LogicalLine) -> bool:
        """Before a line that needs the daemon: reconnect, or start one (as at start-up); False if none."""
        ensure = getattr(self.client, "ensure", None)
        if ensure is None or not needs_daemon(line.text):
            return True
        try:
            return await ensure(auto_start=True)
        except Exception as exc:
            self.emit(f"sdrepl: no daemon can be reached or started on {self.settings.target}: "
                      f"{getattr(exc, 'message', None) or exc}; the line is back in the buffer")
            return False

    def banner(self) -> str:
        model = self.state.model or {}
        where = " ".join(str(model[k]) for k in ("device", "dtype") if model.get(k))
        skipped = f", {len(self.state.skipped)} skipped (!embeddings says why)" if self.state.skipped else ""
        return (f"sdrepl · model {model.get('model', self.settings.model)}{f' ({where})' if where else ''} · "
                f"{len(self.state.embeddings)} embeddings{skipped} · !help, Tab completes <names>, Ctrl-D leaves")

    async def _loop(self) -> int:
        prefill = ""
        failures = 0
        while True:
            self.tracker.on_text_changed(prefill)  # the toolbar shows the new buffer, not the last line's
            try:
                text = await self.prompt.prompt_async(self._message, default=prefill)
                failures = 0
            except EOFError:
                return 0
            except (KeyboardInterrupt, AbandonBlock):
                self.abandon_block()
                continue
            except Exception as exc:  # the prompt itself broke (a drawing bug): report, retry, but not forever
                failures += 1
                log.exception("prompt failed")
                self.emit(f"internal error in the prompt: {exc!r} (details in {log_location()})")
                if failures >= 5:
                    return 1
                continue
            prefill = ""
            for line in self.assemble(text):
                if not await self._ensure_daemon(line):
                    prefill = line.source
                    break
                result = await self.run_line(line)
                if result is None:
                    continue
                self.show(result)
                if getattr(result, "quit", False):
                    return 0
                prefill = getattr(result, "edit_buffer", None) or prefill

    async def run_line(self, line: LogicalLine) -> Any:
        """Execute one logical line; an exception that escapes the session is printed, never raised."""
        try:
            return await self.execute(line)
        except Exception as exc:
            log.exception("line failed: %r", line.text)
            self.emit(describe_failure(exc))
            return None

    def _message(self) -> list[tuple[str, str]]:
        return [("class:prompt", "... " if self.block is not None else "sd> ")]

    def assemble(self, text: str) -> list[LogicalLine]:
        """Logical lines completed by what was entered (by the session's rules, sdrepl.repl.lines).

        A ``\"\"\"`` line opens a block that a later ``\"\"\"`` line closes; an edit buffer may hold
        several lines at once (a ``!fetch`` of a multi-line prompt), each is fed in turn.
        """
        done = []
        for physical in text.split("\n"):
            logical = self.lines.feed(physical)
            if self.lines.pending:
                self.block = [] if self.block is None else [*self.block, physical]
            else:
                self.block = None
            if logical is not None:
                done.append(logical)
        return done

    def abandon_block(self) -> None:
        if self.lines.pending:
            self.emit("(block abandoned)")
        abandon = getattr(self.prompt.history, "abandon", None)
        if abandon is not None:
            abandon()
        self.lines = LineAssembler()
        self.block = None

    async def execute(self, line: LogicalLine) -> Any:
        """Run one line as a task that Ctrl-C cancels (the session then cancels the daemon's work)."""
        interrupted = False

        def on_started(request_id: Any) -> None:
            self.state.running_request = request_id

        task = asyncio.ensure_future(self._execute(line, on_started))

        def on_sigint() -> None:
            nonlocal interrupted
            if not task.done():
                interrupted = True
                task.cancel()

        self.executing = True
        self._waiting_train = is_train_wait(line.text)
        try:
            with sigint_handler(on_sigint), quiet_keyboard():
                return await task
        except asyncio.CancelledError:
            if not interrupted:
                raise
            note = getattr(self.session, "cancel_note", None)
            if note:
                self.session.cancel_note = None
            self.emit(note or "cancelled")
            return None
        finally:
            self.executing = False
            if self._progress_shown:
                self._write("\r\x1b[K")
                self._progress_shown = False
            self.state.running_request = None
            self.state.progress = None

    async def _execute(self, line: LogicalLine, on_started: Any) -> Any:
        run_logical = getattr(self.session, "execute_logical", None)
        if run_logical is not None:
            return await run_logical(line, on_request_started=on_started)
        return await self.session.execute(line.text, on_request_started=on_started)

    def _replay_line_done(self, number: int, source: str, result: Any) -> None:
        """``!replay`` shows each line's outcome as it finishes, not only at the end."""
        first = source.strip().splitlines()[0] if source.strip() else ""
        outcome = getattr(result, "text", "") or ("ok" if result.ok else format_error(result.error))
        self.emit(f"{number:>4} {first[:60]}: {outcome}")

    def show(self, result: Any) -> None:
        """Print a LineResult: its text, or its error as ``Type: message`` (never a traceback).

        Help is prose: it is wrapped at word boundaries to the terminal's width (the terminal would cut
        words in two).
        """
        text = getattr(result, "text", None)
        if text and getattr(result, "kind", "") == "help":
            text = wrap_text(str(text), self._width())
        if text:
            self.emit(str(text))
        elif not getattr(result, "ok", True):
            self.emit(format_error(getattr(result, "error", None)))
        self.show_pictures(result)

    def show_pictures(self, result: Any) -> None:
        """Draw a result's pictures above the prompt (``!set preview``; repl/preview), or say why not.

        The text is written while no prompt is drawn (the line has finished; prompt_toolkit redraws the
        prompt below it afterwards), through ``run_in_terminal`` should a prompt be up. A picture that
        cannot be read is one line, never an exception: the line's result is already shown.
        """
        from sdrepl.repl.preview.draw import pictures_of, protocol_for

        shown = pictures_of(result)
        mode = str(getattr(getattr(self.session, "defaults", None), "preview", "auto"))
        protocol = protocol_for(mode, self.terminal)
        if not shown or protocol is None:
            return
        # Encoding and writing take a moment: Ctrl-C then must not raise into the loop, nor keys echo
        # into the picture (they wait for the prompt, as while a line runs).
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # called outside the loop (tests): nothing to guard
            self._draw(shown, protocol)
            return
        with sigint_handler(lambda: None), quiet_keyboard():
            self._draw(shown, protocol)

    def _draw(self, shown: Any, protocol: str) -> None:
        from sdrepl.repl.preview.draw import PreviewError, picture_text
        from sdrepl.repl.preview.render import cell_pixels

        try:
            size = self.prompt.app.output.get_size()
            columns, rows = size.columns, size.rows
        except Exception:  # no real terminal (tests): a common size
            columns, rows = 100, 30
        try:
            cell = cell_pixels(self._terminal.fileno())
        except (AttributeError, OSError, ValueError):
            cell = (10, 20)
        try:
            text = picture_text(shown, protocol, columns=columns, rows=rows, cell=cell, terminal=self.terminal)
        except PreviewError as exc:
            self.emit(f"preview: {exc}")
            return
        except Exception as exc:  # a picture must never take the REPL down
            log.exception("preview failed")
            self.emit(f"preview failed: {type(exc).__name__}: {exc} (details in {log_location()}); "
                      "!set preview off turns pictures off")
            return
        if self.prompt.app.is_running:
            from prompt_toolkit.application import run_in_terminal

            run_in_terminal(lambda: self._write(text))
        else:
            self._write(text)


def wrap_text(text: str, width: int) -> str:
    """Each line longer than ``width`` wrapped at word boundaries; continuation lines keep its indent.

    A table row (``!help``'s overview) continues under its last column, so the columns stay readable.
    """
    out = []
    for line in text.split("\n"):
        if len(line) <= width:
            out.append(line)
            continue
        column = line.find("  ", len(line) - len(line.lstrip()))
        indent = " " * (len(line) - len(line[column:].lstrip()) if 0 < column < width // 2 else
                        len(line) - len(line.lstrip()))
        out.append(textwrap.fill(line, width, subsequent_indent=indent, break_long_words=False,
                                 break_on_hyphens=False))
    return "\n".join(out)


def probe_terminal() -> Any:
    """The picture protocol of this terminal (repl/preview/detect.py); None if probing fails."""
    from sdrepl.repl.preview.detect import probe

    try:
        return probe()
    except Exception:  # detection is a nicety: no pictures rather than no REPL
        log.exception("terminal detection failed")
        return None


def is_train_wait(text: str) -> bool:
    """Whether a line is ``!train NAME ... --wait`` (which blocks until the job ends)."""
    return text.lstrip().lower().startswith("!train ") and re.search(r"(?:^|\s)--wait(?:\s|$)", text) is not None


def needs_daemon(text: str) -> bool:
    """Whether running ``text`` talks to the daemon (``!help``, ``!history``, ``!quit`` and habits do not)."""
    from sdrepl.repl.session import HABITS, RECALL

    word = HABITS.get(text.strip().lower(), text.strip())
    if RECALL.fullmatch(word):
        return False
    return not (word.startswith("!") and word[1:].split(" ", 1)[0].lower() in ("help", "history", "quit", "exit"))


def format_error(error: Any) -> str:
    if isinstance(error, dict):
        return f"{error.get('type', 'Error')}: {error.get('message', '')}"
    if isinstance(error, BaseException):
        return f"{getattr(error, 'type_name', type(error).__name__)}: {getattr(error, 'message', None) or error}"
    return f"error: {error}" if error else "error"


def describe_failure(exc: BaseException) -> str:
    """One line for an exception that escaped the session: the user's error as is, ours with the log."""
    name = type(exc).__name__
    if name in ("DaemonUnavailable", "ConnectionError", "ConnectionResetError", "BrokenPipeError",
                "IncompleteReadError"):
        return f"the daemon went away ({exc}); the next line reconnects, starting a daemon if none answers"
    if hasattr(exc, "type_name"):
        return format_error(exc)
    return f"internal error: {name}: {exc} (details in {log_location()})"


def log_location() -> str:
    for handler in logging.getLogger("sdrepl").handlers:
        if isinstance(handler, logging.FileHandler):
            return handler.baseFilename
    return "the REPL log"


async def run_interactive(client: Any, settings: Any, **kwargs: Any) -> int:
    """The interactive REPL on an open client; returns the exit status (0 after Ctrl-D or ``!quit``)."""
    return await InteractiveRepl(client, settings, **kwargs).run()
