"""SDXL textual inversion on ``tiny-sdxl`` (CPU): a clip_l/clip_g pair learns, with SDXL's added conditioning
(pooled captions, each picture's time ids), resumes bit for bit, stops on NaN, and its file loads with
diffusers' own two-call loader."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from PIL import Image, ImageDraw

from sdrepl.core.embedding import CLIP_G, CLIP_L
from sdrepl.core.formats import read_embedding
from sdrepl.core.training.checkpoint import load_checkpoint
from sdrepl.core.training.dataset import load_dataset
from sdrepl.core.training.options import TrainOptions
from sdrepl.core.training.plan import plan_run
from sdrepl.core.training.trainer import Trainer, TrainingDiverged
from sdrepl.core.training.vectors import join_vectors, split_vectors

COLORS = [(230, 30, 30), (30, 200, 60), (40, 60, 230), (240, 220, 40)]


def make_pictures(folder, sizes=((64, 64),)):
    folder.mkdir(parents=True, exist_ok=True)
    for i, color in enumerate(COLORS):
        w, h = sizes[i % len(sizes)]
        image = Image.new("RGB", (w, h), (255, 255, 255))
        (ImageDraw.Draw(image).ellipse if i % 2 else ImageDraw.Draw(image).rectangle)([8, 8, w - 8, h - 8], fill=color)
        image.save(folder / f"{i + 1:06d}-0-a {'round' if i % 2 else 'square'} shape.png")
    return folder


@pytest.fixture(scope="module")
def xl():
    from sdrepl.core.models import load_model

    return load_model("tiny-sdxl", device="cpu", dtype="fp32")


def new_trainer(model, root, **params) -> Trainer:
    options = TrainOptions.from_params({"name": "shapes", "data": str(root / "data"), "seed": 1234,
                                        "save_every": 0, "preview_every": 0, **params})
    return Trainer(model, plan_run(model, options, embeddings_dir=root / "embeddings", cwd=root))


def test_vectors_are_split_and_joined_by_encoder_width():
    widths = {CLIP_L: 768, CLIP_G: 1280}
    parts = {CLIP_L: torch.randn(3, 768), CLIP_G: torch.randn(3, 1280)}
    joined = join_vectors(parts, widths)
    assert joined.shape == (3, 2048)
    back = split_vectors(joined, widths)
    assert all(torch.equal(back[k], parts[k]) for k in parts)
    with pytest.raises(ValueError, match="vector counts differ"):
        join_vectors({CLIP_L: torch.zeros(2, 768), CLIP_G: torch.zeros(3, 1280)}, widths)


def test_each_picture_s_time_ids_come_from_its_original_size_and_crop(tmp_path):
    make_pictures(tmp_path, sizes=((96, 64), (64, 80)))
    data = load_dataset(tmp_path, (64, 64), center_crop=True, flip=True)
    wide, tall = data.pictures[0], data.pictures[1]
    # 96x64 scaled to cover 64x64 stays 96x64: cropped 16 px from the left (16 from the right when mirrored).
    assert wide.time_ids((64, 64)) == [64, 96, 0, 16, 64, 64]
    assert tall.time_ids((64, 64)) == [80, 64, 8, 0, 64, 64]
    stretched = load_dataset(tmp_path, (64, 64), center_crop=False).pictures[0]
    assert stretched.time_ids((64, 64)) == [64, 96, 0, 0, 64, 64]


@pytest.fixture(scope="module")
def trained(xl, tmp_path_factory):
    root = tmp_path_factory.mktemp("xltrain")
    make_pictures(root / "data", sizes=((64, 64), (80, 64)))
    before = {f"{part}.{k}": v.detach().clone() for part in ("unet", "text_encoder", "text_encoder_2")
              for k, v in getattr(xl.pipe, part).state_dict().items()}
    trainer = new_trainer(xl, root, steps=50, lr="0.05", vectors=2, init="shape", center_crop=True,
                          save_every=25, preview_every=50, log_dir=str(root / "log"))
    initial = trainer.current_vectors()
    [trainer.step() for _ in range(50)]
    final = trainer.finish()
    trainer.close()
    # The loss is read back every --log-every steps, not per step: loss.csv holds every step's.
    losses = [float(r[2]) for r in list(csv.reader((root / "log" / "loss.csv").read_text().splitlines()))[1:]]
    changed = [k for part in ("unet", "text_encoder", "text_encoder_2")
               for k, v in getattr(xl.pipe, part).state_dict().items() if not torch.equal(before[f"{part}.{k}"], v)]
    return {"root": root, "trainer": trainer, "losses": losses, "final": final, "initial": initial,
            "changed": changed}


def eval_loss(trainer, vectors: torch.Tensor) -> float:
    """The loss over every picture at fixed timesteps and noise for ``vectors``."""
    gen = torch.Generator().manual_seed(0)
    latents = torch.stack([t.cpu() for t in trainer.data.latents[::trainer.data.variants]])
    texts = [f"a photo of a [name], {p.caption}" for p in trainer.data.pictures]
    ids = torch.tensor([p.time_ids(trainer.size) for p in trainer.data.pictures], dtype=torch.float32)
    total = 0.0
    with torch.no_grad():
        cond, pooled = trainer.text.encode(texts, vectors)
        for t in (100, 300, 500, 700, 900):
            noise = torch.randn(latents.shape, generator=gen)
            steps = torch.full((len(texts),), t)
            noisy = trainer.noise_scheduler.add_noise(latents, noise, steps)
            pred = trainer.pipe.unet(noisy, steps, encoder_hidden_states=cond,
                                     added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
            total += float(torch.nn.functional.mse_loss(pred, noise))
    return total / 5


def test_fifty_cpu_steps_train_a_pair_and_lower_the_loss(trained):
    losses = trained["losses"]
    assert all(math.isfinite(x) for x in losses)
    # Per-step losses are too noisy (random timesteps) to compare over 50 steps; a fixed set is not.
    trainer = trained["trainer"]
    assert eval_loss(trainer, trainer.current_vectors()) < eval_loss(trainer, trained["initial"])
    assert trained["changed"] == []  # only the pair's vectors train
    data = read_embedding(trained["final"])
    assert data.format == "safetensors/sdxl" and data.step == 50
    assert data.vectors[CLIP_L].shape == (2, 768) and data.vectors[CLIP_G].shape == (2, 1280)
    parts = split_vectors(trained["trainer"].current_vectors(), {CLIP_L: 768, CLIP_G: 1280})
    assert all(torch.equal(data.vectors[k], parts[k]) for k in parts)
    assert not torch.equal(trained["initial"], trained["trainer"].current_vectors())
    log = trained["root"] / "log"
    assert read_embedding(log / "embeddings" / "shapes-25.safetensors").vectors[CLIP_G].shape == (2, 1280)
    assert Image.open(log / "images" / "shapes-50.png").size == (64, 64)  # preview on SDXL


def test_the_trained_pair_loads_with_diffusers_two_call_loader(xl, trained):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    pipe = StableDiffusionXLPipeline.from_pretrained(xl.path, local_files_only=True, add_watermarker=False)
    state = load_file(str(trained["final"]))
    pipe.load_textual_inversion(state["clip_g"], token="<shapes>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    pipe.load_textual_inversion(state["clip_l"], token="<shapes>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    ids = pipe.tokenizer.convert_tokens_to_ids(["<shapes>", "<shapes>_1"])
    table = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[ids], state["clip_l"])
    table_2 = pipe.text_encoder_2.get_input_embeddings().weight
    assert torch.equal(table_2[pipe.tokenizer_2.convert_tokens_to_ids(["<shapes>", "<shapes>_1"])], state["clip_g"])


def test_an_sdxl_resume_gives_the_same_pair_as_an_uninterrupted_run(xl, tmp_path):
    make_pictures(tmp_path / "data", sizes=((64, 64), (72, 64)))
    params = {"steps": 4, "batch": 2, "flip": True, "center_crop": True, "shuffle_tags": True, "vectors": 2,
              "lr": "0.05:2, 0.02", "latents": "random"}
    straight = new_trainer(xl, tmp_path, **params, log_dir=str(tmp_path / "a-log"))
    for _ in range(4):
        straight.step()
    straight.close()
    first = new_trainer(xl, tmp_path, **params, log_dir=str(tmp_path / "b-log"))
    for _ in range(2):
        first.step()
    first.save_checkpoint()
    first.close()
    options = TrainOptions.from_params({"name": "shapes", "resume": True, "log_dir": str(tmp_path / "b-log")})
    resumed = Trainer(xl, plan_run(xl, options, embeddings_dir=tmp_path / "embeddings", cwd=tmp_path))
    assert resumed.step_count == 2
    while not resumed.finished:
        resumed.step()
    resumed.close()
    assert torch.equal(straight.current_vectors(), resumed.current_vectors())


def test_a_nan_on_sdxl_stops_and_keeps_the_last_good_checkpoint(xl, tmp_path):
    make_pictures(tmp_path / "data")
    trainer = new_trainer(xl, tmp_path, steps=20, lr="0.005:2, 1e30", save_every=2, log_dir=str(tmp_path / "log"))
    with pytest.raises(TrainingDiverged, match="last good checkpoint \\(step 2\\)"):
        for _ in range(8):
            trainer.step()
    trainer.close()
    assert load_checkpoint(tmp_path / "log" / "checkpoint.pt")["step"] == 2
    assert torch.isfinite(trainer.current_vectors()).all()
    assert not (tmp_path / "embeddings" / "shapes.safetensors").exists()


def test_gradient_checkpointing_on_sdxl_gives_the_same_steps(xl, tmp_path):
    make_pictures(tmp_path / "data")
    results = []
    for checkpointing in (False, True):
        trainer = new_trainer(xl, tmp_path, steps=2, gradient_checkpointing=checkpointing,
                              log_dir=str(tmp_path / f"log-{checkpointing}"))
        trainer.step(), trainer.step()
        assert xl.pipe.unet.is_gradient_checkpointing is checkpointing
        assert getattr(xl.pipe.text_encoder_2, "is_gradient_checkpointing", checkpointing) is checkpointing
        trainer.close()
        results.append(trainer.current_vectors())
    assert not xl.pipe.unet.is_gradient_checkpointing
    assert not xl.pipe.text_encoder.training and not xl.pipe.text_encoder_2.training
    assert torch.allclose(results[0], results[1], atol=1e-6)
