"""The ``grid`` request on a real daemon: progress over the whole grid, cancel, ``log``, snapshot checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from daemon_testing import EventLog, run

from sdrepl.core.embedding import SINGLE
from sdrepl.core.formats import write_embedding
from sdrepl.daemon.client import RemoteError

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TINY = {"steps": 2, "width": 32, "height": 32, "seed": 3}


def log_folder(root: Path, name: str, widths: dict[int, int]) -> Path:
    """A training log folder with one snapshot per step, of the given vector width."""
    folder = root / name
    (folder / "embeddings").mkdir(parents=True)
    for step, width in widths.items():
        write_embedding(folder / "embeddings" / f"{name}-{step}.safetensors",
                        {SINGLE: torch.randn(1, width, generator=torch.Generator().manual_seed(step))},
                        name=name, step=step)
    return folder


def test_progress_counts_over_the_whole_grid(daemon):
    async def scenario() -> None:
        async with daemon.client() as c:
            events = EventLog(c)
            rid, future = c.start("grid", prompt="a cat", x="cfg=2,4", y="steps=1,3", **{**TINY, "steps": 2})
            result = await future
            progress = [e for e in events.events if e["event"] == "progress" and e["request"] == rid]
            total = (1 + 3) * 2
            assert progress and all(e["total"] == total and e["images"] == 4 for e in progress)
            steps = [e["step"] for e in progress]
            assert steps == sorted(steps) and steps[-1] == total
            assert result["batches"] == 4 and len(result["cells"]) == 4
            assert [c["y"] for c in result["cells"]] == ["1", "1", "3", "3"]

    run(scenario())


def test_cancel_stops_the_grid_and_the_daemon_goes_on(daemon):
    async def scenario() -> None:
        async with daemon.client() as c:
            events = EventLog(c)
            before = set(daemon.outputs.rglob("*-grid.png"))
            rid, future = c.start("grid", prompt="slow", x="seed=1-4", y="cfg=3,5", steps=200, width=64, height=64)
            await events.wait_for(lambda e: e["event"] == "progress" and e["request"] == rid and e["step"] > 0,
                                  timeout=60)
            assert await c.cancel(rid) is True
            with pytest.raises(RemoteError) as info:
                await future
            assert info.value.type_name == "Cancelled"
            assert set(daemon.outputs.rglob("*-grid.png")) == before  # no grid of a cancelled sweep
            assert (await c.request("status"))["queue"]["running"] is None
            after = await c.request("grid", prompt="a cat", x="seed=1,2", **TINY)
            assert Path(after["grid"]["path"]).is_file() and after["batches"] == 1

    run(scenario())


def test_a_log_folder_given_by_path(daemon, tmp_path):
    folder = log_folder(tmp_path, "loggy", {10: 768, 20: 768})

    async def scenario() -> None:
        async with daemon.client() as c:
            result = await c.request("grid", prompt="a <loggy>", x="ckpt=loggy", log=str(folder), **TINY)
            assert [c["x"] for c in result["cells"]] == ["10", "20"]
            assert result["axes"] == [{"axis": "x", "type": "ckpt", "name": "loggy", "values": ["10", "20"]}]
            with pytest.raises(RemoteError, match="must be the absolute path"):
                await c.request("grid", prompt="a <loggy>", x="ckpt=loggy", log="relative/dir", **TINY)
            with pytest.raises(RemoteError, match="is not a training log folder"):
                await c.request("grid", prompt="a <loggy>", x="ckpt=loggy", log=str(tmp_path), **TINY)

    run(scenario())


def test_a_snapshot_that_does_not_fit_the_model_is_named(daemon, tmp_path):
    folder = log_folder(tmp_path, "wide", {10: 768, 20: 1024})

    async def scenario() -> None:
        async with daemon.client() as c:
            with pytest.raises(RemoteError) as info:
                await c.request("grid", prompt="a <wide>", x="ckpt=wide", log=str(folder), **TINY)
            assert info.value.type_name == "EmbeddingError"
            assert "wide-20.safetensors" in info.value.message and "does not fit the model" in info.value.message
            ok = await c.request("grid", prompt="a <wide>", x="ckpt=wide:10", log=str(folder), **TINY)
            assert len(ok["cells"]) == 1

    run(scenario())


def test_bad_parameters_are_refused_before_any_work(daemon):
    async def scenario() -> None:
        async with daemon.client() as c:
            for params, message in (({"x": 5}, "parameter 'x' must be a string"),
                                    ({"x": "cfg=1", "stpes": 3}, "unknown parameter"),
                                    ({"x": "cfg=1", "width": 30}, "multiple of 8"),
                                    ({"y": "cfg=1"}, "needs an x axis")):
                with pytest.raises(RemoteError, match=message):
                    await c.request("grid", prompt="a cat", **params)

    run(scenario())


def test_img2img_and_hires_options_reach_every_cell(daemon, tmp_path):
    """The grid goes through ``generate``'s own parse_job and start_generation, so its options come along."""
    import numpy as np
    from PIL import Image

    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(init)

    def pixels(path: str) -> np.ndarray:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))

    async def scenario() -> None:
        async with daemon.client() as c:
            grid = await c.request("grid", prompt="a cat", x="seed=1,2", init=str(init), strength=0.5, **TINY)
            for cell in grid["cells"]:
                alone = await c.request("generate", prompt="a cat", init=str(init), strength=0.5,
                                        **{**TINY, "seed": cell["seed"]})
                assert np.array_equal(pixels(cell["path"]), pixels(alone["images"][0]["path"]))
            hires = await c.request("grid", prompt="a cat", x="cfg=3,5", hires=2.0, **TINY)
            assert all(pixels(cell["path"]).shape[:2] == (64, 64) for cell in hires["cells"])

    run(scenario())


