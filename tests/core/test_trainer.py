"""The training loop on the tiny model (CPU): it learns, logs, resumes bit for bit, stops on NaN, and
changes nothing but the embedding's vectors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from sdrepl.core.embedding import SINGLE, Embedding
from sdrepl.core.errors import TrainingError
from sdrepl.core.formats import read_embedding, write_embedding
from sdrepl.core.training.checkpoint import load_checkpoint
from sdrepl.core.training.options import TrainOptions
from sdrepl.core.training.plan import plan_run
from sdrepl.core.training.trainer import Trainer, TrainingDiverged

COLORS = {"red": (230, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230), "yellow": (240, 220, 40),
          "cyan": (40, 220, 220), "magenta": (220, 40, 200), "grey": (128, 128, 128), "orange": (250, 140, 20)}


def make_pictures(folder: Path) -> Path:
    """Eight 64x64 pictures of colored shapes, named A1111-style so [filewords] gives 'a red circle' etc."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, color) in enumerate(COLORS.items()):
        image = Image.new("RGB", (64, 64), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        shape = "circle" if i % 2 else "square"
        (draw.ellipse if i % 2 else draw.rectangle)([6 + i, 8, 54 - i, 56], fill=color)
        image.save(folder / f"{i + 1:06d}-0-a {name} {shape}.png")
    return folder


def new_trainer(model, root: Path, **params) -> Trainer:
    options = TrainOptions.from_params({"name": "shapes", "data": str(root / "data"), "seed": 1234,
                                        "save_every": 0, "preview_every": 0, **params})
    plan = plan_run(model, options, embeddings_dir=root / "embeddings", cwd=root)
    return Trainer(model, plan)


def snapshot(model) -> dict[str, torch.Tensor]:
    pipe = model.pipe
    return {f"{part}.{k}": v.detach().clone() for part in ("unet", "vae", "text_encoder")
            for k, v in getattr(pipe, part).state_dict().items()}


def eval_loss(trainer: Trainer, vectors: torch.Tensor) -> float:
    """The loss on a fixed set (every picture at fixed timesteps and noise) for ``vectors``."""
    gen = torch.Generator().manual_seed(0)
    latents = torch.stack(trainer.data.latents)
    texts = [f"a photo of a [name], {p.caption}" for p in trainer.data.pictures]
    total = 0.0
    with torch.no_grad():
        cond = trainer.text.encode(texts, vectors)
        for t in (100, 300, 500, 700, 900):
            noise = torch.randn(latents.shape, generator=gen)
            steps = torch.full((len(texts),), t)
            noisy = trainer.noise_scheduler.add_noise(latents, noise, steps)
            pred = trainer.pipe.unet(noisy, steps, encoder_hidden_states=cond).sample
            total += float(torch.nn.functional.mse_loss(pred, noise))
    return total / 5


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """One 50-step run shared by the tests that look at its results."""
    root = tmp_path_factory.mktemp("train")
    make_pictures(root / "data")
    before = snapshot(tiny_model)
    trainer = new_trainer(tiny_model, root, steps=50, lr="0.05", save_every=25, preview_every=25,
                          log_dir=str(root / "log"))
    initial = trainer.current_vectors()
    read = [trainer.step().loss for _ in range(50)]
    final = trainer.finish()
    trainer.close()
    # The loss is read back every --log-every (10) steps and at saves, never per step; loss.csv has them all.
    assert [i + 1 for i, loss in enumerate(read) if loss is not None] == [10, 20, 25, 30, 40, 50]
    rows = list(csv.reader((root / "log" / "loss.csv").read_text(encoding="utf-8").splitlines()))[1:]
    losses = [float(r[2]) for r in rows]
    assert [f"{x:.8f}" for x in (read[9], read[49])] == [rows[9][2], rows[49][2]]
    return {"root": root, "trainer": trainer, "losses": losses, "final": final, "before": before,
            "initial": initial, "after": snapshot(tiny_model)}


def test_fifty_steps_lower_the_loss(trained):
    losses = trained["losses"]
    assert all(math.isfinite(x) for x in losses)
    # The per-step losses are too noisy (random timesteps) to compare over 50 steps; the fixed set is not.
    trainer = trained["trainer"]
    assert eval_loss(trainer, trainer.current_vectors()) < eval_loss(trainer, trained["initial"])


def test_every_log_output_is_written(trained):
    root, log = trained["root"], trained["root"] / "log"
    rows = list(csv.reader((log / "loss.csv").read_text(encoding="utf-8").splitlines()))
    assert rows[0] == ["step", "epoch", "loss", "learning_rate"]
    assert [int(r[0]) for r in rows[1:]] == list(range(1, 51))
    assert float(rows[-1][3]) == 0.05 and int(rows[-1][1]) == 6  # 50 pictures used of 8 a epoch
    settings = json.loads((log / "settings.json").read_text())
    assert settings["seed"] == 1234 and settings["options"]["steps"] == 50 and settings["pictures"] == 8
    for step in (25, 50):
        assert read_embedding(log / "embeddings" / f"shapes-{step}.safetensors").step == step
    assert Image.open(log / "images" / "shapes-25.png").size == (64, 64)
    assert Image.open(log / "images" / "shapes-50.png").size == (64, 64)
    card = read_embedding(log / "images" / "shapes-50.card.png")
    assert card.step == 50 and card.vectors[SINGLE].shape == (1, 768)
    assert load_checkpoint(log / "checkpoint.pt")["step"] == 50
    assert Image.open(log / "loss.png").size == (800, 400)  # redrawn with each snapshot
    assert trained["trainer"].log.recent_losses(5) == pytest.approx(trained["losses"][-5:], abs=1e-7)  # train_status's sparkline
    assert trained["final"] == root / "embeddings" / "shapes.safetensors"
    data = read_embedding(trained["final"])
    assert data.step == 50 and data.init_text == "*"
    assert torch.equal(data.vectors[SINGLE], trained["trainer"].current_vectors())


def test_only_the_vectors_change(trained):
    before, after = trained["before"], trained["after"]
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []
    assert not torch.equal(trained["initial"], trained["trainer"].current_vectors())
    pipe = trained["trainer"].pipe
    assert not any(p.requires_grad for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())


@pytest.mark.parametrize("latents", ["once", "random"])
def test_resume_gives_the_same_vectors_as_an_uninterrupted_run(tiny_model, tmp_path, latents):
    make_pictures(tmp_path / "data")
    params = {"steps": 6, "batch": 2, "flip": True, "shuffle_tags": True, "tag_dropout": 0.3, "latents": latents,
              "filename_regex": r"\w+", "join": ", ", "lr": "0.05:3, 0.02"}
    straight = new_trainer(tiny_model, tmp_path, **params, log_dir=str(tmp_path / "a-log"))
    for _ in range(6):
        straight.step()
    straight.close()

    first = new_trainer(tiny_model, tmp_path, **params, log_dir=str(tmp_path / "b-log"))
    for _ in range(3):
        first.step()
    first.save_checkpoint()
    first.close()
    options = TrainOptions.from_params({"name": "shapes", "resume": True, "log_dir": str(tmp_path / "b-log")})
    resumed = Trainer(tiny_model, plan_run(tiny_model, options, embeddings_dir=tmp_path / "embeddings",
                                           cwd=tmp_path))
    assert resumed.step_count == 3 and resumed.total == 6 and resumed.seed == 1234
    while not resumed.finished:
        resumed.step()
    resumed.close()
    assert torch.equal(straight.current_vectors(), resumed.current_vectors())
    rows = list(csv.reader((tmp_path / "b-log" / "loss.csv").read_text(encoding="utf-8").splitlines()))
    assert [int(r[0]) for r in rows[1:]] == [1, 2, 3, 4, 5, 6]


def test_resume_without_a_checkpoint_says_where_it_looked(tiny_model, tmp_path):
    options = TrainOptions.from_params({"name": "ghost", "resume": True})
    with pytest.raises(TrainingError, match=r"no checkpoint found \(looked for .*textual_inversion/\*/ghost"):
        plan_run(tiny_model, options, embeddings_dir=tmp_path / "e", cwd=tmp_path)


@pytest.mark.parametrize("how", ["nan-loss", "huge-lr"])
def test_a_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_model, tmp_path, monkeypatch, how):
    make_pictures(tmp_path / "data")
    lr = "0.005:2, 1e30" if how == "huge-lr" else "0.005"  # two good steps and a checkpoint, then a blow-up
    trainer = new_trainer(tiny_model, tmp_path, steps=50, lr=lr, save_every=2, log_dir=str(tmp_path / "log"))
    if how == "nan-loss":
        calls = {"n": 0}
        real = trainer.loss_fn

        def poisoned(pred, target):
            calls["n"] += 1
            return real(pred, target) * (float("nan") if calls["n"] == 4 else 1.0)

        monkeypatch.setattr(trainer, "loss_fn", poisoned)
    with pytest.raises(TrainingDiverged) as info:
        for _ in range(10):
            trainer.step()
    message = str(info.value)
    assert "training stopped" in message and "last good checkpoint (step 2)" in message and "--lr" in message
    assert load_checkpoint(tmp_path / "log" / "checkpoint.pt")["step"] == 2
    assert trainer.finished and torch.isfinite(trainer.current_vectors()).all()
    assert trainer.save_checkpoint() is None  # nothing is saved over the good checkpoint
    with pytest.raises(TrainingError, match="training stopped"):
        trainer.finish()
    trainer.close()
    assert not (tmp_path / "embeddings" / "shapes.safetensors").exists()


