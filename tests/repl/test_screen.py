"""Screen hygiene (issue 11, item 8) at the unit level: the toolbar follows the buffer, help wraps at words,
the queue position and the time spent queued are shown, typed keys are not echoed while a line runs."""

from __future__ import annotations

import asyncio
import os
import pty
import termios
from types import SimpleNamespace

from prompt_toolkit.application import create_app_session
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from sdrepl.repl import render
from sdrepl.repl.interactive import InteractiveRepl, wrap_text
from sdrepl.repl.keys import quiet_keyboard
from sdrepl.repl.state import ReplState
from sdrepl.repl.toolbar import toolbar_text


class Client:
    hello = {"state": "ready", "model": {"model": "tiny"}}

    def add_event_listener(self, callback) -> None:
        pass

    async def request(self, type: str, **params):
        if type == "tokens":
            return {"count": len(params["prompt"].split()), "limit": 75, "chunks": 1, "negative": {}}
        return {"embeddings": [], "skipped": []} if type == "embeddings" else {}


class Session:
    defaults = SimpleNamespace(negative="")

    def __init__(self, buffers: dict[str, str]) -> None:
        self.buffers = buffers

    async def execute_logical(self, logical, *, on_request_started=None):
        return SimpleNamespace(ok=True, kind="x", text="done", error=None, quit=logical.text == "!quit",
                               edit_buffer=self.buffers.get(logical.text))


def run_keys(keys, check, buffers=None):
    """Drive the REPL; ``check(repl, index)`` runs after key ``index`` has been handled."""
    async def main():
        with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
            repl = InteractiveRepl(Client(), SimpleNamespace(model="tiny"), session=Session(buffers or {}),
                                   history=None, input=pipe, output=DummyOutput())
            repl.emit = lambda text: None
            task = asyncio.ensure_future(repl.run())
            for index, key in enumerate(keys):
                await asyncio.sleep(0.1)
                pipe.send_text(key)
                await asyncio.sleep(0.15)
                check(repl, index)
            pipe.send_text("\x03")  # clear what the last key left in the buffer
            await asyncio.sleep(0.1)
            pipe.send_text("!quit\r")
            return await asyncio.wait_for(task, 5)

    return asyncio.run(main())


def test_the_toolbar_follows_the_buffer_after_enter_ctrl_c_and_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("SDREPL_HISTORY", str(tmp_path / "history"))
    seen = []
    keys = ["a red cat", "\r", "two words", "\x03", "!fetch x.png\r"]
    run_keys(keys, lambda repl, i: seen.append(toolbar_text(repl.state)),
             buffers={"!fetch x.png": "one two three four"})
    assert seen[0].startswith("tokens 3/75")
    assert not seen[1].startswith("tokens")  # after Enter: the empty buffer has no budget
    assert seen[2].startswith("tokens 2/75")
    assert not seen[3].startswith("tokens")  # after Ctrl-C cleared the line
    assert seen[4].startswith("tokens 4/75")  # the fetched line in the buffer is what is counted


def test_help_wraps_at_word_boundaries():
    text = "!train NAME --data DIR  " + " ".join(["trains an embedding on the resident model"] * 4)
    wrapped = wrap_text(text, 60).split("\n")
    assert all(len(line) <= 60 for line in wrapped) and len(wrapped) > 2
    words = text.split()
    assert " ".join(" ".join(wrapped).split()) == " ".join(words)  # no word cut in two
    assert all(line.startswith(" " * len("!train NAME --data DIR  ")) for line in wrapped[1:])


def test_the_reported_time_includes_the_wait():
    result = {"images": [{"path": "/o/1.png", "seed": 3}], "tokens": {"count": 1, "limit": 75},
              "elapsed_s": 0.8, "queued_s": 4.2, "total_s": 5.0}
    assert "5.0 s incl. 4.2 s queued" in render.generation(result)


def test_a_queued_request_shows_its_position():
    state = ReplState()
    state.apply_event({"event": "progress", "request": 3, "step": 0, "total": 20, "queued": 2})
    assert state.progress["queued"] == 2
    written = []
    repl = SimpleNamespace(state=SimpleNamespace(progress=state.progress, running_request=3), _waiting_train=False,
                           _write=written.append, _progress_shown=False, _progress_drawn_at=0.0)
    InteractiveRepl._draw_progress(repl)
    assert "queued (position 2)" in written[-1]


def test_keys_typed_while_a_line_runs_are_not_echoed_but_kept():
    parent, child = pty.openpty()
    try:
        with open(child, "rb", buffering=0, closefd=False) as tty:
            before = termios.tcgetattr(child)[3]
            assert before & termios.ECHO
            with quiet_keyboard(tty):
                assert not termios.tcgetattr(child)[3] & termios.ECHO
                assert termios.tcgetattr(child)[3] & termios.ISIG  # Ctrl-C still cancels
                os.write(parent, b"typed ahead")
            assert termios.tcgetattr(child)[3] == before
            attrs = termios.tcgetattr(child)
            attrs[3] &= ~termios.ICANON  # as the next prompt reads it: raw
            termios.tcsetattr(child, termios.TCSANOW, attrs)
            assert os.read(child, 100) == b"typed ahead"  # kept for the next prompt
    finally:
        os.close(parent)
        os.close(child)
