"""sdrepl's own denoising loop against diffusers' pipeline call: same seed, same pixels, for every sampler.

The reference is ``StableDiffusionPipeline.__call__`` on the same components (what ``core.samplers.sample``
called before it had a loop of its own). DPM++ SDE's reference seeds its Brownian tree with the picture's
seed (``noise_sampler_seed``), as A1111 does and as sdrepl's loop does; diffusers' default draws that seed
from the global RNG, so it would not be reproducible at all.
"""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

from sdrepl.core.conditioning import encode_prompts
from sdrepl.core.denoise import Components, Cond, StepCond, denoise
from sdrepl.core.prompt import StaticLookup
from sdrepl.core.samplers import make_scheduler, sample, sample_batch, sampler_names

pytestmark = pytest.mark.filterwarnings("ignore:Should have ta>=t0")  # torchsde's float rounding note

SEED = 1234
SIZE = 32


def steps_for(name: str) -> int:
    return 3 if name.startswith(("DPM2", "Heun", "DPM++ SDE")) else 4


@pytest.fixture(scope="module")
def cond(tiny_model):
    return encode_prompts(tiny_model, "a photo of a tree, autumn", "blurry", StaticLookup())


def reference(model, cond, name: str, *, steps: int, cfg: float, seed: int, n: int = 1) -> list[np.ndarray]:
    """The pictures diffusers' own pipeline call makes (seed i from a generator seeded ``seed + i``)."""
    out = []
    for index in range(n):
        scheduler = make_scheduler(name, model.pipe.scheduler.config)
        if hasattr(scheduler, "noise_sampler_seed"):
            scheduler.noise_sampler_seed = seed + index
        pipe = diffusers.StableDiffusionPipeline(**{**model.pipe.components, "scheduler": scheduler})
        pipe.set_progress_bar_config(disable=True)
        image = pipe(prompt_embeds=cond.prompt_embeds, negative_prompt_embeds=cond.negative_prompt_embeds,
                     num_inference_steps=steps, guidance_scale=cfg, width=SIZE, height=SIZE,
                     generator=torch.Generator("cpu").manual_seed(seed + index), output_type="pil").images[0]
        out.append(np.asarray(image))
    return out


@pytest.mark.parametrize("name", sampler_names())
def test_every_sampler_gives_the_pipeline_pixels(name, tiny_model, cond):
    steps = steps_for(name)
    expected = reference(tiny_model, cond, name, steps=steps, cfg=7.0, seed=SEED)[0]
    scheduler = make_scheduler(name, tiny_model.pipe.scheduler.config)
    got = sample(tiny_model, cond, steps=steps, cfg=7.0, width=SIZE, height=SIZE, seed=SEED, scheduler=scheduler)
    assert np.array_equal(np.asarray(got), expected)


def test_without_guidance_too(tiny_model, cond):
    expected = reference(tiny_model, cond, "Euler a", steps=3, cfg=1.0, seed=7)[0]
    scheduler = make_scheduler("Euler a", tiny_model.pipe.scheduler.config)
    got = sample(tiny_model, cond, steps=3, cfg=1.0, width=SIZE, height=SIZE, seed=7, scheduler=scheduler)
    assert np.array_equal(np.asarray(got), expected)


def test_a_seed_still_picks_the_picture(tiny_model, cond):
    scheduler = make_scheduler("Euler a", tiny_model.pipe.scheduler.config)
    one = np.asarray(sample(tiny_model, cond, steps=2, cfg=7.0, width=SIZE, height=SIZE, seed=1, scheduler=scheduler))
    two = np.asarray(sample(tiny_model, cond, steps=2, cfg=7.0, width=SIZE, height=SIZE, seed=2, scheduler=scheduler))
    again = np.asarray(sample(tiny_model, cond, steps=2, cfg=7.0, width=SIZE, height=SIZE, seed=1,
                              scheduler=scheduler))
    assert not np.array_equal(one, two)
    assert np.array_equal(one, again)


def run(model, cond_provider, name="Euler a", *, steps=3, cfg=7.0, seeds=(SEED,), **kwargs):
    return denoise(Components.of(model.pipe), scheduler=make_scheduler(name, model.pipe.scheduler.config),
                   steps=steps, cfg=cfg, width=SIZE, height=SIZE, seeds=list(seeds), conditioning=cond_provider,
                   **kwargs)