def _existing(path: Path, step: int) -> Embedding:
    write_embedding(path, {SINGLE: torch.ones(1, 768)}, name=path.stem, step=step)
    return Embedding(path.stem, path.stem, path, read_embedding(path), sha256="0" * 64)


def test_an_existing_embedding_is_not_replaced_without_overwrite(tiny_model, tmp_path):
    make_pictures(tmp_path / "data")
    existing = _existing(tmp_path / "embeddings" / "shapes.safetensors", step=300)
    options = TrainOptions.from_params({"name": "shapes", "data": str(tmp_path / "data")})
    with pytest.raises(TrainingError, match=r"already exists \(.*shapes.safetensors\).*add --overwrite"):
        plan_run(tiny_model, options, embeddings_dir=tmp_path / "embeddings", cwd=tmp_path, existing=existing)
    with pytest.raises(TrainingError, match="already exists"):  # the file alone, not yet in a library
        plan_run(tiny_model, options, embeddings_dir=tmp_path / "embeddings", cwd=tmp_path)
    allowed = TrainOptions.from_params({"name": "shapes", "data": str(tmp_path / "data"), "overwrite": True})
    plan = plan_run(tiny_model, allowed, embeddings_dir=tmp_path / "embeddings", cwd=tmp_path, existing=existing)
    assert plan.replace_ok and torch.equal(plan.vectors, torch.ones(1, 768))  # trains on from the file


