"""``--n N``: one batch where the device holds it, each picture the picture its seed makes alone; PNGs are
written on the writer thread and the result waits for them."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from sdrepl.core import batching
from sdrepl.core.generation import GenerationJob, run_generation, start_generation
from sdrepl.core.outputs import OutputFolder
from sdrepl.core.pnginfo import read_png_parameters
from sdrepl.core.prompt import StaticLookup


def job(n: int, seed: int = 40, sampler: str = "Euler a") -> GenerationJob:
    return GenerationJob("a photo of a tree", "blurry", 2, 7.0, seed, 32, 32, sampler, n, 1)


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_n_pictures_are_one_batch_and_each_is_its_seed_alone(tiny_model, tmp_path, monkeypatch):
    batches = []
    original = batching.in_batches

    def spy(seeds, size, run):
        batches.append(size)
        return original(seeds, size, run)

    monkeypatch.setattr(batching, "in_batches", spy)
    together = run_generation(tiny_model, StaticLookup(), job(3), OutputFolder(tmp_path / "a"))
    assert batches == [3]
    assert [image["seed"] for image in together["images"]] == [40, 41, 42]
    for index, image in enumerate(together["images"]):
        alone = run_generation(tiny_model, StaticLookup(), job(1, 40 + index), OutputFolder(tmp_path / "b"))
        assert np.array_equal(pixels(image["path"]), pixels(alone["images"][0]["path"])), index
        assert f"Seed: {40 + index}," in read_png_parameters(image["path"])


def test_a_batch_that_runs_out_of_memory_is_halved(monkeypatch):
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    sizes = []

    def run(seeds):
        sizes.append(len(seeds))
        if len(seeds) > 2:
            raise oom("CUDA out of memory")
        return [s * 10 for s in seeds]

    got = list(batching.in_batches([1, 2, 3, 4, 5], 5, run))
    assert sizes == [5, 2, 2, 1]
    assert [seeds for seeds, _ in got] == [[1, 2], [3, 4], [5]]
    assert [r for _, result in got for r in result] == [10, 20, 30, 40, 50]
    with pytest.raises(ValueError):
        list(batching.in_batches([1], 1, lambda seeds: (_ for _ in ()).throw(ValueError("other"))))


def test_the_batch_size_follows_free_device_memory(monkeypatch):
    class Model:
        device = torch.device("cuda")
        dtype = torch.float16
        family = "sd1"

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 2**30, 16 * 2**30))
    roomy = batching.pictures_per_batch(Model(), 512, 512, 16)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 * 2**30, 16 * 2**30))
    tight = batching.pictures_per_batch(Model(), 512, 512, 16)
    assert 1 <= tight < roomy <= 16
    assert batching.pictures_per_batch(Model(), 512, 512, 1) == 1


def test_png_files_are_written_off_the_device_thread_and_waited_for(tiny_model, tmp_path, monkeypatch):
    from sdrepl.core import outputs as outputs_module

    writers = []
    gate = threading.Event()
    original = outputs_module.OutputFolder.save

    def slow_save(self, write, seed):
        writers.append(threading.current_thread().name)
        gate.wait(30)
        return original(self, write, seed)

    monkeypatch.setattr(outputs_module.OutputFolder, "save", slow_save)
    pending = start_generation(tiny_model, StaticLookup(), job(2), OutputFolder(tmp_path / "out"))
    # The device work returned although no file is written yet: the writer thread holds them.
    assert not list((tmp_path / "out").rglob("*.png"))
    gate.set()
    result = pending.wait()
    assert all(name.startswith("sdrepl-png") for name in writers) and len(writers) == 2
    paths = [image["path"] for image in result["images"]]
    assert [p.rsplit("/", 1)[1].split("-")[0] for p in paths] == ["00001", "00002"]
    assert all(pixels(p).shape == (32, 32, 3) for p in paths)
