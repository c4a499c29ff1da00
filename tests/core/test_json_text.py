"""Non-finite numbers never reach a protocol line or a scripted ``--json`` line as ``NaN``/``Infinity``."""

from __future__ import annotations

import json
import math

import pytest

from sdrepl.core import json_text
from sdrepl.daemon.protocol import decode, encode
from sdrepl.repl.lines import LogicalLine
from sdrepl.repl.scripted import render_result
from sdrepl.repl.session import LineResult


def strict_loads(text: str):
    """A reader that refuses NaN/Infinity, as jq, JSON.parse and Go do."""
    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_become_null_at_any_depth(bad: float) -> None:
    value = {"loss": bad, "history": [1.0, bad, {"x": (bad, 2)}], "ok": 3.5}
    text = json_text.dumps(value)
    assert strict_loads(text) == {"loss": None, "history": [1.0, None, {"x": [None, 2]}], "ok": 3.5}


def test_finite_values_are_written_as_json_dumps_writes_them() -> None:
    value = {"a": [1, 2.5, "x", None, True], "b": {"c": -0.0}}
    assert json_text.dumps(value, separators=(",", ":")) == json.dumps(value, separators=(",", ":"))


def test_protocol_line_with_a_diverged_loss_is_strict_json() -> None:
    line = encode({"id": 1, "ok": True, "result": {"loss": math.nan, "name": "caf\udce9"}})
    message = strict_loads(line.decode("ascii"))
    assert message["result"]["loss"] is None
    assert decode(line)["result"]["name"] == "caf\udce9"  # the surrogate path still round-trips


def test_scripted_json_line_with_nan_is_strict_json() -> None:
    result = LineResult(ok=True, kind="train", result={"loss": math.nan, "lr": math.inf}, error=None, text="")
    logical = LogicalLine(number=3, source="!train status", text="!train status")
    [line] = render_result(logical, result, json_mode=True)
    assert strict_loads(line)["loss"] is None and strict_loads(line)["lr"] is None
