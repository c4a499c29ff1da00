"""``!grid`` end to end: scripted ``--json`` sessions against a real daemon on ``tiny`` (the acceptance test).

A training log folder with three snapshots is written with the library's own writer, as ``!train
--save-every`` lays it out (``./textual_inversion/<date>/<NAME>/embeddings/NAME-STEP.safetensors`` where the
daemon runs); a 3x2 grid over ``ckpt`` and ``cfg`` must give one labelled grid PNG and six cell PNGs whose
pixels equal the same generations run one by one with ``<NAME>`` being that snapshot's file.
"""

from __future__ import annotations

import json
import select
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdrepl.core.embedding import SINGLE
from sdrepl.core.formats import write_embedding
from sdrepl.core.grid_image import BACKGROUND, plan_layout
from sdrepl.core.pnginfo import read_png_parameters

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NAME = "tcat"
STEPS = (100, 200, 300)
TINY = "--steps 2 --size 64x64 --seed 5"


def sdrepl(live: dict, stdin: str, timeout: float = 240) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "sdrepl", *live["options"], "--json"], input=stdin, text=True,
                          capture_output=True, cwd=live["root"], env=live["env"], timeout=timeout)
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == len([ln for ln in stdin.splitlines() if ln.strip()]), done.stdout + done.stderr
    return rows


class Driven:
    """One scripted ``--json`` session driven line by line through pipes (as another program would), so a
    test can change files between lines without starting a session per step."""

    def __init__(self, live: dict) -> None:
        self.stderr = open(live["root"] / "driven.stderr", "a")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, "-m", "sdrepl", *live["options"], "--json"], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     cwd=live["root"], env=live["env"])

    def run(self, line: str, timeout: float = 120) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"no result for {line!r} within {timeout} s"
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.stderr.close()


