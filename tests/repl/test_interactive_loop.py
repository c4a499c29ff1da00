"""The interactive loop on a pipe input: keys, blocks, the edit buffer, Ctrl-C, and surviving its own bugs.

The session is a fake that records what it was asked to run, so these tests are about the loop only
(the session has its own tests); the output is collected from ``emit``.
"""

from __future__ import annotations

import asyncio
import os
import signal
from types import SimpleNamespace

import pytest
from prompt_toolkit.application import create_app_session
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from sdrepl.repl.interactive import InteractiveRepl
from sdrepl.repl.state import ReplState


class FakeClient:
    def __init__(self) -> None:
        self.hello = {"state": "ready", "model": {"model": "tiny", "device": "cpu", "dtype": "fp32"}}
        self.listeners = []

    def add_event_listener(self, callback) -> None:
        self.listeners.append(callback)

    def send(self, event: dict) -> None:
        for listener in self.listeners:
            listener({"type": "event", **event})

    async def request(self, type: str, **params):
        if type == "embeddings":
            return {"embeddings": [{"name": "bad-hands-5", "vectors": 2, "path": "/e/bad-hands-5.pt"}],
                    "skipped": [], "version": 1}
        if type == "status":
            return {"state": "ready", "model": self.hello["model"], "queue": {"pending": 0, "running": None}}
        if type == "tokens":
            return {"count": 1, "limit": 75, "chunks": 1, "embeddings": [], "bare": [], "negative": {}}
        raise AssertionError(type)


def result(text="", ok=True, **extra):
    return SimpleNamespace(ok=ok, kind="x", result={}, error=None if ok else {"type": "UsageError", "message": text},
                           text=text, edit_buffer=extra.get("edit_buffer"), quit=extra.get("quit", False))


class FakeSession:
    """Runs lines by a script of reactions: a LineResult, an exception to raise, or 'hang' (until cancelled)."""

    def __init__(self, reactions: dict | None = None) -> None:
        self.reactions = reactions or {}
        self.ran: list[str] = []
        self.defaults = SimpleNamespace(negative="")
        self.hanging = asyncio.Event()

    async def execute_logical(self, logical, *, on_request_started=None):
        self.ran.append(logical.text)
        reaction = self.reactions.get(logical.text, result(f"ran {logical.text}"))
        if logical.text.startswith("!quit"):
            return result("", quit=True)
        if reaction == "hang":
            on_request_started(7)
            self.hanging.set()
            await asyncio.Event().wait()
        if isinstance(reaction, BaseException):
            raise reaction
        return reaction


def drive(keys: list, session: FakeSession, client: FakeClient | None = None) -> tuple[int, list[str], FakeSession]:
    """Run the REPL, sending each item of ``keys`` once the prompt waits for input (callables are awaited)."""
    client = client or FakeClient()
    printed: list[str] = []

    async def main() -> int:
        with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
            repl = InteractiveRepl(client, SimpleNamespace(model="tiny"), session=session,
                                   history=None, input=pipe, output=DummyOutput())
            repl.emit = printed.append
            run = asyncio.ensure_future(repl.run())
            for item in keys:
                await asyncio.sleep(0.05)
                if callable(item):
                    await item(repl)
                else:
                    pipe.send_text(item)
            return await asyncio.wait_for(run, 5)

    return asyncio.run(main()), printed, session


@pytest.fixture(autouse=True)
def history_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SDREPL_HISTORY", str(tmp_path / "history"))


def test_lines_run_and_ctrl_d_leaves():
    status, printed, session = drive(["a cat\r", "\x04"], FakeSession())
    assert status == 0 and session.ran == ["a cat"] and "ran a cat" in printed
    assert printed[0].startswith("sdrepl · model tiny (cpu fp32) · 1 embeddings")


def test_ctrl_c_clears_the_line_and_keeps_the_repl():
    status, _, session = drive(["half typed", "\x03", "!quit\r"], FakeSession())
    assert status == 0 and session.ran == ["!quit"]


def test_ctrl_d_on_a_non_empty_line_does_not_leave():
    _, _, session = drive(["ab", "\x02\x04", "\r", "!quit\r"], FakeSession())  # Ctrl-B, Ctrl-D deletes "b"
    assert session.ran == ["a", "!quit"]


def test_a_triple_quote_block_is_one_line():
    keys = ['"""\r', "a cat\r", "# not a comment here\r", '""" --steps 2\r', "!quit\r"]
    _, _, session = drive(keys, FakeSession())
    assert session.ran == ["a cat\n# not a comment here\n--steps 2", "!quit"]


def test_ctrl_c_on_an_empty_line_abandons_a_block():
    _, printed, session = drive(['"""\r', "a cat\r", "\x03", "a dog\r", "!quit\r"], FakeSession())
    assert session.ran == ["a dog", "!quit"] and "(block abandoned)" in printed


def test_an_edit_buffer_prefills_the_next_prompt():
    session = FakeSession({"!fetch pic.png": result("a cat --steps 3", edit_buffer="a cat --steps 3")})
    _, _, session = drive(["!fetch pic.png\r", " --seed 1\r", "!quit\r"], session)
    assert session.ran == ["!fetch pic.png", "a cat --steps 3 --seed 1", "!quit"]


def test_errors_are_one_line_and_the_loop_goes_on():
    session = FakeSession({"bad": result("error: UsageError: nope", ok=False), "bug": RuntimeError("oops")})
    status, printed, session = drive(["bad\r", "bug\r", "a cat\r", "!quit\r"], session)
    assert status == 0 and session.ran == ["bad", "bug", "a cat", "!quit"]
    assert "error: UsageError: nope" in printed
    assert any(p.startswith("internal error: RuntimeError: oops (details in") for p in printed)


def test_ctrl_c_during_a_line_cancels_it_and_keeps_the_repl():
    async def interrupt(repl):
        await asyncio.wait_for(repl.session.hanging.wait(), 5)
        assert repl.state.running_request == 7
        os.kill(os.getpid(), signal.SIGINT)

    session = FakeSession({"a slow cat": "hang"})
    status, printed, session = drive(["a slow cat\r", interrupt, "a cat\r", "!quit\r"], session)
    assert status == 0 and "cancelled" in printed and session.ran == ["a slow cat", "a cat", "!quit"]


def test_library_news_is_printed_above_the_prompt():
    client = FakeClient()

    async def news(repl):
        client.send({"event": "embeddings", "version": 2, "change": {
            "added": ["eyeliner2"], "skipped": [{"path": "/e/sdxl.safetensors", "reason": "SDXL, model is SD 1.x"}]}})

    _, printed, _ = drive([news, "!quit\r"], FakeSession(), client)
    assert "embeddings new: <eyeliner2>" in printed
    assert "skipped sdxl.safetensors: SDXL, model is SD 1.x" in printed


def test_progress_events_reach_the_state_during_a_line():
    state = ReplState()
    state.apply_event({"event": "progress", "request": 3, "step": 4, "total": 20})
    assert state.progress == {"request": 3, "step": 4, "total": 20}


def test_ctrl_r_searches_the_saved_history(tmp_path):
    (tmp_path / "history").write_text("\n# 2024-01-01\n+a red cat --steps 3\n\n# 2024-01-01\n+a blue dog\n")
    _, _, session = drive(["\x12red", "\r", "\r", "!quit\r"], FakeSession())
    assert session.ran == ["a red cat --steps 3", "!quit"]


def test_lines_are_saved_to_the_history_file(tmp_path):
    drive(["a green frog\r", "!quit\r"], FakeSession())
    assert "+a green frog" in (tmp_path / "history").read_text()