def test_an_untrained_created_embedding_may_be_trained(tiny_model, tmp_path):
    existing = _existing(tmp_path / "embeddings" / "shapes.safetensors", step=0)
    options = TrainOptions.from_params({"name": "shapes", "data": str(tmp_path / "data")})
    plan = plan_run(tiny_model, options, embeddings_dir=tmp_path / "embeddings", cwd=tmp_path, existing=existing)
    assert plan.replace_ok


def test_gradient_checkpointing_gives_the_same_step_and_is_switched_off_after(tiny_model, tmp_path):
    make_pictures(tmp_path / "data")
    results = []
    for checkpointing in (False, True):
        trainer = new_trainer(tiny_model, tmp_path, steps=2, gradient_checkpointing=checkpointing,
                              log_dir=str(tmp_path / f"log-{checkpointing}"))
        trainer.step(), trainer.step()
        assert tiny_model.pipe.unet.is_gradient_checkpointing is checkpointing
        trainer.close()
        results.append(trainer.current_vectors())
    assert not tiny_model.pipe.unet.is_gradient_checkpointing
    assert not tiny_model.pipe.text_encoder.training
    assert torch.allclose(results[0], results[1], atol=1e-6)


def test_temporaries_left_by_a_killed_save_are_removed(tiny_model, tmp_path):
    make_pictures(tmp_path / "data")
    log = tmp_path / "log"
    (log / "embeddings").mkdir(parents=True)
    stale = [log / ".checkpoint.pt.sdrepl-abc123.tmp", log / "embeddings" / ".shapes-5.safetensors.sdrepl-x.tmp",
             tmp_path / "embeddings" / ".shapes.safetensors.sdrepl-y.tmp"]
    other = tmp_path / "embeddings" / ".cat.safetensors.sdrepl-z.tmp"  # someone else's write: left alone
    for path in [*stale, other]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    trainer = new_trainer(tiny_model, tmp_path, steps=1, log_dir=str(log))
    trainer.close()
    assert [p.exists() for p in stale] == [False, False, False] and other.exists()
    assert "removed 3 temporary file(s)" in trainer.notes[-1]


