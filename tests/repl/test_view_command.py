"""``!view`` and ``!train plot`` at the unit level: parsing, N, untrusted files, and what the REPL draws."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import preview_decoders as decode
import pytest
from PIL import Image
from prompt_toolkit.application import create_app_session
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from sdrepl.core.errors import UsageError
from sdrepl.repl import view_command
from sdrepl.repl.preview.detect import Terminal
from sdrepl.repl.preview.draw import pictures_of, protocol_for
from sdrepl.repl.preview.picture import PreviewError, Shown
from sdrepl.repl.preview.picture import decode as decode_picture
from sdrepl.repl.session import LineResult, Session
from sdrepl.repl.train_args import parse_train


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize(("args", "expected"), [("", 1), ("  ", 1), ("3", 3), ("pic.png", "pic.png"),
                                                 ("'my pic.png'", "my pic.png"), ("./3", "./3")])
def test_parse_view(args, expected):
    assert view_command.parse_view(args) == expected


def test_view_0_is_refused():
    with pytest.raises(UsageError, match="counts from 1"):
        view_command.parse_view("0")


@pytest.mark.parametrize(("args", "expected"), [("plot", {"sub": "plot", "name": None}),
                                                ("plot cat-toy", {"sub": "plot", "name": "cat-toy"}),
                                                ("plot <cat-toy>", {"sub": "plot", "name": "cat-toy"})])
def test_train_plot_parses(args, expected):
    assert parse_train(args) == expected


def test_train_plot_takes_no_options():
    with pytest.raises(UsageError, match="takes no options"):
        parse_train("plot --data x")


def test_output_paths_of_a_generation_and_a_grid():
    assert view_command.output_paths({"images": [{"path": "/o/1.png"}, {"path": "/o/2.png"}]}) == ["/o/1.png",
                                                                                                   "/o/2.png"]
    assert view_command.output_paths({"grid": {"path": "/o/g.png"}, "cells": [{"path": "/o/c.png"}]}) == ["/o/g.png"]
    assert view_command.output_paths({"embeddings": []}) == []


class Client:
    def __init__(self, replies):
        self.replies = replies

    async def request(self, type, **params):
        reply = self.replies[type]
        if isinstance(reply, Exception):
            raise reply
        return reply


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_view_n_follows_what_the_session_made(tmp_path):
    for i, size in enumerate([(16, 16), (24, 8)]):
        Image.new("RGB", size).save(tmp_path / f"{i}.png")
    session = Session(Client({}), cwd=tmp_path)
    session.outputs.extend([str(tmp_path / "0.png"), str(tmp_path / "1.png")])
    latest = run(session.execute("!view"))
    assert latest.ok and latest.result["view"] == {"path": str(tmp_path / "1.png"), "width": 24, "height": 8, "n": 1}
    assert [s.large for s in latest.pictures] == [True]
    assert run(session.execute("!view 2")).result["view"]["path"] == str(tmp_path / "0.png")
    missing = run(session.execute("!view 3"))
    assert not missing.ok and "only 2 picture(s)" in missing.error["message"]
    assert Session(Client({}), cwd=tmp_path).outputs.maxlen == view_command.REMEMBERED


def test_a_generation_is_remembered_for_view(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "g.png")

    class Gen(Client):
        def start(self, type, **params):
            future = asyncio.get_running_loop().create_future()
            future.set_result({"images": [{"path": str(tmp_path / "g.png"), "seed": 1}], "seed": 1, "tokens": {}})
            return 1, future

    session = Session(Gen({}), cwd=tmp_path)
    made = run(session.execute("a cat --steps 2"))
    assert made.ok and list(session.outputs) == [str(tmp_path / "g.png")]
    assert [s.source for s in pictures_of(made)] == [tmp_path / "g.png"]


def ihdr_png(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` in a few bytes (a decompression bomb's header)."""
    body = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(body)) + b"IHDR" + body + struct.pack(">I", zlib.crc32(b"IHDR" + body))
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def test_a_huge_declared_picture_is_refused_before_decoding():
    with pytest.raises(PreviewError, match="100000x100000 picture is larger than"):
        decode_picture(ihdr_png(100_000, 100_000), "bomb.png")


@pytest.mark.parametrize(("data", "message"), [(b"not a picture at all", "not a readable picture"),
                                               (b"\x89PNG\r\n\x1a\n\0\0", "not a readable picture"),
                                               (ihdr_png(4, 4), "cannot be decoded")])
def test_broken_pictures_are_clear_errors(data, message):
    with pytest.raises(PreviewError, match=message):
        decode_picture(data, "x.png")


def test_view_of_a_fifo_or_a_folder_does_not_block(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "dir.png").mkdir()
    session = Session(Client({}), cwd=tmp_path)
    for name in ("pipe.png", "dir.png"):
        done = run(session.execute(f"!view {name}"))
        assert not done.ok and done.error["type"] == "PreviewError" and name in done.error["message"]


def test_a_name_with_escapes_is_shown_escaped(tmp_path):
    session = Session(Client({}), cwd=tmp_path)
    done = run(session.execute("!view x\x1b]2;owned\x07.png"))
    assert not done.ok and "\x1b" not in done.error["message"] and "\\x1b" in done.error["message"]


