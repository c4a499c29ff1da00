"""``!grid`` in the REPL without a daemon: parsing, the request sent, remote pictures, rendering, completion."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import pytest
from PIL import Image
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document

from sdrepl.core.errors import UsageError
from sdrepl.repl.completion import make_completer
from sdrepl.repl.grid_command import bring_grid_home, parse_grid, render_grid, split_axes
from sdrepl.repl.session import Session

REPLY = {"grid": {"path": "/out/2026-12-02/00003-grid.png", "width": 200, "height": 100, "columns": 2, "rows": 1,
                  "planes": 1},
         "cells": [{"path": "/out/2026-12-02/00001-5.png", "seed": 5, "x": "3", "y": None, "z": None},
                   {"path": "/out/2026-12-02/00002-5.png", "seed": 5, "x": "7", "y": None, "z": None}],
         "axes": [{"axis": "x", "type": "cfg", "name": None, "values": ["3", "7"]}], "batches": 2, "seed": 5,
         "random_seed": False, "total_s": 1.25}


def run_line(fake, line: str, tmp_path: Path | None = None):
    return asyncio.run(Session(fake, cwd=tmp_path).execute(line))


def test_axes_are_cut_out_and_the_rest_is_a_generation_line():
    rest, axes = split_axes("a cat, photo --x cfg=3, 7 --steps 2 --y sampler=Euler a,DDIM -s 4 --z=seed=1-3")
    assert axes == {"x": "cfg=3, 7", "y": "sampler=Euler a,DDIM", "z": "seed=1-3"}
    assert rest.split() == ["a", "cat,", "photo", "--steps", "2", "-s", "4"]
    parsed = parse_grid("a <cat> --x ckpt=cat --log runs/cat --steps 3 --size 64x64")
    assert parsed["line"].prompt == "a <cat>" and parsed["line"].steps == 3 and parsed["log"] == "runs/cat"


@pytest.mark.parametrize(("args", "message"), [
    ("--x cfg=1,2", "needs a prompt"),
    ("a cat", "needs an x axis"),
    ("a cat --x", "--x needs a value"),
    ("a cat --x foo=1", "unknown axis 'foo'"),
    ("a cat --x cfg=1 --n 3", "--n does not apply"),
    ("a cat --x cfg=1 --stepz 3", "unknown option --stepz"),
])
def test_mistakes_are_caught_before_the_daemon(args, message):
    with pytest.raises(UsageError, match=message):
        parse_grid(args)


def test_the_request_carries_the_line_the_session_defaults_and_the_axes(make_fake, tmp_path):
    fake = make_fake({"grid": lambda p: REPLY})
    (tmp_path / "runs" / "cat").mkdir(parents=True)
    asyncio.run(Session(fake, cwd=tmp_path).execute("!set n 4"))
    result = run_line(fake, "!grid a cat --x cfg=3,7 --y ckpt=cat --log runs/cat --steps 2", tmp_path)
    assert result.ok, result.error
    kind, params = fake.calls[-1]
    assert kind == "grid"
    assert params["x"] == "cfg=3,7" and params["y"] == "ckpt=cat" and "z" not in params
    assert params["log"] == str((tmp_path / "runs" / "cat").resolve())
    assert params["steps"] == 2 and params["prompt"] == "a cat" and "n" not in params  # !set n is no grid's
    assert result.result["grid"]["path"] == REPLY["grid"]["path"] and result.result["cells"] == REPLY["cells"]
    assert result.text.startswith("grid 2x1 (2 cells, 2 batches): /out/2026-12-02/00003-grid.png  (200x100, seed 5")


def test_a_missing_log_folder_and_a_search_text_not_in_the_prompt(make_fake, tmp_path):
    fake = make_fake({"grid": lambda p: REPLY})
    missing = run_line(fake, "!grid a <cat> --x ckpt=cat --log nowhere", tmp_path)
    assert not missing.ok and "no such folder" in missing.error["message"]
    sr = run_line(fake, "!grid a cat --x sr=dog,fox --neg ugly", tmp_path)
    assert not sr.ok and "'dog', which is not in the prompt" in sr.error["message"]
    assert "grid" not in fake.types()


def test_ctrl_c_cancels_the_daemons_grid(make_fake):
    async def scenario() -> None:
        fake = make_fake()
        never = asyncio.get_running_loop().create_future()
        fake.start = lambda type_name, **params: (7, never)  # a grid that does not finish by itself
        task = asyncio.ensure_future(Session(fake).execute("!grid a cat --x cfg=1,2"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)
        assert fake.cancelled == [7]

    asyncio.run(scenario())


def png_bytes(colour: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_remote_daemons_grid_and_cells_are_brought_home(make_fake, tmp_path):
    colours = {"/out/2026-12-02/00001-5.png": (255, 0, 0), "/out/2026-12-02/00002-5.png": (0, 255, 0),
               "/out/2026-12-02/00003-grid.png": (0, 0, 255)}
    fake = make_fake({"picture": lambda p: {"data": png_bytes(colours[p["path"]])}})
    home = asyncio.run(bring_grid_home(fake, REPLY, tmp_path))
    names = [Path(c["path"]).name for c in home["cells"]]
    assert names[0].endswith("-5.png") and names[1].endswith("-5.png") and names[0] != names[1]
    assert Path(home["grid"]["path"]).name.endswith("-grid.png")
    assert home["grid"]["daemon_path"] == REPLY["grid"]["path"] and home["cells"][0]["daemon_path"] == REPLY["cells"][0]["path"]
    with Image.open(home["grid"]["path"]) as im:
        assert im.getpixel((0, 0)) == (0, 0, 255)
    assert all(Path(c["path"]).parent.parent == tmp_path for c in home["cells"])


def test_render_names_a_random_seed_and_leaves_it_out_when_seeds_are_swept():
    assert "seed 5 (random)" in render_grid({**REPLY, "random_seed": True})
    swept = {**REPLY, "axes": [{"axis": "x", "type": "seed", "values": ["1", "2"]}]}
    assert "seed" not in render_grid(swept).split("(")[-1]
    three = {**REPLY, "grid": {**REPLY["grid"], "rows": 2, "planes": 3}}
    assert render_grid(three).startswith("grid 2x2x3 ")


def texts(text: str) -> list[str]:
    embeddings = [{"name": "cat-toy", "vectors": 1}, {"name": "birb-style", "vectors": 1}]
    networks = {"lora": [{"name": "watercolor"}]}
    completer = make_completer(lambda: embeddings, get_networks=lambda: networks)
    return [c.text for c in completer.get_completions(Document(text), CompleteEvent(completion_requested=True))]


def test_completion_offers_axes_names_and_samplers():
    assert {"seed=", "cfg=", "sr=", "ckpt=", "lora="} <= set(texts("!grid a cat --x "))
    assert texts("!grid a cat --y ckpt=ca") == ["ckpt=cat-toy"]
    assert texts("!grid a cat --x lora=wat") == ["lora=watercolor:"]
    assert "sampler=Euler a,DDIM" in texts("!grid a cat --x sampler=Euler a,DD")
    assert "sampler=Euler a,Euler a" not in texts("!grid a cat --x sampler=Euler a,")
    assert {"x", "y", "z", "log", "steps"} <= set(texts("!grid a cat --"))


def test_fetch_of_a_grid_picture_gives_the_grid_line_back(fake, tmp_path):
    from sdrepl.core.grid import parse_axis
    from sdrepl.core.grid_cells import grid_parameters
    from sdrepl.core.pnginfo import png_text_chunks

    first = "a <cat> photo\nSteps: 2, Sampler: Euler a, CFG scale: 3, Seed: 5, Size: 64x64, Model: tiny"
    axes = [parse_axis("ckpt=cat:100,200"), parse_axis("cfg=3,7"), None]
    path = tmp_path / "00007-grid.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=png_text_chunks(grid_parameters(first, axes)))
    result = run_line(fake, f"!fetch {path}", tmp_path)
    assert result.ok, result.error
    line = result.result["command"]
    assert line.startswith("!grid a <cat> photo --steps 2 --cfg 3 --seed 5 --size 64x64")
    assert line.endswith("--x ckpt=cat:100, 200 --y cfg=3, 7") and result.result["unsupported"] == []
    parsed = parse_grid(line[len("!grid "):])
    assert parsed["x"] == "ckpt=cat:100, 200" and parsed["line"].prompt == "a <cat> photo"
