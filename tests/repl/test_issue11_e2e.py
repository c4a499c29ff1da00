"""The REPL as people really use it (issue 11), in a real pseudo-terminal (pexpect) against a real daemon.

One daemon on ``tiny`` for the module; each test starts its own REPL and does one thing a user does:
type ``/bye`` out of habit, paste an A1111 parameters block, type while a picture is being made, kill
the daemon under an open REPL and carry on, try an embedding while it trains.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image
from repl_testing import PROMPT, Tmux, repl_daemon, spawn_repl

pexpect = pytest.importorskip("pexpect")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]



@pytest.fixture(scope="module")
def daemon(fixtures_dir):
    def prepare(proc) -> None:
        shutil.copy(fixtures_dir / "a1111" / "bad-hands-5.pt", proc.embeddings / "bad-hands-5.pt")

    with repl_daemon("sdrepl-i11-", prepare) as served:
        yield served


def spawn(daemon, *extra: str):
    return spawn_repl([*daemon.args, *extra], daemon.env, daemon.tmp, log=daemon.tmp / "repl-screen.log")


def pictures(daemon) -> set[Path]:
    return set(daemon.outputs.rglob("*.png"))


# -- item 3: habits ---------------------------------------------------------------------------------

def test_habits_hint_refuse_and_bye_leaves(repl, daemon):
    before = pictures(daemon)
    repl.sendcontrol("c")  # on an empty line: how to leave
    repl.expect_exact("Ctrl-D or !quit to leave")
    repl.send("a cat -M mask.png --steps 2\r")
    repl.expect_exact("-M (InvokeAI's an init mask) is not supported")
    repl.expect_exact(PROMPT)
    repl.send("a cat --stpes 2\r")
    repl.expect_exact("(did you mean --steps?)")
    repl.expect_exact(PROMPT)
    repl.send('"""\r')
    repl.send("a tall tree\r")
    repl.send('""" --steps 2 --size 64x64\r')
    repl.expect(r"\.png\s+\(seed \d+", timeout=120)
    repl.expect_exact(PROMPT)
    repl.send("!history tall\r")  # the block is one entry
    repl.expect(r"(\d+)  \"\"\" ⏎ a tall tree ⏎ \"\"\" --steps 2 --size 64x64")
    number = repl.match.group(1)
    repl.expect_exact(PROMPT)
    repl.send(f"!{number}\r")  # !NN puts it back into the buffer
    repl.expect_exact("a tall tree")  # printed ...
    repl.expect(r'sd> (?:\x1b\[[0-9;]*m)*"""(?:\x1b\[[0-9;]*m)*\r\r\n(?:\x1b\[[0-9;]*m)*a tall tree')  # ... and in the buffer
    repl.sendcontrol("c")
    repl.send("/bye\r")
    repl.expect(pexpect.EOF, timeout=20)
    repl.close()
    assert repl.exitstatus == 0
    assert len(pictures(daemon) - before) == 1  # only the block made a picture


# -- item 2: paste an A1111 block -------------------------------------------------------------------

A1111_BLOCK = ("a red fox in the snow\r\nNegative prompt: blurry\r\nSteps: 2, Sampler: Euler, CFG scale: 6.5, "
               "Seed: 4242, Size: 64x64, Model hash: 6ce0161689, Model: v1-5, Denoising strength: 0.45, "
               "Hires upscale: 2, ADetailer model: face_yolov8n.pt")


