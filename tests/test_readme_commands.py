"""README command 1 (`make run`) with stdin not a terminal runs a scripted session on tiny.

CI reaches this through README command 2 (`make test`), which has set up ``.venv`` already, so `make run`
does no setup here; it starts a daemon in the background, runs the piped line and leaves the daemon up,
which the test then stops.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.e2e


def test_make_run_with_a_piped_line_writes_a_png(tmp_path: Path) -> None:
    if not (REPO / ".venv" / "bin" / "python").exists():
        pytest.fail("README command 1 needs the environment README command 2 sets up (.venv is missing)")
    if shutil.which("make") is None:
        pytest.fail("`make` is not installed, so README's commands cannot run")
    sock_dir = Path(f"/tmp/sdr-readme-{os.getpid()}")
    sock_dir.mkdir(mode=0o700, exist_ok=True)
    sock, outputs = sock_dir / "s.sock", tmp_path / "outputs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDREPL_") or k == "SDREPL_SHARED"}
    env["OMP_NUM_THREADS"] = "1"
    try:
        done = subprocess.run(["make", "-s", "run", f"ARGS=--socket {sock} --outputs {outputs}"], cwd=REPO,
                              input="a red fox --steps 2\n", text=True, capture_output=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        pictures = list(outputs.rglob("*.png"))
        printed = (REPO / done.stdout.split()[0]).resolve()  # the session prints the picture's path first
        assert pictures == [printed], done.stdout
    finally:
        subprocess.run([sys.executable, "-m", "sdrepl", "stop", "--socket", str(sock)], env=env,
                       capture_output=True, timeout=60)
        shutil.rmtree(sock_dir, ignore_errors=True)
