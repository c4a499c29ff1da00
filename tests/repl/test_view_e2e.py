"""``!view`` and ``!train plot`` from a scripted session against a real daemon: JSON, never escape bytes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def sdrepl(live: dict, stdin: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdrepl", *live["options"], "--json"], input=stdin, text=True,
                          capture_output=True, cwd=live["root"], env=live["env"], timeout=timeout)


def rows(done: subprocess.CompletedProcess) -> list[dict]:
    assert "\x1b" not in done.stdout  # scripted sessions never print a picture
    return [json.loads(line) for line in done.stdout.splitlines()]


def shapes(folder: Path, count: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(image).ellipse([8, 8, 56, 56], fill=(60 * i, 90, 200))
        image.save(folder / f"{i:03d}-a round shape.png")
    return folder


def test_view_n_counts_this_sessions_pictures_newest_first_and_files_are_measured(live_daemon):
    root = Path(live_daemon["root"])
    Image.new("RGB", (48, 32), "red").save(root / "mine.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    script = "\n".join(["!set steps 2", "a fox --size 64x64 --seed 1", "a cat --size 64x32 --seed 2 --n 2",
                        "!view", "!view 3", "!view 4", "!view mine.png", "!view broken.png", "!view nosuch.png",
                        "!set preview sixel", "!view 1", "!set preview nonsense"]) + "\n"
    done = sdrepl(live_daemon, script)
    out = {o["line"]: o for o in rows(done)}
    fox, cats = out[2]["images"], out[3]["images"]
    assert out[4]["view"] == {"path": cats[1]["path"], "width": 64, "height": 32, "n": 1}
    assert out[5]["view"] == {"path": fox[0]["path"], "width": 64, "height": 64, "n": 3}
    assert not out[6]["ok"] and "only 3 picture(s)" in out[6]["error"]["message"]
    assert out[7]["view"] == {"path": str(root / "mine.png"), "width": 48, "height": 32}
    assert not out[8]["ok"] and out[8]["error"]["type"] == "PreviewError"
    assert "broken.png" in out[8]["error"]["message"]
    assert not out[9]["ok"] and "no such file" in out[9]["error"]["message"]
    assert out[10]["set"] == {"preview": "sixel"} and out[11]["ok"]
    assert not out[12]["ok"] and "off, auto, kitty, iterm, sixel, blocks" in out[12]["error"]["message"]


def test_train_plot_fetches_the_log_folders_loss_png_over_the_protocol(live_daemon):
    root = Path(live_daemon["root"])
    data = shapes(root / "shapes")
    script = "\n".join([
        "!train plot",  # no job yet
        f"!train plotme --data {data} --steps 4 --save-every 2 --preview-every 0 --batch 1 --wait",
        "!train plot", "!train plot plotme", "!train plot nosuch", "!train plot a/b",
    ]) + "\n"
    done = sdrepl(live_daemon, script)
    out = {o["line"]: o for o in rows(done)}
    assert not out[1]["ok"] and "no training job" in out[1]["error"]["message"], out[1]
    assert out[2]["ok"], out[2]
    plot = out[3]["plot"]
    assert plot["name"] == "plotme" and plot["step"] == 4 and (plot["width"], plot["height"]) == (800, 400)
    assert Path(plot["path"]).name == "loss.png" and Path(plot["log_dir"]) == Path(plot["path"]).parent
    assert "data" not in plot  # the bytes are for drawing, not for the JSON
    assert out[4]["plot"]["path"] == plot["path"]
    assert not out[5]["ok"] and "no training log folder of 'nosuch'" in out[5]["error"]["message"]
    assert not out[6]["ok"]  # a path is never a NAME


def test_view_1_after_a_grid_is_the_grid_picture(live_daemon):
    done = sdrepl(live_daemon, "!grid a fox --x seed=1,2 --steps 2 --size 32x32\n!view\n!view 2\n")
    grid, latest, before = rows(done)
    assert grid["ok"], grid
    assert latest["view"]["path"] == grid["grid"]["path"]
    assert (latest["view"]["width"], latest["view"]["height"]) == (grid["grid"]["width"], grid["grid"]["height"])
    assert not before["ok"]  # a grid counts one picture, its cells are not this session's latest
