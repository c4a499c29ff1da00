"""``!inspect`` parsing and rendering (no daemon)."""

from __future__ import annotations

import pytest

from sdrepl.core.errors import UsageError
from sdrepl.repl.inspect_command import parse_inspect, render_inspect


def test_parse_takes_a_name_log_and_top():
    assert parse_inspect("<cat> --log runs/cat --top 3") == {"name": "cat", "log": "runs/cat", "top": 3}
    assert parse_inspect("negatives/bad") == {"name": "negatives/bad"}


@pytest.mark.parametrize("args, says", [("", "missing NAME"), ("cat --top 0", "--top"), ("cat --frob", "--frob")])
def test_parse_errors_say_what_is_wrong(args, says):
    with pytest.raises(UsageError, match=says):
        parse_inspect(args)


def test_render_escapes_tokens_and_flags_huge_vectors():
    reply = {"name": "x", "path": "/e/x.pt", "vectors": [
        {"norm": 9.0, "percentile": 100.0, "huge": True, "nearest": [{"token": "a\x1b[2Jb", "cosine": 0.5}]}],
        "similarity": [[1.0]]}
    text = render_inspect(reply)
    assert "HUGE" in text and "\x1b" not in text and "vector 0: norm 9 (p100.0)" in text