def test_clip_grad_value_limits_the_update(tiny_model, tmp_path):
    make_pictures(tmp_path / "data")
    moved = {}
    for clip in (None, "value:1e-12"):
        params = {"clip_grad": clip} if clip else {}
        trainer = new_trainer(tiny_model, tmp_path, steps=1, lr="0.01", log_dir=str(tmp_path / f"log-{clip}"),
                              **params)
        start = trainer.current_vectors()
        trainer.step()
        trainer.close()
        moved[clip] = float((trainer.current_vectors() - start).abs().max())
    assert moved[None] == pytest.approx(0.01, rel=0.01)  # Adam's first step moves each value by about lr
    assert moved["value:1e-12"] < 1e-5  # gradients below Adam's eps barely move anything


def test_bf16_autocast_trains_on_the_cpu(tiny_model, tmp_path):
    make_pictures(tmp_path / "data")
    trainer = new_trainer(tiny_model, tmp_path, steps=2, precision="bf16", log_every=1, log_dir=str(tmp_path / "log"))
    losses = [trainer.step().loss for _ in range(2)]
    trainer.close()
    assert trainer.precision == "bf16" and all(math.isfinite(x) for x in losses)
    assert trainer.vectors.dtype == torch.float32  # the trained vectors stay full precision


def test_fp16_on_the_cpu_is_refused_before_training(tiny_model, tmp_path):
    make_pictures(tmp_path / "data")
    with pytest.raises(TrainingError, match="--precision fp16 is not supported on the CPU"):
        new_trainer(tiny_model, tmp_path, precision="fp16")


_SYNCS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


class HostReads:
    """Counts tensor -> host reads made by sdrepl's own code (the training loop), not by torch internals."""

    def __init__(self, monkeypatch) -> None:
        import sdrepl

        self.package_roots = tuple(str(Path(p).resolve().parent) for p in sdrepl.__path__)
        self.calls: list[str] = []
        for name in _SYNCS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))

    def _wrap(self, name, original):
        import sys

        def counted(tensor, *args, **kwargs):
            frame = sys._getframe(1)
            caller = frame.f_code.co_filename
            # EpochOrder shuffles the pictures with its own CPU generator: a host-side draw, no device read.
            host_side = frame.f_code.co_name == "_permutation"
            if "/tests/" not in caller and caller.startswith(self.package_roots) and ".venv" not in caller \
                    and not host_side:
                self.calls.append(f"{name} at {caller}:{sys._getframe(1).f_lineno}")
            return original(tensor, *args, **kwargs)

        return counted


def test_the_training_loop_reads_nothing_back_between_log_steps(tiny_model, tmp_path, monkeypatch):
    """Per step: no .item()/float()/.cpu()/bool() of a tensor in sdrepl's code; one read-back every
    --log-every steps."""
    make_pictures(tmp_path / "data")
    trainer = new_trainer(tiny_model, tmp_path, steps=8, batch=2, accum=2, flip=True, latents="random",
                          shuffle_tags=True, clip_grad="norm:1", log_every=4, log_dir=str(tmp_path / "log"))
    while trainer.prepare_step():
        pass
    trainer.step()  # warm: the first step builds caches
    reads = HostReads(monkeypatch)
    per_step = []
    for _ in range(7):
        before = len(reads.calls)
        trainer.step()
        per_step.append(reads.calls[before:])
    monkeypatch.undo()
    assert [len(calls) for calls in per_step] == [0, 0, 1, 0, 0, 0, 1], per_step  # steps 2..8; reads at 4, 8
    trainer.close()
    rows = list(csv.reader((tmp_path / "log" / "loss.csv").read_text(encoding="utf-8").splitlines()))
    assert [int(r[0]) for r in rows[1:]] == list(range(1, 9))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_cuda_sync_per_training_step(tmp_path):
    from sdrepl.core.models import load_model

    model = load_model("tiny", device="cuda", dtype="fp32")
    make_pictures(tmp_path / "data")
    trainer = new_trainer(model, tmp_path, steps=6, batch=2, flip=True, log_every=6, log_dir=str(tmp_path / "log"))
    while trainer.prepare_step():
        pass
    trainer.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):  # steps 2..5: no read-back due
            trainer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    trainer.step()
    trainer.close()
