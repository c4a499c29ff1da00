"""Scripted sessions end to end: ``python -m sdrepl`` on a pipe, against a real daemon on ``tiny``."""

from __future__ import annotations

import json
import select
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SCRIPT = '''\
# an end-to-end scripted session (20 lines)
!set steps 2
!set size 64x64

a red fox
!tokens a photo of <bad-hands-5>
# the next line names an embedding that does not exist
a <nosuch> cat
!embeddings
a blue fox --seed 42 --steps 2 --size 64x64
"""
a portrait,
oil painting
""" --seed 7
!set seed
EasyNegative, a dog --n 2
!show bad-hands-5
!tokens a cat --neg EasyNegative
!help tokens
!status
'''


def sdrepl(live: dict, *args: str, stdin: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdrepl", *live["options"], *args], input=stdin, text=True,
                          capture_output=True, cwd=live["root"], env=live["env"], timeout=timeout)


def test_a_twenty_line_script_gives_one_json_object_per_executed_line(live_daemon):
    assert len(SCRIPT.splitlines()) == 20
    done = sdrepl(live_daemon, "--json", stdin=SCRIPT)
    objects = [json.loads(line) for line in done.stdout.splitlines()]
    assert [o["line"] for o in objects] == [2, 3, 5, 6, 8, 9, 10, 11, 15, 16, 17, 18, 19, 20], done.stderr
    assert [o["line"] for o in objects if not o["ok"]] == [8], done.stdout
    assert done.returncode == 1

    by_line = {o["line"]: o for o in objects}
    assert by_line[8]["input"] == "a <nosuch> cat"
    assert by_line[8]["error"]["type"] == "PromptError" and "nosuch" in by_line[8]["error"]["message"]
    for number, count in ((5, 1), (10, 1), (11, 1), (16, 2)):
        images = by_line[number]["images"]
        assert len(images) == count and all(Path(i["path"]).is_file() for i in images), number
        assert by_line[number]["tokens"]["limit"] == 75 and "elapsed_s" in by_line[number]
    assert by_line[10]["images"][0]["seed"] == 42 and by_line[11]["images"][0]["seed"] == 7
    assert [i["seed"] for i in by_line[16]["images"]][1] == by_line[16]["images"][0]["seed"] + 1
    assert by_line[11]["input"] == '"""\na portrait,\noil painting\n""" --seed 7'
    assert by_line[6]["tokens"]["count"] == 5 and by_line[6]["tokens"]["embeddings"] == ["bad-hands-5"]
    assert by_line[18]["tokens"]["negative"]["count"] == 8
    names = {e["name"] for e in by_line[9]["embeddings"]}
    assert names == {"bad-hands-5", "EasyNegative", "bad-prompt"}
    assert isinstance(by_line[9]["skipped"], list)
    assert by_line[15]["defaults"] == {"seed": None} and by_line[2]["set"] == {"steps": 2}
    assert by_line[17]["embedding"]["vectors"] == 2
    assert by_line[19]["command"] == "tokens"
    assert by_line[20]["status"]["model"]["model"] == "tiny"
    assert "\x1b" not in done.stdout


def test_a_piped_line_writes_a_png(live_daemon):
    before = set(live_daemon["outputs"].rglob("*.png"))
    done = sdrepl(live_daemon, stdin="a red fox --steps 2\n")
    assert done.returncode == 0, done.stderr
    made = set(live_daemon["outputs"].rglob("*.png")) - before
    assert len(made) == 1
    (line,) = done.stdout.splitlines()
    path = line.split("  (")[0]
    assert (live_daemon["root"] / path).resolve() == made.pop().resolve()
    assert "tokens" in line and "seed" in line


def test_another_program_can_drive_a_session_line_by_line(live_daemon):
    proc = subprocess.Popen([sys.executable, "-m", "sdrepl", *live_daemon["options"], "--json"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=live_daemon["root"], env=live_daemon["env"], bufsize=1)
    try:
        for number, line in enumerate(["!tokens a fox", "a fox --steps 2 --size 64x64", "!set n 2"], start=1):
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], 120)
            assert ready, f"no answer to line {number} while stdin stays open: results are not flushed per line"
            answer = json.loads(proc.stdout.readline())
            assert (answer["line"], answer["ok"]) == (number, True)
        proc.stdin.close()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_daemon_serving_another_model_is_named(live_daemon):
    """Asking for tiny-sd2 from a daemon that serves tiny says so (on stderr) instead of silently differing."""
    options = list(live_daemon["options"])
    options[options.index("--model") + 1] = "tiny-sd2"
    done = subprocess.run([sys.executable, "-m", "sdrepl", *options], input="!tokens cat\n", text=True,
                          capture_output=True, cwd=live_daemon["root"], env=live_daemon["env"], timeout=120)
    assert done.returncode == 0, done.stderr
    assert "serves model tiny, not tiny-sd2" in done.stderr and "sdrepl stop" in done.stderr
    assert done.stdout.startswith("tokens 1/75")
