"""A1111's prompt language from a scripted session against a real daemon on ``tiny``: schedules in
``!tokens``, AND and editing in generations, emphasis settings in the PNG metadata, normalised counts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sdrepl.core.pnginfo import parse_parameters, read_png_parameters

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SCRIPT = '''\
!set size 32x32
!set steps 4
!tokens a [fantasy:cyberpunk:16] landscape --steps 20
!tokens 1girl，solo，smile
!tokens a cat AND a dog:0.5
a [red:blue:0.5] fox AND a hat:0.7 --seed 5
!set emphasis No norm
!set comma_padding_backtrack 0
a (fox:1.3), [cow|horse] --seed 6
a (fox:1.2.3)
'''


def test_a_script_uses_the_whole_prompt_language(live_daemon):
    done = subprocess.run([sys.executable, "-m", "sdrepl", *live_daemon["options"], "--json"], input=SCRIPT,
                          text=True, capture_output=True, cwd=live_daemon["root"], env=live_daemon["env"],
                          timeout=240)
    by_line = {o["line"]: o for o in map(json.loads, done.stdout.splitlines())}
    assert [n for n, o in by_line.items() if not o["ok"]] == [10], done.stdout + done.stderr

    edit = by_line[3]["tokens"]
    assert edit["steps"] == 20 and edit["changes"] is True
    assert [(s["text"], s["steps"]) for s in edit["schedule"]] == [
        ("a fantasy landscape", [[1, 17]]), ("a cyberpunk landscape", [[18, 20]])]
    assert by_line[4]["tokens"]["count"] == 6  # full-width commas are commas
    assert [(p["text"], p["weight"]) for p in by_line[5]["tokens"]["parts"]] == [("a cat", 1.0), (" a dog", 0.5)]

    first = parse_parameters(read_png_parameters(by_line[6]["images"][0]["path"]))
    assert first["prompt"] == "a [red:blue:0.5] fox AND a hat:0.7" and first["steps"] == 4
    assert "Emphasis" not in first["extra"]
    assert [p["weight"] for p in by_line[6]["tokens"]["parts"]] == [1.0, 0.7]

    second = parse_parameters(read_png_parameters(by_line[9]["images"][0]["path"]))
    assert second["extra"]["Emphasis"] == "No norm"
    assert second["extra"]["Comma padding backtrack"] == "0"

    error = by_line[10]["error"]
    assert error["type"] == "PromptError" and "'1.2.3' is not a number" in error["message"]


def test_tokens_text_lists_the_scheduled_prompts(live_daemon):
    done = subprocess.run([sys.executable, "-m", "sdrepl", *live_daemon["options"]],
                          input="!tokens [cow|horse] in a field --steps 4\n", text=True, capture_output=True,
                          cwd=live_daemon["root"], env=live_daemon["env"], timeout=120)
    lines = done.stdout.splitlines()
    assert lines[0].startswith("tokens 4/75"), done.stdout + done.stderr
    assert "changes during sampling (4 steps)" in lines[1]
    assert lines[2:4] == ["  steps 1-2, 4: cow in a field  (4/75)", "  steps 3: horse in a field  (4/75)"]