def test_a_lora_weight_axis_equals_the_tagged_prompts(daemon):
    import asyncio
    import time

    import numpy as np
    from lora_files import kohya_file
    from PIL import Image

    from sdrepl.core.pnginfo import read_png_parameters
    from sdrepl.core.tiny import build_tiny

    kohya_file(daemon.root / "loras" / "gridlora.safetensors", build_tiny("tiny"), seed=4)

    def pixels(path: str) -> np.ndarray:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))

    async def scenario() -> None:
        async with daemon.client() as c:
            deadline = time.monotonic() + 30
            while not any(n["name"] == "gridlora" for n in (await c.request("loras"))["loras"]):
                assert time.monotonic() < deadline, "the watcher did not load the LoRA"
                await asyncio.sleep(0.1)
            grid = await c.request("grid", prompt="a cat", x="lora=gridlora:0,1.5", **TINY)
            assert [cell["x"] for cell in grid["cells"]] == ["0", "1.5"]
            for cell, weight in zip(grid["cells"], ("0", "1.5"), strict=True):
                alone = await c.request("generate", prompt=f"a cat <lora:gridlora:{weight}>", **TINY)
                path = alone["images"][0]["path"]
                assert np.array_equal(pixels(cell["path"]), pixels(path))
                assert read_png_parameters(cell["path"]) == read_png_parameters(path)
            assert not np.array_equal(pixels(grid["cells"][0]["path"]), pixels(grid["cells"][1]["path"]))

    run(scenario())


def test_batches_share_out_over_several_devices():
    """``--device cpu,cpu``: the grid's batches run on both workers at once; progress still adds up."""
    import shutil

    import numpy as np
    from daemon_testing import make_daemon, short_dir
    from PIL import Image

    root = short_dir()
    proc = make_daemon(root, extra_args=["--device", "cpu,cpu"])

    def pixels(path: str) -> np.ndarray:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))

    async def scenario() -> None:
        async with proc.client() as c:
            events = EventLog(c)
            rid, future = c.start("grid", prompt="a cat", x="cfg=2,3,4,5", steps=4, width=32, height=32, seed=9)
            result = await future
            assert result["workers"] == ["0:cpu", "1:cpu"] and result["batches"] == 4
            progress = [e for e in events.events if e["event"] == "progress" and e["request"] == rid]
            assert progress[-1]["step"] == progress[-1]["total"] == 16
            assert max(e["step"] for e in progress) == 16
            alone = await c.request("generate", prompt="a cat", cfg=4.0, steps=4, width=32, height=32, seed=9)
            assert np.array_equal(pixels(result["cells"][2]["path"]), pixels(alone["images"][0]["path"]))

    try:
        proc.start()
        run(scenario(), timeout=300)
    finally:
        proc.stop()
        shutil.rmtree(root, ignore_errors=True)
