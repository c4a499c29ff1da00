"""The protocol module alone: the one line framer, the surrogate-safe encoder, decode's and Params' refusals."""

from __future__ import annotations

import json
import os

import pytest

from sdrepl.daemon import protocol
from sdrepl.daemon.protocol import BadRequest, LineFramer


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1000])
def test_lines_come_out_whole_whatever_the_chunks(chunk: int) -> None:
    stream = b'{"id":1}\n\n{"id":2,"type":"ping"}\n{"id":3}\n{"partial'
    framer, lines = LineFramer(), []
    for i in range(0, len(stream), chunk):
        lines += framer.feed(stream[i:i + chunk])
    assert lines == [b'{"id":1}', b"", b'{"id":2,"type":"ping"}', b'{"id":3}']


@pytest.mark.parametrize("chunk", [4, 16, 1000])
def test_an_overlong_line_is_reported_once_and_skipped(chunk: int) -> None:
    stream = b"x" * 40 + b"\nshort\n" + b"y" * 25 + b"\nok\n"
    framer, lines = LineFramer(limit=20), []
    for i in range(0, len(stream), chunk):
        lines += framer.feed(stream[i:i + chunk])
    assert lines == [None, b"short", None, b"ok"]


def test_a_non_utf8_file_name_survives_encoding() -> None:
    name = os.fsdecode(b"bad\xffname.pt")
    line = protocol.encode(protocol.event("embeddings", added=[name], note="café"))
    assert line.endswith(b"\n") and b"bad\\udcffname.pt" in line
    line.decode("ascii")  # ASCII-escaped as a whole, so valid UTF-8 everywhere
    back = json.loads(line)
    assert os.fsencode(back["added"][0]) == b"bad\xffname.pt" and back["note"] == "café"
    assert protocol.encode({"a": "café"}) == '{"a":"café"}\n'.encode()  # the usual case stays UTF-8


def test_decode_refuses_deep_nesting_as_bad_request() -> None:
    with pytest.raises(BadRequest, match="too deeply"):
        protocol.decode(b"[" * 100_000)


@pytest.mark.parametrize(("text", "index"), [("plain", None), ("a\ud800", 1), ("\udcff", 0), ("\U0001f600", None)])
def test_lone_surrogate(text: str, index: int | None) -> None:
    assert protocol.lone_surrogate(text) == index


def test_text_parameters_refuse_lone_surrogates_except_file_name_escapes() -> None:
    from sdrepl.daemon.params import Params

    p = Params({"prompt": "a \udcff cat", "name": "bad\udcffname", "odd": "x\ud800"}, "show")
    with pytest.raises(BadRequest, match=r"'prompt' holds a lone surrogate .* a byte of a file name that is not UTF-8"):
        p.text("prompt")
    assert p.text("name", file_name=True) == "bad\udcffname"
    with pytest.raises(BadRequest, match="'odd' holds a lone surrogate"):
        p.text("odd", file_name=True)  # not a file-name byte: no file name holds it
