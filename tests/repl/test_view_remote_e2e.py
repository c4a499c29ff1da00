"""``!train plot`` against a remote (TLS) daemon: the loss plot's bytes come over the protocol, by NAME only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_testing import daemon_env, make_daemon, short_dir
from PIL import Image

from sdrepl.daemon.auth import endpoint_from_file
from sdrepl.daemon.client import RemoteError, request_sync

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def remote():
    root = short_dir("sdr-pvr-")
    proc = make_daemon(root, extra_args=["--listen", "127.0.0.1:0"])
    logs = root / "textual_inversion"
    for day, colour in (("2026-11-30", "red"), ("2026-12-01", "blue")):  # two runs of cat: the newest wins
        (logs / day / "cat").mkdir(parents=True)
        Image.new("RGB", (80, 40) if colour == "blue" else (10, 10), colour).save(logs / day / "cat" / "loss.png")
        os.utime(logs / day / "cat" / "loss.png", (time.time() - (10 if colour == "red" else 0),) * 2)
    (logs / "2026-12-01" / "evil").mkdir()
    (logs / "2026-12-01" / "evil" / "loss.png").symlink_to(logs / "2026-12-01" / "cat" / "loss.png")
    try:
        proc.start(cwd=root)
        proc.wait_remote()
        yield proc, root
    finally:
        proc.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_a_remote_scripted_session_gets_the_plot_by_name(remote):
    proc, root = remote
    client_dir = short_dir("sdr-pvc-")
    try:
        env = {k: v for k, v in daemon_env().items() if not k.startswith("SDREPL_")}
        done = subprocess.run([sys.executable, "-m", "sdrepl", "--connect", str(proc.settings.remote_connection_file),
                               "--json", "--socket", str(client_dir / "none.sock")],
                              input="!train plot cat\n!train plot\n!train plot evil\n", capture_output=True, text=True,
                              timeout=120, cwd=client_dir, env=env)
        first, second, third = (json.loads(line) for line in done.stdout.splitlines())
        assert first["ok"], first
        assert first["plot"]["path"] == str(root / "textual_inversion" / "2026-12-01" / "cat" / "loss.png")
        assert (first["plot"]["width"], first["plot"]["height"], first["plot"]["step"]) == (80, 40, None)
        assert not second["ok"] and "no training job" in second["error"]["message"]
        assert not third["ok"] and third["error"]["type"] == "TrainingError"  # a link is never followed
        assert "\x1b" not in done.stdout
    finally:
        shutil.rmtree(client_dir, ignore_errors=True)


@pytest.mark.parametrize("params", [{"name": "../cat"}, {"name": "cat/../../x"}, {"path": "/etc/passwd"},
                                    {"name": 3}])
def test_train_plot_takes_a_name_never_a_path(remote, params):
    proc, _ = remote
    with pytest.raises(RemoteError) as caught:
        request_sync(endpoint_from_file(proc.settings.remote_connection_file), "train_plot", timeout=10.0, **params)
    assert caught.value.type_name in ("TrainingError", "BadRequest")


def test_train_plot_over_the_unix_socket_too(remote):
    proc, _ = remote
    reply = request_sync(proc.socket, "train_plot", timeout=10.0, name="cat")
    assert reply["name"] == "cat" and reply["size"] == len(Path(reply["path"]).read_bytes())
