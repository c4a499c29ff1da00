"""Samplers: every A1111 name and ComfyUI alias makes its scheduler, and each one draws on ``tiny``."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

from sdrepl.core.errors import SamplerError
from sdrepl.core.samplers import SAMPLERS, find_sampler, make_scheduler, sampler_names

ALIASES = [(alias, s.name) for s in SAMPLERS for alias in s.aliases]


@pytest.mark.parametrize("name", sampler_names())
def test_every_name_makes_its_scheduler(name):
    sampler = find_sampler(name)
    scheduler = make_scheduler(name, None)
    assert type(scheduler).__name__ == sampler.scheduler
    for key, value in sampler.options.items():
        assert scheduler.config[key] == value, key


@pytest.mark.parametrize(("alias", "name"), ALIASES + [("dpm++ 2m karras", "DPM++ 2M Karras"),
                                                       ("EULER_A", "Euler a"), ("DPM++-SDE", "DPM++ SDE")])
def test_aliases_and_spellings_find_the_same_sampler(alias, name):
    assert find_sampler(alias).name == name
    assert type(make_scheduler(alias, None)).__name__ == find_sampler(name).scheduler


def test_the_model_noise_schedule_is_kept():
    base = {"prediction_type": "v_prediction", "beta_end": 0.0125, "timestep_spacing": "trailing"}
    config = make_scheduler("dpmpp_2m_karras", base).config
    assert (config.prediction_type, config.beta_end, config.timestep_spacing) == ("v_prediction", 0.0125, "trailing")
    assert config.use_karras_sigmas is True


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(SamplerError) as info:
        make_scheduler("Euler b", None)
    message = str(info.value)
    assert "'Euler b'" in message and "\n" not in message
    for name in sampler_names():
        assert name in message


@pytest.mark.filterwarnings("ignore:Should have ta>=t0")  # torchsde's float rounding note (DPM++ SDE)
@pytest.mark.parametrize("name", sampler_names())
def test_each_sampler_draws_a_64px_picture_on_tiny(name, tiny_model):
    scheduler = make_scheduler(name, tiny_model.pipe.scheduler.config)
    pipe = diffusers.StableDiffusionPipeline(**{**tiny_model.pipe.components, "scheduler": scheduler})  # shared fixture untouched
    pipe.set_progress_bar_config(disable=True)
    steps = 3 if name.startswith(("DPM2", "Heun")) else 2  # second-order: each step is two model calls
    image = pipe("a photo of a tree", num_inference_steps=steps, height=64, width=64, guidance_scale=7.0,
                 generator=torch.Generator().manual_seed(1), output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all()



@pytest.mark.filterwarnings("ignore:Should have ta>=t0")
@pytest.mark.parametrize("name", ["Heun", "DPM2", "DPM2 a", "DPM++ SDE"])
def test_second_order_progress_counts_the_users_steps(name, tiny_model, tmp_path):
    """Progress of a 3-step generation ends at exactly 3/3 (it ended at 5/3: two model calls per step)."""
    from sdrepl.core.generation import GenerationJob, run_generation
    from sdrepl.core.outputs import OutputFolder
    from sdrepl.core.prompt import StaticLookup

    seen: list[tuple[int, int]] = []
    job = GenerationJob("a tree", "", 3, 7.0, 1, 64, 64, name, 1, 1)
    run_generation(tiny_model, StaticLookup(), job, OutputFolder(tmp_path / "out"),
                   on_progress=lambda step, total, image: seen.append((step, total)))
    assert seen[-1] == (3, 3) and all(step <= total for step, total in seen)
    assert [s for s, _ in seen] == sorted(s for s, _ in seen)
