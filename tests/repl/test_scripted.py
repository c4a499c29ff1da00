"""Scripted sessions against a fake daemon: JSON shapes, line numbers, exit statuses, flushing per line."""

from __future__ import annotations

import asyncio
import io
import json
import os
import select
import threading

import pytest

from sdrepl.daemon.client import DaemonUnavailable, RemoteError
from sdrepl.repl.scripted import ProgressPrinter, run_script

SCRIPT = '''# a scripted session
!set steps 2

a red fox --size 64x64
"""
a long prompt
over lines
""" --seed 3
!tokens a photo of <bad-hands-5>
a <nosuch> cat
!embeddings
'''


def script(client, text, *, json_mode=True, fail_fast=False):
    out, err = io.StringIO(), io.StringIO()
    status = asyncio.run(run_script(client, io.StringIO(text), json_mode=json_mode, fail_fast=fail_fast,
                                    out=out, err=err))
    return status, out.getvalue(), err.getvalue()


def nosuch_fails(params):
    if "<nosuch>" in params["prompt"]:
        raise RemoteError("PromptError", "unknown embedding <nosuch>")
    return {"images": [{"path": "/o/1.png", "seed": 1}], "tokens": {"count": 3, "limit": 75}, "elapsed_s": 0.1}


def test_json_one_object_per_executed_line_in_order(make_fake):
    status, out, _ = script(make_fake({"generate": nosuch_fails}), SCRIPT)
    objects = [json.loads(line) for line in out.splitlines()]
    assert [(o["line"], o["ok"]) for o in objects] == [(2, True), (4, True), (5, True), (9, True), (10, False),
                                                       (11, True)]
    assert objects[0]["input"] == "!set steps 2" and objects[0]["set"] == {"steps": 2}
    assert objects[1] == {"line": 4, "input": "a red fox --size 64x64", "ok": True,
                          "images": [{"path": "/o/1.png", "seed": 1}], "tokens": {"count": 3, "limit": 75},
                          "elapsed_s": 0.1}
    assert objects[2]["input"] == '"""\na long prompt\nover lines\n""" --seed 3'
    assert objects[3]["tokens"]["count"] == 5
    assert objects[4] == {"line": 10, "input": "a <nosuch> cat", "ok": False,
                          "error": {"type": "PromptError", "message": "unknown embedding <nosuch>"}}
    assert set(objects[5]) >= {"embeddings", "skipped"}
    assert status == 1


def test_all_good_lines_exit_zero(fake):
    status, out, _ = script(fake, "a cat\n!tokens a cat\n")
    assert status == 0 and len(out.splitlines()) == 2


def test_fail_fast_stops_at_the_first_failure(make_fake):
    fake = make_fake({"generate": nosuch_fails})
    status, out, _ = script(fake, "a <nosuch> cat\na cat\n", fail_fast=True)
    assert status == 1 and len(out.splitlines()) == 1 and fake.types() == ["generate"]


def test_quit_ends_the_script(fake):
    status, out, _ = script(fake, "a cat\n!quit\na dog\n")
    objects = [json.loads(line) for line in out.splitlines()]
    assert status == 0 and [o["input"] for o in objects] == ["a cat", "!quit"]
    assert len(fake.calls) == 1


def test_lost_daemon_exits_two(make_fake):
    fake = make_fake({"generate": DaemonUnavailable("daemon went away (closed)")})
    status, out, _ = script(fake, "a cat\na dog\n")
    assert status == 2 and len(out.splitlines()) == 1


def test_unclosed_block_fails_its_line(fake):
    status, out, _ = script(fake, 'a cat\n"""\nnever closed\n')
    last = json.loads(out.splitlines()[-1])
    assert status == 1 and last["line"] == 2 and last["error"]["type"] == "UsageError"


def test_human_mode_writes_results_and_errors_to_stdout(make_fake):
    status, out, err = script(make_fake({"generate": nosuch_fails}), "a cat\na <nosuch> cat\n!set n 2\n!quit\n",
                              json_mode=False)
    assert out.splitlines() == [
        "/o/1.png  (seed 1, 3/75 tokens, 0.1 s)",
        "error: line 2: PromptError: unknown embedding <nosuch>",
        "n = 2",
    ]
    assert err == "" and "\x1b" not in out and status == 1


def test_fetch_prints_the_command(fake, tmp_path):
    from PIL import Image

    from sdrepl.core.pnginfo import build_parameters, png_text_chunks

    path = tmp_path / "p.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=png_text_chunks(build_parameters(
        prompt="a fox", steps=2, sampler="Euler a", cfg=7, seed=5, width=64, height=64)))
    _, out, _ = script(fake, f"!fetch {path}\n")
    assert json.loads(out)["command"] == "a fox --steps 2 --cfg 7 --seed 5 --size 64x64 --sampler Euler a"


