"""A finished run is only done when its final file is published; a full disk is a user's condition.

- The final checkpoint is written before the final file; when that write fails (disk full) or the process
  dies in between, ``--resume`` writes the final file from the checkpoint without training another step,
  and the file holds exactly the vectors of an uninterrupted run. Once published, ``--resume`` refuses.
- A full log folder while saving a checkpoint is an ``OSError`` naming "no space left" (torch's own file
  writer reported it as ``RuntimeError: [enforce fail at inline_container.cc]``), and the previous
  checkpoint stays intact.
"""

from __future__ import annotations

import csv
import errno
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from sdrepl.core import atomic
from sdrepl.core.errors import EmbeddingError, TrainingError
from sdrepl.core.formats import read_embedding
from sdrepl.core.training import checkpoint as checkpoint_module
from sdrepl.core.training.checkpoint import load_checkpoint
from sdrepl.core.training.options import TrainOptions
from sdrepl.core.training.plan import plan_run
from sdrepl.core.training.trainer import Trainer

STEPS = 3


def make_pictures(folder: Path) -> None:
    """Four 64x64 pictures of colored shapes, named A1111-style ([filewords] gives 'a red circle' etc.)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, color) in enumerate({"red": (230, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230),
                                       "grey": (128, 128, 128)}.items()):
        image = Image.new("RGB", (64, 64), (255, 255, 255))
        shape = "circle" if i % 2 else "square"
        (ImageDraw.Draw(image).ellipse if i % 2 else ImageDraw.Draw(image).rectangle)([6, 8, 54, 56], fill=color)
        image.save(folder / f"{i + 1:06d}-0-a {name} {shape}.png")


def run_to_end(model, root: Path, log: str) -> Trainer:
    options = TrainOptions.from_params({"name": "shapes", "data": str(root / "data"), "seed": 7, "steps": STEPS,
                                        "save_every": 0, "preview_every": 0, "log_dir": str(root / log)})
    trainer = Trainer(model, plan_run(model, options, embeddings_dir=root / log / "emb", cwd=root))
    while not trainer.finished:
        trainer.step()
    return trainer


def resume(model, root: Path, log: str) -> Trainer:
    options = TrainOptions.from_params({"name": "shapes", "resume": True, "log_dir": str(root / log)})
    return Trainer(model, plan_run(model, options, embeddings_dir=root / log / "emb", cwd=root))


def no_space_for(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Writes of files called ``name`` fail as on a full disk."""
    real = atomic.atomic_write_bytes

    def write(path, data, *, overwrite=True):
        if Path(path).name == name:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data, overwrite=overwrite)

    monkeypatch.setattr("sdrepl.core.formats.writers.atomic_write_bytes", write)
    monkeypatch.setattr(checkpoint_module, "atomic_write_bytes", write)


def loss_rows(root: Path, log: str) -> list[int]:
    rows = list(csv.reader((root / log / "loss.csv").read_text(encoding="utf-8").splitlines()))
    return [int(r[0]) for r in rows[1:]]


@pytest.fixture(scope="module")
def straight(tiny_model, tmp_path_factory):
    """An uninterrupted run's final vectors."""
    root = tmp_path_factory.mktemp("straight")
    make_pictures(root / "data")
    trainer = run_to_end(tiny_model, root, "log")
    path = trainer.finish()
    trainer.close()
    return read_embedding(path).vectors


def test_a_failed_final_write_is_completed_by_resume(tiny_model, tmp_path, monkeypatch, straight) -> None:
    make_pictures(tmp_path / "data")
    trainer = run_to_end(tiny_model, tmp_path, "log")
    with monkeypatch.context() as patch:
        no_space_for(patch, "shapes.safetensors")
        with pytest.raises(EmbeddingError, match="no space left on the disk holding"):
            trainer.finish()
    trainer.close()
    assert load_checkpoint(tmp_path / "log" / "checkpoint.pt")["step"] == STEPS
    assert not (tmp_path / "log" / "emb" / "shapes.safetensors").exists()

    again = resume(tiny_model, tmp_path, "log")
    assert again.plan.publish_only and again.finished and again.step_count == STEPS
    assert any("no further training" in note for note in again.notes)
    path = again.finish()
    again.close()
    assert loss_rows(tmp_path, "log") == [1, 2, 3]  # no step was trained again
    published = read_embedding(path)
    assert published.step == STEPS
    assert all(torch.equal(published.vectors[k], straight[k]) for k in straight)


def test_a_kill_between_checkpoint_and_final_file_is_completed_by_resume(tiny_model, tmp_path, straight) -> None:
    make_pictures(tmp_path / "data")
    trainer = run_to_end(tiny_model, tmp_path, "log")
    trainer.save()  # what finish() does first; the process "dies" before write_final
    trainer.close()
    again = resume(tiny_model, tmp_path, "log")
    assert again.plan.publish_only
    published = read_embedding(again.finish())
    again.close()
    assert all(torch.equal(published.vectors[k], straight[k]) for k in straight)
    with pytest.raises(TrainingError, match=f"already at step {STEPS}"):  # published now: nothing to do
        resume(tiny_model, tmp_path, "log")


def test_a_full_log_folder_is_no_space_left_and_keeps_the_last_checkpoint(tiny_model, tmp_path, monkeypatch):
    make_pictures(tmp_path / "data")
    options = TrainOptions.from_params({"name": "shapes", "data": str(tmp_path / "data"), "seed": 7, "steps": 4,
                                        "save_every": 0, "preview_every": 0, "log_dir": str(tmp_path / "log")})
    trainer = Trainer(tiny_model, plan_run(tiny_model, options, embeddings_dir=tmp_path / "emb", cwd=tmp_path))
    trainer.step()
    trainer.save_checkpoint()
    trainer.step()
    no_space_for(monkeypatch, "checkpoint.pt")
    with pytest.raises(OSError) as info:
        trainer.save_checkpoint()
    assert info.value.errno == errno.ENOSPC and "checkpoint.pt" in str(info.value.filename)
    trainer.close()
    assert load_checkpoint(tmp_path / "log" / "checkpoint.pt")["step"] == 1  # the previous one, intact
