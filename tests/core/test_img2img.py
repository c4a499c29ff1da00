"""img2img on ``tiny`` (and ``tiny-sdxl``): strength 0 is the VAE round trip of the init, a mid strength runs
``int(steps * strength)`` steps, strength 1 runs every step from the noised init (not txt2img: the math keeps
the init's trace), ``--n`` pictures are each their seed alone, and hostile init files are refused clearly."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdrepl.core.denoise import Components, decode
from sdrepl.core.generation import GenerationJob, prepared, run_generation
from sdrepl.core.img2img import (
    InitImageError,
    encode_pictures,
    fitted_size,
    init_latents,
    just_resize,
    load_init_picture,
    steps_to_run,
)
from sdrepl.core.outputs import OutputFolder
from sdrepl.core.pnginfo import parse_parameters, read_png_parameters
from sdrepl.core.prompt import StaticLookup

SIZE = 32


def gradient(width: int, height: int, mode: str = "RGB") -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(255, 0, height, dtype=np.float32)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                          np.full((height, width, 1), 96, np.float32)], axis=2).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    return image.convert(mode) if mode != "RGB" else image


@pytest.fixture
def init_png(tmp_path) -> Path:
    path = tmp_path / "init.png"
    gradient(SIZE, SIZE).save(path)
    return path


def job(init: Path | None, strength: float = 0.5, *, steps: int = 4, n: int = 1, seed: int = 11,
        sampler: str = "Euler a", prompt: str = "a photo of a tree", **extra) -> GenerationJob:
    return GenerationJob(prompt, "blurry", steps, 7.0, seed, SIZE, SIZE, sampler, n, 1,
                         init=str(init) if init is not None else None, strength=strength, **extra)


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def generate(model, the_job, folder: Path, progress: list | None = None) -> dict:
    def on_progress(step, total, image):
        if progress is not None:
            progress.append((step, total))
    return run_generation(model, StaticLookup(), the_job, OutputFolder(folder), on_progress=on_progress)


def test_strength_0_is_the_init_pictures_vae_round_trip(tiny_model, init_png, tmp_path):
    progress: list = []
    result = generate(tiny_model, job(init_png, 0.0), tmp_path / "out", progress)
    assert progress == []  # zero sampler steps
    components = Components.of(tiny_model.pipe)
    latents = init_latents(components, load_init_picture(init_png), SIZE, SIZE)
    round_trip = np.asarray(decode(components, latents)[0]).astype(np.int16)
    got = pixels(result["images"][0]["path"])
    assert np.array_equal(got, round_trip)  # the init latents decoded unchanged
    assert result["init"] == str(init_png) and result["strength"] == 0.0


def test_a_mid_strength_runs_int_steps_times_strength_steps(tiny_model, init_png, tmp_path):
    calls = []
    unet = tiny_model.pipe.unet
    original = unet.forward
    unet.forward = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    try:
        for steps, strength, expected in ((4, 0.5, 2), (5, 0.75, 3), (4, 1.0, 4)):
            progress: list = []
            calls.clear()
            generate(tiny_model, job(init_png, strength, steps=steps), tmp_path / "out", progress)
            assert steps_to_run(steps, strength) == expected
            assert progress == [(i, expected) for i in range(1, expected + 1)]
            assert len(calls) == expected  # one UNet call (negative and positive batched) per step
    finally:
        del unet.forward


def test_the_picture_and_its_metadata(tiny_model, init_png, tmp_path):
    result = generate(tiny_model, job(init_png, 0.5), tmp_path / "out")
    path = result["images"][0]["path"]
    parsed = parse_parameters(read_png_parameters(path))
    assert parsed["extra"]["Denoising strength"] == "0.5" and (parsed["width"], parsed["height"]) == (SIZE, SIZE)
    txt2img = generate(tiny_model, job(None), tmp_path / "t2i")
    assert not np.array_equal(pixels(path), pixels(txt2img["images"][0]["path"]))
    assert "Denoising strength" not in read_png_parameters(txt2img["images"][0]["path"])


def test_strength_1_runs_every_step_from_the_noised_init_and_is_not_txt2img(tiny_model, init_png, tmp_path):
    """What the math gives: the first latents are ``add_noise(init, noise, t_max)`` = init + sigma_max *
    noise (Euler), while txt2img starts from noise * sqrt(sigma_max^2 + 1); so strength 1 is not txt2img
    with the seed, and a different init still gives a different picture."""
    other = tmp_path / "other.png"
    gradient(SIZE, SIZE).transpose(Image.Transpose.ROTATE_180).save(other)
    a = pixels(generate(tiny_model, job(init_png, 1.0), tmp_path / "a")["images"][0]["path"])
    b = pixels(generate(tiny_model, job(other, 1.0), tmp_path / "b")["images"][0]["path"])
    t2i = pixels(generate(tiny_model, job(None), tmp_path / "c")["images"][0]["path"])
    assert not np.array_equal(a, b) and not np.array_equal(a, t2i)

    seen = []
    unet = tiny_model.pipe.unet
    original = unet.forward

    def spy(sample, *args, **kwargs):
        seen.append(sample.detach().clone())
        return original(sample, *args, **kwargs)

    unet.forward = spy
    try:
        generate(tiny_model, job(init_png, 1.0, sampler="Euler"), tmp_path / "d")
    finally:
        del unet.forward
    from sdrepl.core.samplers import make_scheduler

    scheduler = make_scheduler("Euler", tiny_model.pipe.scheduler.config)
    scheduler.set_timesteps(4)
    clean = init_latents(Components.of(tiny_model.pipe), load_init_picture(init_png), SIZE, SIZE)
    noise = torch.randn(clean.shape, generator=torch.Generator("cpu").manual_seed(11))
    first = scheduler.add_noise(clean, noise, scheduler.timesteps[:1])
    expected = scheduler.scale_model_input(first, scheduler.timesteps[0])
    assert torch.allclose(seen[0][:1], expected, atol=1e-5)


def test_n_pictures_are_each_their_seed_alone(tiny_model, init_png, tmp_path):
    together = generate(tiny_model, job(init_png, 0.75, n=2, seed=20), tmp_path / "n")
    for index, image in enumerate(together["images"]):
        alone = generate(tiny_model, job(init_png, 0.75, seed=20 + index), tmp_path / f"one{index}")
        assert np.array_equal(pixels(image["path"]), pixels(alone["images"][0]["path"]))
    assert not np.array_equal(pixels(together["images"][0]["path"]), pixels(together["images"][1]["path"]))


def test_without_a_size_the_init_pictures_size_rounded_to_8(tiny_model, tmp_path):
    path = tmp_path / "odd.png"
    gradient(45, 38).save(path)
    ready = prepared(job(path, 0.0, size_from_init=True))
    assert (ready.width, ready.height) == (40, 32) and ready.init_picture.size == (45, 38)
    result = generate(tiny_model, ready, tmp_path / "out")
    assert Image.open(result["images"][0]["path"]).size == (40, 32)
    assert fitted_size(4, 9000) == (8, 8192)


def test_a_size_stretches_the_init_just_resize(tmp_path):
    image = gradient(40, 20)
    resized = just_resize(image, 32, 32)
    assert resized.size == (32, 32)
    assert np.array_equal(np.asarray(resized), np.asarray(image.resize((32, 32), Image.LANCZOS)))
    assert just_resize(image, 40, 20) is image


def test_alpha_is_flattened_onto_white_and_exif_turns_it_upright(tmp_path):
    rgba = Image.new("RGBA", (16, 8), (255, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    picture = load_init_picture(tmp_path / "clear.png")
    assert picture.image.mode == "RGB" and picture.image.getpixel((0, 0)) == (255, 255, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the upright picture is 8x16
    Image.new("RGB", (16, 8)).save(tmp_path / "turned.jpg", exif=exif)
    assert load_init_picture(tmp_path / "turned.jpg").size == (8, 16)


def png_declaring(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def noisy_png() -> bytes:
    import io

    data = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data, "PNG")
    return data.getvalue()


@pytest.mark.parametrize(("make", "needle"), [
    (lambda d: d / "missing.png", "no such file"),
    (lambda d: (d / "notes.png").write_text("not a picture") and d / "notes.png", "not a picture"),
    (lambda d: (d / "huge.png").write_bytes(png_declaring(100_000, 100_000)) and d / "huge.png",
     "header declares"),
    (lambda d: (d / "big.png").write_bytes(png_declaring(9000, 9000)) and d / "big.png",
     "declares 9000x9000 pixels"),
    (lambda d: (d / "broken.png").write_bytes(noisy_png()[:600]) and d / "broken.png", "can be read"),
    (lambda d: (d / "folder.png").mkdir() or d / "folder.png", "folder"),
    (lambda d: os.mkfifo(d / "pipe.png") or d / "pipe.png", "FIFO"),
])
def test_bad_init_files_are_refused_naming_the_file(tmp_path, make, needle):
    path = make(tmp_path)
    with pytest.raises(InitImageError) as caught:
        load_init_picture(path)
    message = str(caught.value)
    assert needle in message and str(path) in message and "--init IMAGE" in message


def test_encoding_is_deterministic_and_per_picture(tiny_model):
    components = Components.of(tiny_model.pipe)
    images = [gradient(SIZE, SIZE), gradient(SIZE, SIZE).transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    both = encode_pictures(components, images)
    assert both.shape == (2, 4, SIZE // 8, SIZE // 8)
    assert torch.equal(both[1:], encode_pictures(components, images[1:]))
    assert torch.equal(both[:1], encode_pictures(components, images[:1]))


def test_sdxl_img2img(tmp_path, init_png):
    from sdrepl.core.models import load_model

    xl = load_model("tiny-sdxl", device="cpu", dtype="fp32")
    size = 64
    Image.open(init_png).resize((size, size)).save(tmp_path / "xl.png")
    base = GenerationJob("a red fox", "", 4, 7.0, 3, size, size, "Euler", 1, 1, init=str(tmp_path / "xl.png"),
                         strength=0.0)
    zero = pixels(generate(xl, base, tmp_path / "zero")["images"][0]["path"])
    components = Components.of(xl.pipe)
    latents = init_latents(components, load_init_picture(tmp_path / "xl.png"), size, size)
    assert np.array_equal(zero, np.asarray(decode(components, latents)[0]).astype(np.int16))
    progress: list = []
    from dataclasses import replace

    half = generate(xl, replace(base, strength=0.5), tmp_path / "half", progress)
    assert progress == [(1, 2), (2, 2)] and Image.open(half["images"][0]["path"]).size == (size, size)
    from sdrepl.core.hires import HiresFix

    hires = GenerationJob("a red fox", "", 2, 7.0, 3, 32, 32, "Euler", 1, 1, hires=HiresFix(2.0, 2, 0.5, "lanczos"))
    result = generate(xl, hires, tmp_path / "hires")
    assert Image.open(result["images"][0]["path"]).size == (64, 64) and result["hires"]["width"] == 64


@pytest.mark.parametrize("name", __import__("sdrepl.core.samplers", fromlist=["x"]).sampler_names())
@pytest.mark.filterwarnings("ignore:Should have ta>=t0")
def test_every_sampler_runs_img2img_steps(tiny_model, init_png, tmp_path, name):
    progress: list = []
    result = generate(tiny_model, job(init_png, 0.5, steps=4, sampler=name), tmp_path, progress)
    assert progress == [(1, 2), (2, 2)], name
    assert np.isfinite(pixels(result["images"][0]["path"])).all()


def test_prompt_editing_counts_the_steps_the_run_takes_from_0_as_a1111(tiny_model, init_png, tmp_path):
    """A1111 resets its step counter for img2img and reads the schedule (planned for all ``steps``) from 0:
    at strength 0.5 of 6 steps, the 3 steps run are conditioned on the schedule's steps 0, 1, 2."""
    from sdrepl.core.conditioning import encode_text
    from sdrepl.core.schedule import prompt_schedule

    prompt = "a [cow:horse:2] in a field"
    schedule = prompt_schedule(prompt, 6)
    expected = [schedule.text_at(k) for k in range(3)]
    assert expected != [schedule.text_at(k) for k in range(3, 6)]  # the two countings differ here
    unet = tiny_model.pipe.unet
    original = unet.forward
    seen: list[torch.Tensor] = []
    unet.forward = lambda *a, **k: (seen.append(k["encoder_hidden_states"][1:].clone()), original(*a, **k))[1]
    try:
        run_generation(tiny_model, StaticLookup(), job(init_png, 0.5, steps=6, prompt=prompt),
                       OutputFolder(tmp_path / "out"))
    finally:
        del unet.forward
    assert len(seen) == 3
    for k, hidden in enumerate(seen):
        assert torch.equal(hidden, encode_text(tiny_model, expected[k], StaticLookup())), k
