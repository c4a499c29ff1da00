"""img2img and hires fix against one real daemon serving a Unix socket, TLS for remote clients, and two
CPU workers (``--listen 127.0.0.1:0 --device cpu,cpu``).

- a remote scripted session's ``--init`` picture is sent (the daemon cannot read the client's disk), the
  pictures come home, and the picture equals the one a local client makes from the same file;
- a remote protocol client naming a daemon-side path as ``init`` is refused; uploads do not pile up;
- both workers make the same img2img and hires pictures for a seed;
- bad requests (a missing picture, a non-picture, values out of range) are answered clearly and the
  daemon keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from daemon_testing import DaemonProcess, daemon_env, make_daemon, run, short_dir
from PIL import Image

from sdrepl.daemon.auth import endpoint_from_file
from sdrepl.daemon.client import DaemonClient, RemoteError

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GEN = {"prompt": "a red cube", "steps": 4, "seed": 21}


@pytest.fixture(scope="module")
def served() -> Iterator[DaemonProcess]:
    root = short_dir()
    proc = make_daemon(root, extra_args=["--listen", "127.0.0.1:0", "--device", "cpu,cpu"])
    x = np.linspace(0, 255, 64, dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(x, (64, 1)), np.tile(x[:, None], (1, 64)), np.full((64, 64), 80, np.uint8)],
                             axis=2)).save(root / "init.png")
    try:
        proc.start(cwd=root)
        proc.wait_remote()
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(root, ignore_errors=True)


def pixels(path: str | Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_a_remote_session_sends_its_init_picture(served: DaemonProcess) -> None:
    client_dir = short_dir("sdc-")
    try:
        shutil.copy(served.root / "init.png", client_dir / "mine.png")
        env = {k: v for k, v in daemon_env().items() if not k.startswith("SDREPL_")}
        proc = subprocess.run([sys.executable, "-m", "sdrepl", "--connect", str(served.settings.remote_connection_file),
                               "--json", "--socket", str(client_dir / "none.sock")],
                              input="a red cube --steps 4 --seed 21 --init mine.png --strength 0.5\n"
                                    "a red cube --init gone.png\n",
                              capture_output=True, text=True, timeout=180, cwd=client_dir, env=env)
        sent, missing = (json.loads(line) for line in proc.stdout.splitlines())
        assert sent["ok"], sent
        assert sent["init"] == str(client_dir / "mine.png") and sent["strength"] == 0.5
        local = Path(sent["images"][0]["path"])
        assert local.is_relative_to(client_dir / "outputs") and Image.open(local).size == (64, 64)
        assert not missing["ok"] and "gone.png: no such file here" in missing["error"]["message"]

        async def locally() -> dict:
            async with served.client() as client:
                return await client.request("generate", **GEN, init=str(served.root / "init.png"), strength=0.5)

        reference = run(locally(), timeout=120)
        assert np.array_equal(pixels(local), pixels(reference["images"][0]["path"]))
        assert reference["init"] == str(served.root / "init.png")
    finally:
        shutil.rmtree(client_dir, ignore_errors=True)


def test_a_remote_client_may_not_name_a_daemon_path_and_uploads_are_removed(served: DaemonProcess) -> None:
    async def scenario() -> tuple[str, dict]:
        client = await DaemonClient.connect(endpoint_from_file(served.settings.remote_connection_file), timeout=10)
        try:
            with pytest.raises(RemoteError) as refused:
                await client.request("generate", **GEN, init=str(served.root / "init.png"))
            from sdrepl.repl.uploads import upload_init

            for _ in range(6):  # more than an idle connection may hold: each is removed once read
                token = await upload_init(client, served.root / "init.png")
                result = await client.request("generate", **{**GEN, "steps": 2}, init=token, strength=0.5)
            return refused.value.type_name + ": " + str(refused.value), result
        finally:
            await client.close()

    message, result = run(scenario(), timeout=180)
    assert message.startswith("RemotePathRefused") and "--init IMAGE` sends a local picture" in message
    assert result["init"] == "init.png" and result["strength"] == 0.5


def test_both_workers_make_the_same_img2img_and_hires_pictures(served: DaemonProcess) -> None:
    init = str(served.root / "init.png")

    async def scenario() -> list[dict]:
        async with served.client() as client:
            requests = [client.request("generate", **GEN, init=init, strength=0.75, width=32, height=32)
                        for _ in range(4)]
            requests += [client.request("generate", **GEN, width=32, height=32, hires=2, hires_steps=2,
                                        hires_upscaler="lanczos") for _ in range(4)]
            return list(await asyncio.gather(*requests))

    results = run(scenario(), timeout=300)
    assert {r["worker"] for r in results} == {"0:cpu", "1:cpu"}
    for group in (results[:4], results[4:]):
        first = pixels(group[0]["images"][0]["path"])
        assert all(np.array_equal(first, pixels(r["images"][0]["path"])) for r in group[1:])
    assert pixels(results[4]["images"][0]["path"]).shape == (64, 64, 3)
    assert results[4]["hires"]["upscaler"] == "lanczos"


@pytest.mark.parametrize(("params", "kind", "needle"), [
    ({"init": "/nonexistent/x.png"}, "InitImageError", "x.png: no such file"),
    ({"init": "/etc/hostname"}, "InitImageError", "not a picture"),
    ({"init": 7}, "BadRequest", "'init' must be a string"),
    ({"init": "INIT", "strength": 1.5}, "BadRequest", "'strength' must be between 0.0 and 1.0"),
    ({"strength": 0.5}, "BadRequest", "give 'init'"),
    ({"hires": 4.5}, "BadRequest", "'hires' must be between 1.0 and 4.0"),
    ({"hires_steps": 3}, "BadRequest", "give 'hires'"),
    ({"hires": 2, "hires_upscaler": "ESRGAN"}, "BadRequest", "latent, lanczos"),
    ({"hires": 2, "width": 8192, "height": 64}, "BadRequest", "use a scale up to 1.00"),
])
def test_bad_requests_are_answered_and_the_daemon_keeps_serving(served: DaemonProcess, params, kind, needle) -> None:
    params = {k: (str(served.root / "init.png") if v == "INIT" else v) for k, v in params.items()}

    async def scenario() -> RemoteError:
        async with served.client() as client:
            with pytest.raises(RemoteError) as caught:
                await client.request("generate", **GEN, **params)
            assert await client.request("ping") == {}
            return caught.value

    error = run(scenario(), timeout=60)
    assert error.type_name == kind and needle in str(error), str(error)
