"""Key bindings of the interactive REPL, and what Ctrl-C means while a line runs.

At the prompt (prompt_toolkit active): Ctrl-C clears the line (or abandons an open ``\"\"\"`` block when
the line is already empty; on an empty line outside a block it says how to leave), Ctrl-D on an empty
line leaves, Ctrl-R is prompt_toolkit's reverse history search (its default Emacs binding). While a line executes prompt_toolkit is not reading keys; the
terminal delivers Ctrl-C as SIGINT and :func:`sigint_handler` turns it into a callback on the loop
(cancel the running generation) instead of a KeyboardInterrupt raised at a random point.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

from prompt_toolkit.application import run_in_terminal
from prompt_toolkit.filters import Condition, is_searching
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.keys import Keys

from sdrepl.repl.paste import paste_entry

log = logging.getLogger("sdrepl.repl")


#: Ctrl-C on an empty line: what a user pressing it to leave (as in a shell's REPL) needs to know.
LEAVE_HINT = "(Ctrl-D or !quit to leave; the daemon keeps running)"


class AbandonBlock(Exception):
    """Ctrl-C on an empty line inside a ``\"\"\"`` block: the loop drops the lines gathered so far."""


def make_key_bindings(in_block: Callable[[], bool] = lambda: False) -> KeyBindings:
    """The REPL's bindings; ``in_block`` says whether a ``\"\"\"`` block is open (read at key time)."""
    bindings = KeyBindings()
    buffer_empty = Condition(lambda: _app_buffer_text() == "")

    @bindings.add("c-c", filter=~is_searching)
    def _clear_line(event: KeyPressEvent) -> None:
        """Ctrl-C at the prompt: clear the line; on an empty line in a block, abandon the block."""
        buffer = event.current_buffer
        if buffer.text:
            buffer.reset()
            buffer.on_text_changed.fire()  # reset() is silent: the toolbar must learn the line is gone
        elif in_block():
            event.app.exit(exception=AbandonBlock())
        else:
            run_in_terminal(lambda: print(LEAVE_HINT))

    @bindings.add(Keys.BracketedPaste)
    def _paste(event: KeyPressEvent) -> None:
        """A paste is one entry: an A1111 parameters block becomes one generation line (see paste.py)."""
        pasted = paste_entry(event.data)
        event.current_buffer.insert_text(pasted.text)
        if pasted.notice:
            notice = pasted.notice
            run_in_terminal(lambda: print(notice))

    @bindings.add("c-d", filter=buffer_empty & ~is_searching)
    def _leave(event: KeyPressEvent) -> None:
        """Ctrl-D on an empty line: leave the REPL (the daemon keeps running)."""
        event.app.exit(exception=EOFError())

    return bindings


def _app_buffer_text() -> str:
    from prompt_toolkit.application import get_app

    return get_app().current_buffer.text


@contextlib.contextmanager
def sigint_handler(on_interrupt: Callable[[], None]) -> Iterator[None]:
    """While inside, SIGINT (Ctrl-C in a cooked terminal) calls ``on_interrupt`` on the running loop.

    Without it, Ctrl-C during a generation would raise KeyboardInterrupt wherever the loop happens to be,
    killing the REPL. Where signal handlers cannot be installed (Windows, a non-main thread) this does
    nothing and Ctrl-C behaves as Python's default.
    """
    loop = asyncio.get_running_loop()

    def safe() -> None:
        try:
            on_interrupt()
        except Exception:
            log.exception("Ctrl-C handler failed")

    try:
        loop.add_signal_handler(signal.SIGINT, safe)
    except (NotImplementedError, RuntimeError, ValueError):
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)


@contextlib.contextmanager
def quiet_keyboard(stream: Any = None) -> Iterator[None]:
    """While a line runs, keys typed are not echoed (they would garble the progress line), but kept.

    Only ``ECHO`` is turned off: the terminal still holds what is typed, and the next prompt (which reads
    the terminal raw) finds it in its buffer, as type-ahead in a shell; a late cursor-position report is
    read there too instead of being echoed as ``^[[12;1R``. ``ISIG`` stays, so Ctrl-C still cancels.
    Not a terminal (tests, pipes): nothing to do.
    """
    stream = sys.stdin if stream is None else stream
    try:
        import termios

        fd = stream.fileno()
        if not os.isatty(fd):
            raise OSError("not a terminal")
        saved = termios.tcgetattr(fd)
    except (ImportError, OSError, ValueError, AttributeError):
        yield
        return
    quiet = list(saved)
    quiet[3] = saved[3] & ~(termios.ECHO | termios.ECHONL)
    try:
        termios.tcsetattr(fd, termios.TCSANOW, quiet)  # TCSANOW, not TCSAFLUSH: type-ahead is kept
    except termios.error:
        yield
        return
    try:
        yield
    finally:
        try:
            termios.tcsetattr(fd, termios.TCSANOW, saved)
        except termios.error:
            log.warning("could not restore the terminal's echo", exc_info=True)
