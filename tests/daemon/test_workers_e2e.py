"""One worker per device (issue 16): ``--device cpu,cpu`` serves generations from one queue on two workers."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from daemon_testing import DaemonProcess, make_daemon, run, short_dir
from PIL import Image

from sdrepl.core.errors import UsageError
from sdrepl.daemon.workers import parse_devices


@pytest.fixture(scope="module")
def two_workers() -> Iterator[DaemonProcess]:
    root = short_dir()
    proc = make_daemon(root, extra_args=["--device", "cpu,cpu"])
    try:
        yield proc.start()
    finally:
        proc.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_eight_concurrent_generations_use_both_workers(two_workers: DaemonProcess) -> None:
    async def scenario() -> list[dict]:
        async with two_workers.client() as client:
            status = await client.request("status")
            assert [w["device"] for w in status["workers"]] == ["cpu", "cpu"]
            requests = [client.request("generate", prompt="a green tree", steps=3, width=64, height=64,
                                       seed=100 + i % 2) for i in range(8)]
            return list(await asyncio.gather(*requests))

    results = run(scenario(), timeout=300)
    workers = [r["worker"] for r in results]
    assert set(workers) == {"0:cpu", "1:cpu"}, workers  # both used, each request on exactly one
    pixels: dict[int, list[np.ndarray]] = {}
    for result in results:
        (image,) = result["images"]
        with Image.open(image["path"]) as picture:
            picture.load()
            assert picture.size == (64, 64) and "a green tree" in picture.info["parameters"]
            pixels.setdefault(result["seed"], []).append(np.asarray(picture))
    assert len({Path(r["images"][0]["path"]) for r in results}) == 8  # no picture overwrote another
    for seed, same in pixels.items():  # the same seed gives the same picture on either worker
        assert all(np.array_equal(same[0], other) for other in same[1:]), seed


def test_device_lists() -> None:
    assert parse_devices("cpu,cpu") == ["cpu", "cpu"]
    assert parse_devices(" cuda:0, cuda:1 ") == ["cuda:0", "cuda:1"]
    assert parse_devices("auto") == ["auto"]
    for bad in ("cpu,", "auto,cpu"):
        with pytest.raises(UsageError):
            parse_devices(bad)


def test_pool_serves_in_arrival_order_and_cancels_a_waiting_request() -> None:
    """Six requests on two workers: each on one worker, all workers free again after, a cancelled one
    waiting for a worker fails with Cancelled and loses no worker."""
    import threading
    import time

    from sdrepl.daemon.protocol import Cancelled
    from sdrepl.daemon.worker import DeviceWorker
    from sdrepl.daemon.workers import WorkerPool

    class Model:
        name = "tiny"

    async def scenario() -> list:
        first = DeviceWorker()
        first.start()
        pool = WorkerPool(first, "cpu", spec="tiny")
        pool.add("cpu", Model())
        try:
            events = [threading.Event() for _ in range(6)]
            tasks = [asyncio.create_task(pool.run(lambda model, i=i: (time.sleep(0.05), i)[1], Model(), events[i]))
                     for i in range(6)]
            await asyncio.sleep(0.01)
            events[5].set()
            outcome = await asyncio.gather(*tasks, return_exceptions=True)
            assert pool._queue().qsize() == 2  # both workers free again
            return outcome
        finally:
            first.stop()
            pool.stop(1.0)

    outcome = asyncio.run(scenario())
    assert isinstance(outcome[5], Cancelled)
    assert [value for value, _ in outcome[:5]] == [0, 1, 2, 3, 4]
    assert {slot.index for _, slot in outcome[:5]} == {0, 1}


def test_a_worker_that_cannot_load_the_new_model_is_retired_and_its_request_served_elsewhere() -> None:
    """!model tiny-sd2 with a second device that fails to load it: the request runs on worker 0, the
    failed worker is retired with its reason (status shows it), and nothing waits forever."""
    import threading

    from sdrepl.daemon.worker import DeviceWorker
    from sdrepl.daemon.workers import WorkerPool

    loads: list[tuple[str, str]] = []

    def loader(spec: str, device: str) -> object:
        loads.append((spec, device))
        raise MemoryError("CUDA out of memory (pretend)")

    async def scenario() -> list:
        first = DeviceWorker()
        first.start()
        pool = WorkerPool(first, "cpu", spec="tiny", loader=loader)
        pool.add("cpu", "old model")
        try:
            pool.switched("tiny-sd2")
            outcome = [await pool.run(lambda model: model, "new model", threading.Event()) for _ in range(3)]
            return [outcome, pool.describe()]
        finally:
            first.stop()
            pool.stop(1.0)

    outcome, described = asyncio.run(scenario())
    assert [(value, slot.index) for value, slot in outcome] == [("new model", 0)] * 3
    assert loads == [("tiny-sd2", "cpu")]  # one try, then retired
    assert described[1]["model"] is None and "could not load model tiny-sd2" in described[1]["retired"]


def test_model_switch_reaches_every_worker(two_workers: DaemonProcess) -> None:
    """Last in this module (it changes the shared daemon's model): after !model every device serves the
    new model; each picture says so, and a seed gives the same picture on either device."""
    async def scenario() -> tuple[dict, list[dict]]:
        async with two_workers.client() as client:
            switched = await client.request("model", model="tiny-sd2")
            requests = [client.request("generate", prompt="a red house", steps=2, width=64, height=64,
                                       seed=7 + i % 2) for i in range(6)]
            results = list(await asyncio.gather(*requests))
            return switched, results, await client.request("status")

    switched, results, status = run(scenario(), timeout=300)
    assert "tiny-sd2" in str(switched["model"])
    assert {r["worker"] for r in results} == {"0:cpu", "1:cpu"}
    assert [w.get("model") for w in status["workers"]] == [None, "tiny-sd2"]
    pixels: dict[int, list[np.ndarray]] = {}
    for result in results:
        (image,) = result["images"]
        with Image.open(image["path"]) as picture:
            picture.load()
            assert "Model: tiny-sd2" in picture.info["parameters"], picture.info["parameters"]
            pixels.setdefault(result["seed"], []).append(np.asarray(picture))
    for seed, same in pixels.items():
        assert all(np.array_equal(same[0], other) for other in same[1:]), seed
