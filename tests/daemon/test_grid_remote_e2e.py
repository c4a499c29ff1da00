"""``!grid`` from a remote client (TLS): the grid and every cell land in the client's own outputs folder,
an img2img grid sends its init picture, and the daemon's paths (``--log``) are refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from daemon_testing import DaemonProcess, daemon_env, make_daemon, short_dir
from PIL import Image

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def remote() -> Iterator[DaemonProcess]:
    root = short_dir()
    proc = make_daemon(root, extra_args=["--listen", "127.0.0.1:0"])
    try:
        proc.start(cwd=root)
        proc.wait_remote()
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(root, ignore_errors=True)


def session(remote: DaemonProcess, here: Path, lines: str) -> list[dict]:
    env = {k: v for k, v in daemon_env().items() if not k.startswith("SDREPL_")}
    done = subprocess.run([sys.executable, "-m", "sdrepl", "--connect", str(remote.settings.remote_connection_file),
                           "--json", "--socket", str(here / "none.sock")], input=lines, capture_output=True,
                          text=True, timeout=180, cwd=here, env=env)
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_a_remote_grid_comes_home_with_its_cells(remote, short_tmp):
    here = short_tmp  # the client's folder, on "another machine"
    picture = here / "init.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(picture)
    (here / "logs").mkdir()
    grid, img2img, refused = session(remote, here, "\n".join([
        "!grid a cube --x seed=1,2 --y cfg=3,5 --steps 2 --size 32x32",
        "!grid a cube --x seed=1,2 --init init.png --strength 0.5 --steps 2",
        "!grid a <cat> --x ckpt=cat --log logs --steps 2",
    ]) + "\n")
    assert grid["ok"], grid
    local = Path(grid["grid"]["path"])
    assert local.is_relative_to(here / "outputs") and local.name.endswith("-grid.png")
    assert local.read_bytes() == Path(grid["grid"]["daemon_path"]).read_bytes()
    assert len(grid["cells"]) == 4
    for cell in grid["cells"]:
        assert Path(cell["path"]).is_relative_to(here / "outputs")
        assert Path(cell["path"]).read_bytes() == Path(cell["daemon_path"]).read_bytes()
    assert img2img["ok"], img2img
    assert all(Path(c["path"]).is_file() for c in img2img["cells"])
    assert not refused["ok"] and refused["error"]["type"] == "RemotePathRefused"
    assert "--log" in refused["error"]["message"]
