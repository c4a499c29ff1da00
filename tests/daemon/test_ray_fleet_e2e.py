"""A fleet on Ray Serve (issue 16): ``serve --ray auto --ray-replicas 2`` serves generations on two replicas.

One local Ray (started and stopped by the daemon itself: ``auto``) for the whole module, two CPU replicas of
the tiny model; a plain daemon beside it is the single local worker the pictures are compared with.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from daemon_testing import DaemonProcess, make_daemon, run, short_dir
from fixture_paths import A1111
from lora_files import kohya_file
from PIL import Image

from sdrepl.core.errors import UsageError
from sdrepl.core.pnginfo import parse_parameters, read_png_parameters
from sdrepl.daemon.client import RemoteError
from sdrepl.daemon.fleet import Replicas, parse_replicas

pytest.importorskip("ray.serve")  # the [ray] extra; scripts/setup.sh installs it

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GEN = {"steps": 2, "width": 64, "height": 64, "cfg": 5.0}


def _children(pid: int) -> dict[int, str]:
    """Every descendant process of ``pid`` and its command line (from /proc)."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            names[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        current = todo.pop()
        for child, parent in parents.items():
            if parent == current and child not in found:
                found[child] = names.get(child, "")
                todo.append(child)
    return found


def sha12(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def fleet() -> Iterator[DaemonProcess]:
    from sdrepl.core.tiny import build_tiny

    root = short_dir()
    proc = make_daemon(root, extra_args=["--ray", "auto", "--ray-replicas", "2"])
    loras = root / "loras"
    loras.mkdir()
    kohya_file(loras / "one.safetensors", build_tiny("tiny"), seed=1)
    try:
        yield proc.start()
    finally:
        proc.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def local(fleet: DaemonProcess) -> Iterator[DaemonProcess]:
    root = short_dir()
    proc = make_daemon(root)
    shutil.copytree(fleet.root / "loras", root / "loras")
    try:
        yield proc.start()
    finally:
        proc.stop()
        shutil.rmtree(root, ignore_errors=True)


def _pixels(result: dict) -> np.ndarray:
    (image,) = result["images"]
    with Image.open(image["path"]) as picture:
        picture.load()
        return np.asarray(picture)


def test_eight_concurrent_generations_on_two_replicas_match_a_local_worker(fleet: DaemonProcess,
                                                                           local: DaemonProcess) -> None:
    prompts = ["a green tree", "a cat <lora:one:0.8>"]

    async def scenario() -> tuple[dict, list[dict], list[dict], dict]:
        async with fleet.client() as client:
            status = await client.request("status")
            requests = [client.request("generate", prompt=prompts[i % 2], seed=100 + i % 4, **GEN) for i in range(8)]
            results = list(await asyncio.gather(*requests))
            after = await client.request("status")
        async with local.client() as client:
            reference = [await client.request("generate", prompt=prompts[i % 2], seed=100 + i % 4, **GEN)
                         for i in range(4)]
        return status, results, reference, after

    status, results, reference, after = run(scenario(), timeout=300)
    assert status["ray"]["replicas"] == "2" and status["ray"]["device"] == "cpu"
    from sdrepl.core.status_text import format_status

    assert "ray fleet:  auto (local), 2 replica(s) on cpu" in format_status(status)
    workers = {r["worker"] for r in results}
    assert len(workers) == 2 and all(w.startswith("ray:") for w in workers), workers  # both replicas used
    assert sum(w["generations"] for w in after["workers"]) == 8
    assert len({r["images"][0]["path"] for r in results}) == 8  # the daemon wrote every picture, none overwritten
    for result in results:
        assert Path(result["images"][0]["path"]).parent.parent == fleet.outputs
    for i, result in enumerate(results):  # the same picture as the single local worker, LoRA included
        expected = reference[i % 4]
        assert np.array_equal(_pixels(result), _pixels(expected)), (i, result["worker"])
        fields = parse_parameters(read_png_parameters(result["images"][0]["path"]))
        assert fields == parse_parameters(read_png_parameters(expected["images"][0]["path"]))
    assert results[1]["loras"] == reference[1]["loras"] != []


def test_img2img_and_hires_on_the_replicas_match_a_local_worker(fleet: DaemonProcess, local: DaemonProcess,
                                                                 tmp_path: Path) -> None:
    """The daemon reads the init picture and sends it with the job: replicas need no shared folder."""
    x = np.linspace(0, 255, 64, dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(x, (64, 1))] * 3, axis=2)).save(tmp_path / "init.png")
    jobs = [{"init": str(tmp_path / "init.png"), "strength": 0.5, **GEN},
            {**GEN, "width": 32, "height": 32, "hires": 2, "hires_upscaler": "lanczos"}]

    async def scenario(proc: DaemonProcess) -> list[dict]:
        async with proc.client() as client:
            return [await client.request("generate", prompt="a cat <lora:one:0.8>", seed=7, **job) for job in jobs]

    on_fleet = run(scenario(fleet), timeout=300)
    reference = run(scenario(local), timeout=300)
    assert all(r["worker"].startswith("ray:") for r in on_fleet)
    for got, expected in zip(on_fleet, reference, strict=True):
        assert np.array_equal(_pixels(got), _pixels(expected))
        assert got.get("hires") == expected.get("hires") and got.get("strength") == expected.get("strength")
    assert _pixels(on_fleet[1]).shape[:2] == (64, 64)