def test_training_progress_goes_to_stderr(fake):
    def train(params):
        for step in (1, 2, 3):
            fake.emit({"type": "event", "event": "train",
                       "job": {"name": "cat", "state": "running", "step": step, "total": 3, "loss": 0.5}})
        fake.emit({"type": "event", "event": "train", "job": {"name": "cat", "state": "done", "step": 3, "total": 3}})
        return {"job": {"state": "done"}, "embedding": {"name": "cat", "path": "/e/cat.safetensors", "steps": 3,
                                                        "final_loss": 0.5}}

    fake.replies["train"] = train
    fake.replies["train_status"] = {"job": None}
    status, out, err = script(fake, "!train cat --resume --wait\n")
    assert status == 0 and json.loads(out)["embedding"]["steps"] == 3
    lines = err.splitlines()
    assert lines[0].startswith("training cat: running") and lines[-1].startswith("training cat: done")
    assert len(lines) == 2  # throttled: one line a second, plus every state change


def test_progress_printer_shows_only_slow_generations():
    err = io.StringIO()
    printer = ProgressPrinter(err, generate_after=0.0)
    printer.on_event({"event": "progress", "request": 1, "step": 1, "total": 2})
    printer.on_event({"event": "model", "state": "loading", "model": {"model": "tiny"}})
    assert err.getvalue().splitlines() == ["generating: step 1/2", "model tiny: loading"]
    quiet = io.StringIO()
    ProgressPrinter(quiet).on_event({"event": "progress", "request": 1, "step": 1, "total": 2})
    assert quiet.getvalue() == ""


def test_each_result_is_written_before_the_next_line_is_read(fake):
    out = io.StringIO()
    written_when_pulled: list[int] = []

    def lines():
        for line in ["a cat", "# comment", "!tokens x", "!set steps 3"]:
            written_when_pulled.append(len(out.getvalue().splitlines()))
            yield line + "\n"

    asyncio.run(run_script(fake, lines(), json_mode=True, fail_fast=False, out=out, err=io.StringIO()))
    assert written_when_pulled == [0, 1, 1, 2]


def test_a_program_can_drive_the_session_through_pipes(fake):
    """Write a line, read its result, then write the next: works only if every result is flushed at once."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    stdin = os.fdopen(in_r, "r")
    stdout = os.fdopen(out_w, "w")
    status: list[int] = []

    def session():
        status.append(asyncio.run(run_script(fake, stdin, json_mode=True, fail_fast=False, out=stdout,
                                             err=io.StringIO())))
        stdout.close()

    thread = threading.Thread(target=session, daemon=True)
    thread.start()
    reader = os.fdopen(out_r, "r")
    writer = os.fdopen(in_w, "w")
    try:
        for number, line in enumerate(["a red fox", "!tokens a fox", "!set steps 3"], start=1):
            writer.write(line + "\n")
            writer.flush()
            ready, _, _ = select.select([reader], [], [], 10)
            assert ready, f"no result for line {number} within 10 s (not flushed?)"
            result = json.loads(reader.readline())
            assert (result["line"], result["input"], result["ok"]) == (number, line, True)
        writer.close()
        thread.join(10)
        assert status == [0] and reader.read() == ""
    finally:
        reader.close()
        if not writer.closed:
            writer.close()


@pytest.mark.parametrize("text", ["", "# only comments\n\n"])
def test_empty_scripts_succeed_silently(fake, text):
    assert script(fake, text) == (0, "", "")


def test_input_that_is_not_utf8_fails_its_line(fake):
    stream = io.TextIOWrapper(io.BytesIO(b"a cat\n\xff\xfe bad\n"), encoding="utf-8")
    out = io.StringIO()
    status = asyncio.run(run_script(fake, stream, json_mode=True, fail_fast=False, out=out, err=io.StringIO()))
    objects = [json.loads(line) for line in out.getvalue().splitlines()]
    assert status == 1 and objects[-1]["ok"] is False and "not UTF-8" in objects[-1]["error"]["message"]


def test_a_closed_stdout_ends_the_session_quietly(fake):
    class Closed(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    status = asyncio.run(run_script(fake, io.StringIO("a cat\na dog\n"), json_mode=True, fail_fast=False,
                                    out=Closed(), err=io.StringIO()))
    assert status == 1 and len(fake.calls) == 1
