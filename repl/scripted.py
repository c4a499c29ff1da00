"""Scripted sessions: REPL lines from a pipe or file, one result per line, flushed before the next read.

The contract (interface.md, "Scripted sessions") makes a session drivable by another program through
pipes: write a line, read its result. So input is pulled one physical line at a time (in a helper
thread, because reading a pipe blocks) and only after the previous result has been written and flushed;
nothing is read ahead.

Output choices, fixed here:

- ``--json``: exactly one JSON object per executed line on stdout (``{"line", "input", "ok", ...}``),
  ASCII-escaped so any reader can decode it whatever the locale.
- without ``--json``: each result's human text on stdout; a failing line writes one line
  ``error: line N: <Type>: <message>`` to **stdout** as well, so a driver reading stdout gets an answer
  for every line it wrote, in order. A line with nothing to say (``!quit``) writes nothing.
- stderr carries only progress: model loading, training steps (at most one line a second, plus every
  state change), and generation steps when a picture takes longer than two seconds. No colours, no
  carriage-return spinners, ever.
- exit status: 0 when every line succeeded, 1 when one failed (all lines still run unless
  ``fail_fast``); a line that fails because the daemon went away is such a failure, and the next line
  reconnects (starting a daemon as at start-up); 2 when no daemon can be reached or started then.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from sdrepl.core import json_text
from sdrepl.core.display import visible
from sdrepl.core.errors import SdreplError
from sdrepl.repl import render
from sdrepl.repl.lines import LineAssembler, LogicalLine
from sdrepl.repl.session import LineResult, Session

log = logging.getLogger("sdrepl.repl")
#: Error types after which no later line can succeed: stop and exit 2.
FATAL_ERRORS = frozenset({"DaemonUnavailable", "ConnectionLost"})
EXIT_OK, EXIT_FAILED, EXIT_UNREACHABLE = 0, 1, 2


class LineReader:
    """Pulls lines from an iterable in a daemon thread, one per :meth:`next` call, never ahead.

    A daemon thread (not the loop's default executor) so that a session ending while the thread still
    waits on an idle terminal does not keep the process alive.
    """

    def __init__(self, lines: Iterable[str]) -> None:
        self._lines = iter(lines)
        self._requests: queue.SimpleQueue[asyncio.Future | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def next(self) -> str | None:
        """The next line, or None at end of input."""
        loop = asyncio.get_running_loop()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, args=(loop,), name="sdrepl-stdin", daemon=True)
            self._thread.start()
        future = loop.create_future()
        self._requests.put(future)
        return await future

    def close(self) -> None:
        self._requests.put(None)

    def _work(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            future = self._requests.get()
            if future is None:
                return
            try:
                line = next(self._lines, None)
                outcome = (future.set_result, line)
            except BaseException as exc:  # handed to the session's task, which reports it
                outcome = (future.set_exception, exc)
            try:
                loop.call_soon_threadsafe(_settle, future, *outcome)
            except RuntimeError:  # the loop is gone: nobody is waiting any more
                return


def _settle(future: asyncio.Future, setter: Any, value: Any) -> None:
    if not future.done():
        setter(value)


def _write(stream: IO[str], text: str) -> None:
    """Write a line and flush; a stream that cannot encode a character gets a backslash escape instead.

    No control character reaches the stream raw (``core.display``); JSON lines are ASCII already."""
    text = visible(text, newlines=True)
    try:
        stream.write(text + "\n")
    except UnicodeEncodeError:
        stream.write(text.encode("ascii", "backslashreplace").decode("ascii") + "\n")
    stream.flush()


class ProgressPrinter:
    """Daemon events -> short progress lines on stderr (throttled; see the module docstring)."""

    def __init__(self, err: IO[str], *, train_every: float = 1.0, generate_after: float = 2.0) -> None:
        self.err = err
        self.train_every = train_every
        self.generate_after = generate_after
        self._train_state: str | None = None
        self._train_last = 0.0
        self._generate: dict[Any, list[float | None]] = {}

    def on_event(self, event: dict[str, Any]) -> None:
        try:
            self._on_event(event)
        except Exception:  # progress is a courtesy; it must never break the session
            log.debug("could not show event %r", event, exc_info=True)

    def _on_event(self, event: dict[str, Any]) -> None:
        kind, now = event.get("event"), time.monotonic()
        if kind == "train":
            job = event.get("job") or {}
            changed = job.get("state") != self._train_state
            if changed or now - self._train_last >= self.train_every:
                self._train_state, self._train_last = job.get("state"), now
                _write(self.err, render.job(job))
        elif kind == "progress":
            request, step, total = event.get("request"), event.get("step"), event.get("total")
            if event.get("queued") and not step:
                _write(self.err, f"generating: queued (position {event['queued']})")
                return
            times = self._generate.setdefault(request, [now, None])  # [first event, last line written]
            if now - times[0] >= self.generate_after and (times[1] is None or now - times[1] >= self.generate_after):
                times[1] = now
                _write(self.err, f"generating: step {step}/{total}")
            if step is not None and step == total:
                self._generate.pop(request, None)
        elif kind == "model":
            model = event.get("model") or {}
            name = f" {model.get('model')}" if isinstance(model, dict) and model.get("model") else ""
            message = f": {visible(event['message'])}" if event.get("message") else ""
            _write(self.err, f"model{name}: {event.get('state', '?')}{message}")
        elif kind == "shutdown":
            _write(self.err, f"daemon stopping: {event.get('reason') or 'no reason given'}")


def render_result(logical: LogicalLine, result: LineResult, *, json_mode: bool) -> list[str]:
    """The stdout lines for one executed line (see the module docstring for the format)."""
    if json_mode:
        return [json_text.dumps(result.to_json(logical.number, logical.source), default=str)]
    lines = []
    if result.ok or (result.text and not result.text.startswith("error: ")):
        lines += [result.text] if result.text else []
    if not result.ok and result.error is not None:
        lines.append(f"error: line {logical.number}: {visible(result.error['type'])}: "
                     f"{visible(result.error['message'])}")
    return lines


def _write_result(out: IO[str], logical: LogicalLine, result: LineResult, json_mode: bool) -> None:
    for text in render_result(logical, result, json_mode=json_mode):
        _write(out, text)


def _silence(out: IO[str]) -> None:
    """Point a closed pipe's descriptor at /dev/null so the exit-time flush does not complain (Python docs)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass


async def run_script(
    client: Any, lines: Iterable[str], *, json_mode: bool, fail_fast: bool,
    out: IO[str] | None = None, err: IO[str] | None = None, session: Session | None = None,
    cwd: Path | None = None,
) -> int:
    """Run REPL lines as they arrive; return the exit status (0 all ok, 1 a line failed, 2 no daemon).

    ``lines`` is read lazily (pass ``sys.stdin`` itself, not its contents). ``session`` lets a caller
    reuse one (with its defaults); otherwise a fresh one anchored at ``cwd`` is made.
    """
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    session = session if session is not None else Session(client, cwd=cwd)
    progress = ProgressPrinter(err)
    listening = hasattr(client, "add_event_listener")
    if listening:
        client.add_event_listener(progress.on_event)
    reader = LineReader(lines)
    assembler = LineAssembler()
    reconnect = getattr(client, "ensure", None)  # a repl.connection.Connection: lines after a lost daemon go on
    status = EXIT_OK
    try:
        while True:
            try:
                physical = await reader.next()
            except UnicodeDecodeError as exc:
                number = assembler.next_number
                logical = LogicalLine(number, "", "", error=f"the input is not UTF-8 text from about line {number} "
                                                            f"on ({exc.reason}); save the script as UTF-8")
                _write_result(out, logical, await session.execute_logical(logical), json_mode)
                return EXIT_FAILED
            logical = assembler.finish() if physical is None else assembler.feed(physical)
            if logical is None:
                if physical is None:
                    break
                continue
            if reconnect is not None:  # the daemon went away after an earlier line: find or start one
                try:
                    await reconnect(auto_start=True)
                except SdreplError as exc:
                    error = {"type": "DaemonUnavailable", "message": f"no daemon can be reached or started: {exc}"}
                    failed = LineResult(False, "daemon", {}, error, f"error: DaemonUnavailable: {error['message']}")
                    _write_result(out, logical, failed, json_mode)
                    return EXIT_UNREACHABLE
            result = await session.execute_logical(logical)
            _write_result(out, logical, result, json_mode)
            if not result.ok:
                status = EXIT_FAILED
                if result.error and result.error.get("type") in FATAL_ERRORS and reconnect is None:
                    return EXIT_UNREACHABLE
                if fail_fast:
                    break
            if result.quit or physical is None:
                break
    except BrokenPipeError:  # whoever read our stdout has gone (`sdrepl < script | head -1`): stop quietly
        _silence(out)
        return EXIT_FAILED
    finally:
        reader.close()
        remove = getattr(client, "remove_event_listener", None)
        if listening and remove is not None:
            try:
                remove(progress.on_event)
            except Exception:
                pass
    return status