def test_a_pasted_a1111_block_is_one_generation_with_its_settings(repl, daemon):
    before = pictures(daemon)
    repl.send("\x1b[200~" + A1111_BLOCK + "\x1b[201~")  # a bracketed paste, as the terminal sends it
    repl.expect_exact("left out: ADetailer model")  # its hires fix became --hires 2 --hires-denoise 0.45
    repl.expect_exact("--sampler Euler")  # the line is in the buffer, to edit before Enter
    repl.send("\r")
    repl.expect(r"\.png\s+\(seed 4242,", timeout=120)
    repl.expect_exact(PROMPT)
    made = pictures(daemon) - before
    assert len(made) == 1
    from sdrepl.core.pnginfo import parse_parameters, read_png_parameters

    made_path = made.pop()
    params = parse_parameters(read_png_parameters(made_path))
    assert (params["prompt"], params["negative"], params["steps"], params["cfg"], params["seed"]) == (
        "a red fox in the snow", "blurry", 2, 6.5, 4242)
    assert (params["extra"]["Hires upscale"], params["extra"]["Denoising strength"]) == ("2", "0.45")
    with Image.open(made_path) as picture:  # the hires pass: twice the size
        assert picture.size == (128, 128)


# -- item 8: screen hygiene, in tmux (what the screen really shows) ----------------------------------

@pytest.fixture
def tmux(daemon):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    session = Tmux(daemon.tmp, f"t{os.getpid()}", daemon.args, daemon.env)
    try:
        session.wait_for(lambda s: re.search(r"^sd>", s, re.M) is not None)  # capture-pane drops trailing blanks
        yield session
    finally:
        session.close()


def test_typing_during_a_generation_leaves_a_clean_screen(tmux):
    tmux.keys("a fox --steps 400 --size 64x64", "Enter")
    tmux.wait_for(lambda s: "generating" in s)
    tmux.keys("hello world", literal=True)
    during = []
    while "generating" in (screen := tmux.screen()):
        during.append(screen)
        time.sleep(0.02)
    assert during, "the generation ended before the keys were typed; make it longer"
    for screen in during:
        assert "hello" not in screen  # not echoed over the progress line
    after = tmux.wait_for(lambda s: re.search(r"sd> hello world\s*$", s, re.M) is not None)
    assert re.search(r"\.png\s+\(seed \d+", after)
    assert "^[" not in after and not re.search(r"\d+;\d+R", after)  # no cursor-position-report garbage
    tmux.keys("C-c")  # clears the buffer, and the toolbar with it
    tmux.wait_for(lambda s: re.search(r"sd> hello", s) is None)
    tmux.keys("!quit", "Enter")


# -- item 7: training visible and usable -----------------------------------------------------------

def make_pictures(folder: Path, count: int = 3) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (64, 64), (255, 255, 255))
        ImageDraw.Draw(image).ellipse([8, 8, 56, 56], fill=(40 * i, 100, 200))
        image.save(folder / f"{i:03d}-a round shape.png")
    return folder


def test_an_embedding_in_training_is_usable_and_ctrl_c_stops_only_the_wait(repl, daemon):
    data = make_pictures(daemon.tmp / "shapes")
    log_dir = daemon.tmp / "tlog"
    repl.send(f"!train shape --data {data} --steps 100000 --save-every 3 --preview-every 0 --batch 8 "
              f"--log-dir {log_dir} --wait\r")
    repl.expect(r"train shape \d+/100000 loss", timeout=120)  # the job's progress, while waiting
    repl.expect_exact("(Ctrl-C stops waiting; the job goes on)")
    repl.sendintr()
    repl.expect_exact("stopped waiting; training shape goes on in the daemon", timeout=30)
    repl.expect_exact(PROMPT)
    repl.send("!tokens a photo of <shape>\r")  # usable during its first run
    repl.expect_exact("embeddings: shape", timeout=30)
    repl.expect_exact(PROMPT)
    repl.send("!show shape\r")
    repl.expect(r"step:\s+([1-9]\d*)", timeout=30)  # a checkpoint's vectors, not the init text's
    repl.expect_exact(PROMPT)
    repl.send("!train status\r")
    repl.expect_exact("training shape: running")
    repl.expect_exact("--batch 8 is larger than the data set (3 picture(s) x 1 repeat(s)); training with --batch 3")
    repl.expect_exact(PROMPT)
    repl.send("!train stop\r")
    repl.expect_exact("training shape", timeout=60)
    repl.expect_exact(PROMPT)