def test_progress_counts_sampler_steps_and_can_cancel(tiny_model, cond):
    seen = []
    run(tiny_model, StepCond.of(cond, SIZE, SIZE).constant(), "Heun", steps=3, on_step=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]  # Heun calls the UNet twice a step: progress is per step

    class Stop(Exception):
        pass

    def stop(done, total):
        raise Stop

    with pytest.raises(Stop):
        run(tiny_model, StepCond.of(cond, SIZE, SIZE).constant(), on_step=stop)


def test_the_conditioning_provider_is_asked_per_step(tiny_model, cond):
    asked = []
    fixed = StepCond.of(cond, SIZE, SIZE)

    def provider(step: int) -> StepCond:
        asked.append(step)
        return fixed

    got = run(tiny_model, provider, "Heun", steps=3)
    assert asked == [0, 0, 1, 1, 2]  # each UNet call asks for its sampler step's conditioning
    assert np.array_equal(np.asarray(got[0]), np.asarray(run(tiny_model, fixed.constant(), "Heun", steps=3)[0]))

    other = encode_prompts(tiny_model, "a red car", "blurry", StaticLookup())
    switched = run(tiny_model, lambda step: fixed if step < 1 else StepCond.of(other, SIZE, SIZE), steps=3)
    plain = run(tiny_model, fixed.constant(), steps=3)
    assert not np.array_equal(np.asarray(switched[0]), np.asarray(plain[0]))


def test_one_positive_with_weight_one_is_plain_guidance_and_weights_compose(tiny_model, cond):
    plain = run(tiny_model, StepCond.of(cond, SIZE, SIZE).constant(), output="latent")
    pos = Cond(cond.prompt_embeds)
    neg = Cond(cond.negative_prompt_embeds)
    same = run(tiny_model, StepCond([(pos, 1.0)], neg).constant(), output="latent")
    assert torch.equal(plain, same)
    # A1111's AND: uncond + sum w_i * cfg * (cond_i - uncond); two halves of one prompt are that prompt.
    halves = run(tiny_model, StepCond([(pos, 0.5), (pos, 0.5)], neg).constant(), output="latent")
    assert torch.allclose(plain, halves, rtol=1e-4, atol=1e-4)
    other = Cond(encode_prompts(tiny_model, "a red car", "", StaticLookup()).prompt_embeds)
    mixed = run(tiny_model, StepCond([(pos, 1.0), (other, 0.7)], neg).constant(), output="latent")
    assert not torch.allclose(plain, mixed, atol=1e-3)


def test_conds_of_different_lengths_are_run_in_groups(tiny_model, cond):
    long = encode_prompts(tiny_model, "a photo of a tree, " * 30, "blurry", StaticLookup())
    assert long.prompt_embeds.shape[1] > cond.negative_prompt_embeds.shape[1]
    step = StepCond([(Cond(long.prompt_embeds), 1.0)], Cond(cond.negative_prompt_embeds))
    out = run(tiny_model, step.constant(), output="latent")
    assert torch.isfinite(out).all()