def test_an_embedding_dropped_in_is_usable_on_the_replicas_within_a_second(fleet: DaemonProcess) -> None:
    async def scenario() -> tuple[float, list[dict]]:
        async with fleet.client() as client:
            shutil.copy(A1111 / "bad-artist.pt", fleet.embeddings / "dropped.pt")
            dropped = time.monotonic()
            while True:  # the first generation that reads the new file, made on a replica
                try:
                    first = await client.request("generate", prompt="a cat by <dropped>", seed=5, **GEN)
                    usable = time.monotonic() - dropped
                    break
                except RemoteError as exc:
                    assert "dropped" in str(exc) and time.monotonic() - dropped < 10, exc
                    await asyncio.sleep(0.02)
            results = await asyncio.gather(*[client.request("generate", prompt="a cat by <dropped>", seed=6 + i, **GEN)
                                             for i in range(3)])
            return usable, [first, *results]

    usable, results = run(scenario(), timeout=200)
    assert usable < 1.0, usable
    assert len({r["worker"] for r in results}) == 2
    for result in results:  # the replica's conditioning used the new file's vectors
        fields = parse_parameters(read_png_parameters(result["images"][0]["path"]))
        assert fields["ti_hashes"] == {"dropped": sha12(A1111 / "bad-artist.pt")}, fields


def test_replica_ranges() -> None:
    assert parse_replicas("2") == Replicas(2, 2)
    assert parse_replicas("0-4") == Replicas(0, 4) and not parse_replicas("1-3").fixed
    for bad in ("0", "3-1", "x", "1-"):
        with pytest.raises(UsageError):
            parse_replicas(bad)


def test_model_switch_replaces_the_replicas(fleet: DaemonProcess, local: DaemonProcess) -> None:
    """!model on a fleet: Serve rolls both replicas over to the new model; their pictures are the new
    model's (the local daemon switched the same way makes the same pixels). Just before the stop test."""
    async def scenario() -> tuple[list[dict], dict]:
        async with fleet.client() as client:
            await client.request("model", model="tiny-sd2")
            results = list(await asyncio.gather(*[client.request("generate", prompt="a blue boat", seed=3 + i,
                                                                 **GEN) for i in range(4)]))
        async with local.client() as client:
            await client.request("model", model="tiny-sd2")
            reference = await client.request("generate", prompt="a blue boat", seed=3, **GEN)
        return results, reference

    results, reference = run(scenario(), timeout=300)
    assert all(r["worker"].startswith("ray:") for r in results)
    for result in results:
        assert "Model: tiny-sd2" in read_png_parameters(result["images"][0]["path"])
    assert np.array_equal(_pixels(results[0]), _pixels(reference))
    assert fleet.proc is not None
    deadline = time.monotonic() + 60  # the old version's replicas finish stopping
    while time.monotonic() < deadline:
        replicas = [pid for pid, cmd in _children(fleet.proc.pid).items() if "ServeReplica" in cmd]
        if len(replicas) == 2:
            break
        time.sleep(0.2)
    assert len(replicas) == 2, replicas


def test_stopping_the_daemon_shuts_the_deployment_down(fleet: DaemonProcess, local: DaemonProcess) -> None:
    """Last in the module: the daemon's own Ray (replicas, controller, raylet) is gone once it stopped."""
    assert fleet.proc is not None
    processes = _children(fleet.proc.pid)
    replicas = [pid for pid, cmd in processes.items() if "ServeReplica" in cmd]
    assert len(replicas) == 2, processes
    assert fleet.stop() == 0
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in processes if _alive(pid)], {p: c for p, c in processes.items() if _alive(p)}
    assert "deployment sdrepl-generation deleted" in fleet.log()


@dataclass
class _Emb:
    """Just what a lookup reads of an embedding (picklable: module level)."""

    trigger: str = "cat-toy"
    qualified: str = "cat-toy"
    key: str = "cat-toy"


def test_a_snapshot_lookup_travels_with_what_the_prompt_used() -> None:
    import pickle

    from sdrepl.core.prompt import StaticLookup
    from sdrepl.daemon.fleet_replica import SnapshotLookup

    library = StaticLookup([_Emb()])  # type: ignore[list-item]
    lookup = SnapshotLookup(library)
    assert lookup.get("Cat-Toy") is not None and lookup.get("missing") is None
    sent = pickle.loads(pickle.dumps(lookup))
    assert sent.get("cat-toy").trigger == "cat-toy" and sent.get("missing") is None
    assert sent.get("never-asked") is None and sent.triggers() == library.triggers()


def test_after_a_model_switch_the_fleet_refuses_with_a_clear_error() -> None:
    import threading

    from sdrepl.core.errors import ModelError
    from sdrepl.daemon.fleet import RayFleet

    class Model:
        name = "other-model"

    fleet = RayFleet("auto", Replicas(1, 1), None)
    fleet.start_model_name = "tiny"
    with pytest.raises(ModelError, match="replicas hold tiny.*--model other-model"):
        run(fleet.run(None, None, None, None, threading.Event(), Model()))  # type: ignore[arg-type]
