"""The training set: bad datasets are reported before training, with every bad file named; latents once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from sdrepl.core.errors import TrainingError
from sdrepl.core.training.dataset import EpochOrder, fit, load_dataset


def picture(path: Path, size=(64, 64), color=(200, 30, 30)) -> Path:
    """A plain picture with a white bar on its left, so it differs from its mirror image."""
    image = Image.new("RGB", size, color)
    image.paste((255, 255, 255), (0, 0, max(1, size[0] // 4), size[1]))
    image.save(path)
    return path


def test_a_missing_folder_is_reported(tmp_path):
    with pytest.raises(TrainingError, match="no such folder"):
        load_dataset(tmp_path / "nope", (64, 64))


def test_a_folder_without_pictures_is_reported(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(TrainingError, match="no pictures in this folder"):
        load_dataset(tmp_path, (64, 64))


def test_every_unreadable_and_too_small_picture_is_listed_in_one_error(tmp_path):
    picture(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "empty.jpg").write_bytes(b"")
    picture(tmp_path / "small.png", (32, 48))
    picture(tmp_path / "narrow.png", (64, 40))
    with pytest.raises(TrainingError) as info:
        load_dataset(tmp_path, (64, 64))
    message = str(info.value)
    assert "2 picture(s) cannot be read: broken.png" in message and "empty.jpg" in message
    assert "2 picture(s) are smaller than the training size 64x64" in message
    assert "narrow.png (64x40)" in message and "small.png (32x48)" in message
    assert "good.png" not in message
    assert "--center-crop" in message and "Nothing was trained" in message


def test_center_crop_accepts_small_pictures(tmp_path):
    picture(tmp_path / "small.png", (32, 48))
    data = load_dataset(tmp_path, (64, 64), center_crop=True)
    assert data.pictures[0].pixels.shape == (3, 64, 64)


def test_pictures_are_resized_and_captioned(tmp_path):
    picture(tmp_path / "000001-0-a red square.png", (128, 96))
    picture(tmp_path / "000002-0-a blue square.png", (64, 64), (0, 0, 255))
    (tmp_path / "000002-0-a blue square.txt").write_text("blue thing")
    data = load_dataset(tmp_path, (64, 64))
    assert [p.caption for p in data.pictures] == ["a red square", "blue thing"]
    assert all(p.pixels.shape == (3, 64, 64) for p in data.pictures)
    assert float(data.pictures[1].pixels[2, :, -1].mean()) == pytest.approx(1.0)  # blue channel in [-1, 1]


def test_center_crop_keeps_the_middle():
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    image.paste((255, 255, 255), (50, 0, 150, 100))  # a white middle square
    cropped = fit(image, (64, 64), center_crop=True)
    assert cropped.size == (64, 64)
    assert min(cropped.getpixel((2, 32))) > 250 and min(cropped.getpixel((61, 32))) > 250


@pytest.mark.parametrize("mode", ["once", "deterministic", "random"])
def test_latents_are_encoded_once_and_pixels_dropped(tmp_path, tiny_model, mode):
    for i in range(3):
        picture(tmp_path / f"p{i}.png", color=(60 * i, 100, 200))
    data = load_dataset(tmp_path, (64, 64), flip=True, latents=mode)
    vae = tiny_model.pipe.vae
    while data.encode_some(vae, tiny_model.device, torch.Generator().manual_seed(0), limit=2):
        pass
    assert data.encoded and len(data.latents) == 6  # each picture and its mirror
    assert all(p.pixels is None for p in data.pictures)
    gen = torch.Generator().manual_seed(1)
    first, second = data.latent(1, False, gen), data.latent(1, False, gen)
    assert first.shape == (4, 8, 8)
    assert torch.equal(first, second) is (mode != "random")  # random resamples every use
    assert not torch.equal(data.latents[2], data.latents[3])  # the mirror image is encoded on its own


def test_deterministic_latents_are_the_scaled_mean(tmp_path, tiny_model):
    picture(tmp_path / "p.png")
    data = load_dataset(tmp_path, (64, 64), latents="deterministic")
    data.encode_some(tiny_model.pipe.vae, tiny_model.device, torch.Generator())
    with torch.no_grad():
        pixels = load_dataset(tmp_path, (64, 64)).pictures[0].pixels[None]
        mean = tiny_model.pipe.vae.encode(pixels).latent_dist.mean[0]
    assert torch.allclose(data.latents[0], mean * tiny_model.pipe.vae.config.scaling_factor)


def test_epoch_order_visits_every_repeat_and_replays_from_its_state():
    order = EpochOrder(count=3, repeats=2, seed=5)
    first_epoch = order.take(6)
    assert sorted(first_epoch) == [0, 0, 1, 1, 2, 2]
    state = order.state_dict()
    ahead = order.take(7)
    again = EpochOrder(count=3, repeats=2, seed=999)
    again.load_state_dict(state)
    assert again.take(7) == ahead
    assert again.epoch == 2


def test_a_picture_whose_header_declares_a_huge_size_is_listed_not_decoded(tmp_path):
    """A small PNG claiming 9000x9000 would cost ~240 MB decoded: it is named as unreadable."""
    from attack_corpus import png

    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "good.png")
    (tmp_path / "bomb.png").write_bytes(png(9000, 9000))
    with pytest.raises(TrainingError, match=r"1 picture\(s\) cannot be read: bomb.png \(its header declares 9000x9000"):
        load_dataset(tmp_path, (64, 64))