def test_extra_unet_inputs_reach_the_unet(tiny_model, cond):
    seen = {}
    unet = tiny_model.pipe.unet
    original = unet.forward

    def spy(*args, **kwargs):
        seen.update(kwargs.get("added_cond_kwargs") or {})
        kwargs["added_cond_kwargs"] = None  # the tiny UNet has no added embedding: drop after recording
        return original(*args, **kwargs)

    pos = Cond(cond.prompt_embeds, {"text_embeds": torch.ones(1, 3), "time_ids": torch.zeros(1, 6)})
    neg = Cond(cond.negative_prompt_embeds, {"text_embeds": torch.zeros(1, 3), "time_ids": torch.zeros(1, 6)})
    unet.forward = spy
    try:
        run(tiny_model, StepCond([(pos, 1.0)], neg).constant(), seeds=(1, 2), unet_batch=2, output="latent")
    finally:
        del unet.forward
    assert seen["text_embeds"].shape == (4, 3)  # [neg, neg, pos, pos]: the batch's order
    assert seen["text_embeds"][:, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert seen["time_ids"].shape == (4, 6)


def test_img2img_start_step_runs_the_tail_of_the_schedule(tiny_model, cond):
    seen = []
    clean = torch.zeros(1, 4, SIZE // 8, SIZE // 8)
    out = run(tiny_model, StepCond.of(cond, SIZE, SIZE).constant(), steps=4, init_latents=clean, start_step=2,
              on_step=lambda done, total: seen.append((done, total)), output="latent")
    assert seen == [(3, 4), (4, 4)]
    assert out.shape == clean.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["Euler a", "DPM++ 2M SDE", "DPM++ SDE", "DPM2 a", "DDIM"])
def test_a_batch_of_n_is_n_batches_of_one(name, tiny_model, cond):
    steps = steps_for(name)
    seeds = [SEED, SEED + 1, SEED + 2]
    expected = reference(tiny_model, cond, name, steps=steps, cfg=7.0, seed=SEED, n=3)
    got = sample_batch(tiny_model, cond, steps=steps, cfg=7.0, width=SIZE, height=SIZE, seeds=seeds,
                       scheduler=make_scheduler(name, tiny_model.pipe.scheduler.config))
    assert len(got) == 3
    for index in range(3):
        assert np.array_equal(np.asarray(got[index]), expected[index]), f"picture {index + 1}"


def test_one_unet_call_for_the_batch_agrees_to_a_pixel_level(tiny_model, cond):
    """What a GPU does (the whole batch per UNet call): the CPU kernels' batch-size-dependent sums move
    the last bits, nothing more."""
    seeds = [SEED, SEED + 1, SEED + 2]
    calls = []
    unet = tiny_model.pipe.unet
    original = unet.forward

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    unet.forward = counting
    try:
        fast = run(tiny_model, StepCond.of(cond, SIZE, SIZE).constant(), steps=4, seeds=seeds, unet_batch=3, output="np")
    finally:
        del unet.forward
    assert calls == [6] * 4
    alone = reference(tiny_model, cond, "Euler a", steps=4, cfg=7.0, seed=SEED, n=3)
    for index in range(3):
        diff = np.abs(np.round(fast[index] * 255).astype(int) - alone[index].astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.1, f"picture {index + 1}: {diff.max()} {diff.mean()}"


def test_a_batch_draws_each_picture_s_own_noise():
    from sdrepl.core.noise import plan_noise

    for name in ("Euler a", "DPM++ SDE", "DPM++ 2M SDE"):
        shape = (1, 4, 4, 4)
        alone = [plan_noise(make_scheduler(name, None), steps=3, shape=shape, dtype=torch.float32, seeds=[s],
                            device=torch.device("cpu")) for s in (5, 6)]
        both = plan_noise(make_scheduler(name, None), steps=3, shape=(2, 4, 4, 4), dtype=torch.float32,
                          seeds=[5, 6], device=torch.device("cpu"))
        assert torch.equal(both.latents, torch.cat([a.latents for a in alone]))
        assert len(both.step_noise) == len(alone[0].step_noise) and len(both.tree_noise) == len(alone[0].tree_noise)
        assert both.step_noise or both.tree_noise, name
        for index, noise in enumerate(both.step_noise):
            assert torch.equal(noise, torch.cat([a.step_noise[index] for a in alone])), name
        for index, noise in enumerate(both.tree_noise):
            assert torch.equal(noise, torch.cat([a.tree_noise[index] for a in alone])), name


@pytest.mark.parametrize("name", ["Euler a", "DPM++ 2M Karras", "DPM++ SDE"])
def test_sdxl_gives_the_sdxl_pipeline_pixels(name):
    """SDXL's extra conditioning (pooled embeddings, time ids) goes through the loop's extra UNet inputs:
    the pictures are ``StableDiffusionXLPipeline``'s."""
    from sdrepl.core.models import load_model

    xl = load_model("tiny-sdxl", device="cpu", dtype="fp32")
    cond = encode_prompts(xl, "a photo of a cat", "ugly", StaticLookup())
    steps = steps_for(name)
    scheduler = make_scheduler(name, xl.pipe.scheduler.config)
    if hasattr(scheduler, "noise_sampler_seed"):
        scheduler.noise_sampler_seed = SEED
    pipe = diffusers.StableDiffusionXLPipeline(**{**xl.pipe.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt_embeds=cond.prompt_embeds, negative_prompt_embeds=cond.negative_prompt_embeds,
                    **cond.pipeline_inputs(64, 64), num_inference_steps=steps, guidance_scale=7.0, width=64,
                    height=64, generator=torch.Generator("cpu").manual_seed(SEED), output_type="pil").images[0]
    got = sample(xl, cond, steps=steps, cfg=7.0, width=64, height=64, seed=SEED,
                 scheduler=make_scheduler(name, xl.pipe.scheduler.config))
    assert np.array_equal(np.asarray(got), np.asarray(expected))