def test_train_plot_decodes_the_daemons_bytes():
    data = png(Image.new("RGB", (80, 40), "white"))
    reply = {"name": "cat", "path": "/d/log/loss.png", "log_dir": "/d/log", "step": 10, "size": len(data),
             "data": base64.b64encode(data).decode()}
    done = run(Session(Client({"train_plot": reply})).execute("!train plot"))
    assert done.ok and done.result["plot"] == {"name": "cat", "path": "/d/log/loss.png", "log_dir": "/d/log",
                                               "step": 10, "width": 80, "height": 40}
    assert done.text == "loss plot of cat: /d/log/loss.png  (80x40, step 10)"
    assert done.pictures[0].large and done.pictures[0].source.size == (80, 40)


def test_train_plot_refuses_a_broken_reply():
    done = run(Session(Client({"train_plot": {"name": "cat", "data": "!!!"}})).execute("!train plot cat"))
    assert not done.ok and done.error["type"] == "PreviewError"


def line(kind="generate", ok=True, result=None, pictures=()):
    return LineResult(ok, kind, result or {}, None, "", pictures=pictures)


def test_pictures_of_a_result():
    gen = line(result={"images": [{"path": "/o/1.png"}, {"path": "/o/2.png"}]})
    assert [s.source for s in pictures_of(gen)] == [Path("/o/1.png"), Path("/o/2.png")]
    grid = line(kind="grid", result={"grid": {"path": "/o/g.png"}, "cells": [{"path": "/o/c.png"}]})
    assert [(s.source, s.large) for s in pictures_of(grid)] == [(Path("/o/g.png"), True)]
    assert pictures_of(line(ok=False, result={"images": [{"path": "/o/1.png"}]})) == ()
    assert pictures_of(line(kind="embeddings", result={"embeddings": []})) == ()
    attached = (Shown(b"x", large=True),)
    assert pictures_of(line(kind="view", pictures=attached)) == attached


@pytest.mark.parametrize(("mode", "detected", "expected"), [
    ("auto", "kitty", "kitty"), ("auto", None, None), ("off", "kitty", None), ("blocks", "kitty", "blocks"),
    ("sixel", None, "sixel")])
def test_protocol_for_a_mode(mode, detected, expected):
    terminal = Terminal(detected, True) if detected else None
    assert protocol_for(mode, terminal) == expected


# -- the interactive REPL's drawing -----------------------------------------------------------------

def shown_by_repl(result, preview: str, terminal=None) -> tuple[str, list[str]]:
    from sdrepl.repl.interactive import InteractiveRepl

    written, emitted = io.StringIO(), []
    with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
        session = SimpleNamespace(defaults=SimpleNamespace(preview=preview, negative=""))
        repl = InteractiveRepl(SimpleNamespace(add_event_listener=lambda cb: None), SimpleNamespace(model="tiny"),
                               session=session, input=pipe, output=DummyOutput())
        repl._terminal = written
        repl.terminal = terminal
        repl.emit = emitted.append
        repl.show_pictures(result)
    return written.getvalue(), emitted


def test_the_repl_draws_a_generation_in_half_blocks(tmp_path):
    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "a.png")
    text, emitted = shown_by_repl(line(result={"images": [{"path": str(tmp_path / "a.png")}]}), "blocks")
    cells = decode.blocks(text)
    assert emitted == [] and len(cells) == 2 and all(fg == ("rgb", 255, 0, 0) for row in cells for _, fg, _ in row)


def test_the_repl_puts_several_pictures_side_by_side(tmp_path):
    for i in range(2):
        Image.new("RGB", (4, 4), (0, 0, 255)).save(tmp_path / f"{i}.png")
    gen = line(result={"images": [{"path": str(tmp_path / f"{i}.png")} for i in range(2)]})
    text, _ = shown_by_repl(gen, "blocks")
    assert [len(row) for row in decode.blocks(text)] == [12, 12]  # 4 + a 4-pixel gap + 4


def test_the_repl_draws_nothing_when_off_or_undetected(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    gen = line(result={"images": [{"path": str(tmp_path / "a.png")}]})
    assert shown_by_repl(gen, "off", Terminal("kitty", True)) == ("", [])
    assert shown_by_repl(gen, "auto", Terminal(None, True)) == ("", [])
    text, _ = shown_by_repl(gen, "auto", Terminal("kitty", True))
    keys, payload = decode.kitty(text.rstrip("\r\n"))
    assert keys[0]["a"] == "T" and Image.open(io.BytesIO(payload)).size == (4, 4)


def test_a_picture_that_went_away_is_one_line(tmp_path):
    gen = line(result={"images": [{"path": str(tmp_path / "gone.png")}]})
    text, emitted = shown_by_repl(gen, "blocks")
    assert text == "" and len(emitted) == 1 and emitted[0].startswith("preview: ") and "gone.png" in emitted[0]


# -- completion -------------------------------------------------------------------------------------

def completed(text: str) -> list[str]:
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document

    from sdrepl.repl.completion import make_completer

    completer = make_completer(lambda: [{"name": "cat-toy", "vectors": 1}])
    return [c.text for c in completer.get_completions(Document(text), CompleteEvent(completion_requested=True))]


def test_completion_offers_preview_modes_plot_names_and_view():
    assert sorted(completed("!set preview ")) == ["auto", "blocks", "iterm", "kitty", "off", "sixel"]
    assert "plot" in completed("!train ")
    assert completed("!train plot ca") == ["cat-toy"]
    assert "view" in completed("!vi")
