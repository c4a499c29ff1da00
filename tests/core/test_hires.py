"""Hires. fix on ``tiny``: SCALE x size pictures with both upscalers, A1111's metadata, the step count, the
latent upscaler being A1111's bilinear interpolation, and embeddings / LoRAs active in both passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lora_files import kohya_file
from PIL import Image

from sdrepl.core import samplers
from sdrepl.core.denoise import Components, decode
from sdrepl.core.embedding import SINGLE, Embedding, EmbeddingData
from sdrepl.core.generation import GenerationJob, run_generation
from sdrepl.core.hires import HiresError, HiresFix, hires_size, upscale_latents
from sdrepl.core.networks import lora_library, signature_of
from sdrepl.core.networks.apply import patcher_for
from sdrepl.core.networks.use import plan_networks
from sdrepl.core.outputs import OutputFolder
from sdrepl.core.pnginfo import parse_parameters, read_png_parameters
from sdrepl.core.prompt import StaticLookup

SIZE = 32


def job(hires: HiresFix | None, prompt: str = "a photo of a tree", seed: int = 5, n: int = 1) -> GenerationJob:
    return GenerationJob(prompt, "blurry", 3, 7.0, seed, SIZE, SIZE, "Euler a", n, 1, hires=hires)


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def generate(model, the_job, folder: Path, lookup=None, networks=None, progress=None) -> dict:
    def on_progress(step, total, image):
        if progress is not None:
            progress.append((step, total))
    return run_generation(model, lookup or StaticLookup(), the_job, OutputFolder(folder), networks=networks,
                          on_progress=on_progress)


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_hires_makes_scale_times_the_size_with_a1111_metadata(tiny_model, tmp_path, upscaler):
    progress: list = []
    result = generate(tiny_model, job(HiresFix(2.0, 4, 0.5, upscaler)), tmp_path, progress=progress)
    path = result["images"][0]["path"]
    assert Image.open(path).size == (64, 64)
    assert progress == [(i, 5) for i in range(1, 6)]  # 3 first-pass steps + int(4 * 0.5) second-pass steps
    parsed = parse_parameters(read_png_parameters(path))
    assert (parsed["width"], parsed["height"]) == (SIZE, SIZE)  # A1111 writes the first pass's size
    assert parsed["extra"] == {"Denoising strength": "0.5", "Hires upscale": "2", "Hires steps": "4",
                               "Hires upscaler": upscaler.capitalize()}
    assert result["hires"] == {"scale": 2.0, "steps": 4, "denoise": 0.5, "upscaler": upscaler, "width": 64,
                               "height": 64}


def test_defaults_and_odd_scales(tiny_model, tmp_path):
    result = generate(tiny_model, job(HiresFix(1.5)), tmp_path)  # 32 * 1.5 = 48; steps 0: the first pass's
    assert Image.open(result["images"][0]["path"]).size == (48, 48)
    text = read_png_parameters(result["images"][0]["path"])
    assert "Denoising strength: 0.7, Hires upscale: 1.5, Hires upscaler: Latent" in text
    assert "Hires steps" not in text
    assert hires_size(64, 40, 1.3) == (80, 48)  # 83.2 -> 80, 52 -> 48: multiples of 8
    with pytest.raises(HiresError, match="outside 8..8192"):
        hires_size(4096, 512, 4.0)


def test_the_latent_upscaler_is_a1111s_bilinear_interpolation_and_denoise_0_decodes_it(tiny_model, tmp_path,
                                                                                         monkeypatch):
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.interpolate(latents, size=(8, 8), mode="bilinear", antialias=False)
    assert torch.equal(upscale_latents(latents, 64, 64), expected)

    firsts = []
    original = samplers.sample_batch

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        if kwargs.get("output") == "latent":
            firsts.append(out)
        return out

    monkeypatch.setattr(samplers, "sample_batch", spy)
    result = generate(tiny_model, job(HiresFix(2.0, 0, 0.0)), tmp_path)
    (first,) = firsts
    components = Components.of(tiny_model.pipe)
    decoded = np.asarray(decode(components, upscale_latents(first, 64, 64))[0]).astype(np.int16)
    assert np.array_equal(pixels(result["images"][0]["path"]), decoded)


def test_n_pictures_are_each_their_seed_alone(tiny_model, tmp_path):
    together = generate(tiny_model, job(HiresFix(2.0, 2), seed=9, n=2), tmp_path / "n")
    for index, image in enumerate(together["images"]):
        alone = generate(tiny_model, job(HiresFix(2.0, 2), seed=9 + index), tmp_path / f"a{index}")
        assert np.array_equal(pixels(image["path"]), pixels(alone["images"][0]["path"]))


def test_embeddings_and_loras_work_in_both_passes(tiny_model, tmp_path, monkeypatch):
    folder = tmp_path / "loras"
    folder.mkdir()
    kohya_file(folder / "style.safetensors", tiny_model.pipe, seed=3)
    library = lora_library([folder], signature_of(tiny_model.pipe, "sd1"))
    library.scan()
    width = tiny_model.pipe.text_encoder.get_input_embeddings().weight.shape[1]
    vectors = torch.randn(2, width, generator=torch.Generator().manual_seed(4))
    lookup = StaticLookup([Embedding("shiny", "shiny", Path("/emb/shiny.pt"),
                                     EmbeddingData({SINGLE: vectors}, "a1111"), "0" * 64)])
    prompt = "a photo of <shiny> tree <lora:style:1>"
    hires = HiresFix(2.0, 2, 0.5)
    calls = []
    original = samplers.sample_batch

    def spy(model, cond, **kwargs):
        calls.append((cond, [a["name"] for a in patcher_for(model.pipe).active], kwargs["width"]))
        return original(model, cond, **kwargs)

    monkeypatch.setattr(samplers, "sample_batch", spy)
    with_both = generate(tiny_model, job(hires, prompt), tmp_path / "both", lookup,
                         plan_networks(prompt, "", library))
    assert [width for _, _, width in calls] == [SIZE, 64]
    (first_cond, first_active, _), (second_cond, second_active, _) = calls
    # The second pass's 2 steps get their own schedule of the same texts, encoded the same (the embedding in).
    assert second_cond is not first_cond and second_cond.plan.texts() == first_cond.plan.texts()
    assert first_cond.embeds.keys() == second_cond.embeds.keys()
    assert all(torch.equal(first_cond.embeds[k], second_cond.embeds[k]) for k in first_cond.embeds)
    assert first_active == second_active == ["style"]  # the LoRA is on for both passes
    calls.clear()
    generate(tiny_model, job(HiresFix(2.0, 3, 0.5), prompt), tmp_path / "same", lookup,
             plan_networks(prompt, "", library))
    assert calls[0][0] is calls[1][0]  # hires steps = steps: the very same conditioning
    calls.clear()
    plain_prompt = "a photo of tree"
    without = generate(tiny_model, job(hires, plain_prompt), tmp_path / "none", lookup,
                       plan_networks(plain_prompt, "", library))
    assert calls[1][1] == []
    assert not np.array_equal(pixels(with_both["images"][0]["path"]), pixels(without["images"][0]["path"]))
    text = read_png_parameters(with_both["images"][0]["path"])
    assert "Lora hashes" in text and "TI hashes" in text and "Hires upscale: 2" in text