def pixels(path: str | Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def snapshots(live_daemon) -> dict[int, Path]:
    """Three snapshots of NAME, as a training run writes them (distinct vectors, so cells differ)."""
    folder = live_daemon["root"] / "textual_inversion" / "2026-12-01" / NAME / "embeddings"
    folder.mkdir(parents=True)
    out = {}
    for i, step in enumerate(STEPS):
        vectors = torch.randn(2, 768, generator=torch.Generator().manual_seed(i)) * 0.5
        out[step] = write_embedding(folder / f"{NAME}-{step}.safetensors", {SINGLE: vectors}, name=NAME, step=step)
    return out


def test_a_3x2_ckpt_by_cfg_grid_equals_the_generations_run_one_by_one(live_daemon, snapshots):
    session = Driven(live_daemon)
    try:
        check_grid_and_singles(session, live_daemon, snapshots)
    finally:
        session.close()


def check_grid_and_singles(session: Driven, live_daemon: dict, snapshots: dict[int, Path]) -> None:
    row = session.run(f"!grid a photo of <{NAME}> --x ckpt={NAME} --y cfg=3,7 {TINY}")
    assert row["ok"], row
    cells = row["cells"]
    assert [(c["x"], c["y"], c["z"]) for c in cells] == [(str(s), cfg, None) for cfg in ("3", "7") for s in STEPS]
    assert all(c["seed"] == 5 and Path(c["path"]).is_file() for c in cells)
    assert len({c["path"] for c in cells}) == 6

    # The grid: 3x2 cells of 64 px plus the label margins, the cells' pixels in their places, labels drawn.
    grid = row["grid"]
    with Image.open(grid["path"]) as im:
        grid_pixels = np.asarray(im.convert("RGB"))
        grid_text = im.text["parameters"]
    layout = plan_layout([(64, 64)], 3, 2, 1, [f"{NAME}-{s}" for s in STEPS], ["CFG Scale: 3", "CFG Scale: 7"], [])
    assert (grid["width"], grid["height"]) == (layout.width, layout.height) == grid_pixels.shape[1::-1]
    assert layout.width == layout.left + 3 * 64 and layout.height == layout.top + 2 * 64
    assert layout.left > 0 and layout.top > 0
    for cell in cells:
        ix, iy = STEPS.index(int(cell["x"])), ("3", "7").index(cell["y"])
        left, top, right, bottom = layout.cell_box(ix, iy, 0, (64, 64))
        assert np.array_equal(grid_pixels[top:bottom, left:right], pixels(cell["path"]))
    background = np.array(BACKGROUND, dtype=np.uint8)
    assert (grid_pixels[:layout.top, layout.left:] != background).any()  # the x labels
    assert (grid_pixels[layout.top:, :layout.left] != background).any()  # the y labels
    first = read_png_parameters(cells[0]["path"])
    assert grid_text.startswith(first) and "Script: X/Y/Z plot" in grid_text
    assert f'X Values: "{", ".join(map(str, STEPS))}"' in grid_text and 'Y Values: "3, 7"' in grid_text

    # Each snapshot does change the picture (or the comparison below could not fail).
    assert not np.array_equal(pixels(cells[0]["path"]), pixels(cells[1]["path"]))

    # One by one: <NAME> is that snapshot's file, put into the embeddings folder; same seed and cfg.
    target = live_daemon["embeddings"] / f"{NAME}.safetensors"
    try:
        for step in STEPS:
            shutil.copyfile(snapshots[step], target)
            rows = [session.run(line) for line in ("!reload", f"a photo of <{NAME}> {TINY} --cfg 3",
                                                   f"a photo of <{NAME}> {TINY} --cfg 7")]
            assert all(r["ok"] for r in rows), rows
            for cfg, single in zip(("3", "7"), rows[1:], strict=True):
                cell = next(c for c in cells if c["x"] == str(step) and c["y"] == cfg)
                alone = single["images"][0]["path"]
                assert np.array_equal(pixels(cell["path"]), pixels(alone)), (step, cfg)
                assert read_png_parameters(cell["path"]) == read_png_parameters(alone)  # TI hashes too
        # With the library holding a NAME of its own, the grid's snapshot still wins for <NAME>.
        again = session.run(f"!grid a photo of <{NAME}> --x ckpt={NAME}:{STEPS[0]} {TINY} --cfg 3")
        assert again["ok"], again
        assert np.array_equal(pixels(again["cells"][0]["path"]), pixels(cells[0]["path"]))
    finally:
        target.unlink(missing_ok=True)
        session.run("!reload")


def test_seed_only_cells_run_as_one_batch_with_the_pictures_of_single_runs(live_daemon):
    grid, *singles = sdrepl(live_daemon, "!grid a red fox --x seed=11,40,12 --steps 2 --size 32x32\n"
                            + "".join(f"a red fox --seed {s} --steps 2 --size 32x32\n" for s in (11, 40, 12)))
    assert grid["ok"] and grid["batches"] == 1, grid
    assert [c["seed"] for c in grid["cells"]] == [11, 40, 12] and [c["x"] for c in grid["cells"]] == ["11", "40", "12"]
    assert [c["y"] for c in grid["cells"]] == [None] * 3
    for cell, single in zip(grid["cells"], singles, strict=True):
        assert np.array_equal(pixels(cell["path"]), pixels(single["images"][0]["path"]))


def test_mistakes_are_answered_with_the_fix(live_daemon, snapshots):
    empty = live_daemon["root"] / "textual_inversion" / "2026-11-30" / "nosnaps" / "embeddings"
    empty.mkdir(parents=True)
    rows = sdrepl(live_daemon, "\n".join([
        "!grid a cat --x colour=1,2",
        "!grid a cat --x sr=dog,fox",
        "!grid a <ghost> --x ckpt=ghost",
        "!grid a <nosnaps> --x ckpt=nosnaps",
        f"!grid a <{NAME}> --x ckpt={NAME}:150",
        f"!grid a cat --x ckpt={NAME} {TINY}",
        "!grid a cat --x cfg=1-200 (+1)",
        "!grid a cat --x cfg=3 --n 2",
        "!grid a cat",
    ]) + "\n")
    assert [r["ok"] for r in rows] == [False] * len(rows)
    assert {r["error"]["type"] for r in rows} == {"UsageError"}
    messages = [r["error"]["message"] for r in rows]
    assert "unknown axis 'colour'" in messages[0] and "axes: seed, steps, cfg" in messages[0]
    assert "'dog', which is not in the prompt" in messages[1]
    assert "no training log folder" in messages[2] and "--save-every" in messages[2] and "--log DIR" in messages[2]
    assert "has no snapshots of 'nosnaps'" in messages[3]
    assert "no snapshot of tcat at step 150; its snapshots are at steps 100, 200, 300" in messages[4]
    assert "does not use <tcat>" in messages[5]
    assert "more than a grid's 100 cells" in messages[6]
    assert "--n does not apply" in messages[7]
    assert "needs an x axis" in messages[8]
