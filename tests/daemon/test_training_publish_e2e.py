"""A run whose final file could not be written is finished by ``!train NAME --resume`` (a real daemon).

The final write is made to fail as a user's disk would make it fail (here: a folder squats the final
file's name); the job fails with a message that says the run can be resumed, and once the obstacle is
gone, ``--resume`` writes the file from the last checkpoint without training a step.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from daemon_testing import daemon_env, make_daemon
from PIL import Image, ImageDraw

from sdrepl.core.formats import read_embedding
from sdrepl.core.training.checkpoint import load_checkpoint

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def make_pictures(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, color in enumerate([(230, 30, 30), (30, 200, 60), (40, 60, 230), (128, 128, 128)]):
        image = Image.new("RGB", (64, 64), (255, 255, 255))
        ImageDraw.Draw(image).rectangle([8, 8, 56, 56], fill=color)
        image.save(folder / f"{i + 1:06d}-0-a square shape.png")


def scripted(d, cwd: Path, script: str) -> list[dict]:
    options = ["--socket", str(d.socket), "--model", "tiny", "--device", "cpu", "--dtype", "fp32",
               "--embeddings", str(d.embeddings), "--outputs", str(d.outputs), "--json"]
    done = subprocess.run([sys.executable, "-m", "sdrepl", *options], input=script, text=True, capture_output=True,
                          cwd=cwd, env=daemon_env(), timeout=400)
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def test_resume_publishes_a_finished_run_whose_final_write_failed(short_tmp: Path) -> None:
    make_pictures(short_tmp / "data")
    log = short_tmp / "log"
    d = make_daemon(short_tmp).start(cwd=short_tmp)
    try:
        blocker = d.embeddings / "shapes.safetensors"
        blocker.mkdir()  # the final write cannot replace a folder
        first = scripted(d, short_tmp, f"!train shapes --data {short_tmp / 'data'} --steps 3 --save-every 0 "
                                       f"--preview-every 0 --log-dir {log} --seed 5 --overwrite --wait\n")
        failure = first[-1]
        assert failure["ok"] is False, first
        message = failure["error"]["message"]
        assert "could not save the result" in message and "--resume" in message and "Traceback" not in message
        assert load_checkpoint(log / "checkpoint.pt")["step"] == 3
        blocker.rmdir()
        second = scripted(d, short_tmp, f"!train shapes --resume --log-dir {log} --wait\n<shapes> --steps 1 --seed 1\n")
        assert [o["ok"] for o in second] == [True, True], json.dumps(second)[:1500]
        assert second[0]["job"]["state"] == "done" and second[0]["embedding"]["steps"] == 3, second[0]
        rows = list(csv.reader((log / "loss.csv").read_text(encoding="utf-8").splitlines()))
        assert [int(r[0]) for r in rows[1:]] == [1, 2, 3]  # nothing trained again
        published = read_embedding(d.embeddings / "shapes.safetensors")
        assert torch.equal(next(iter(published.vectors.values())), load_checkpoint(log / "checkpoint.pt")["vectors"])
    finally:
        d.stop()
