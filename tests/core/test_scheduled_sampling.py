"""Prompt editing and AND inside the sampling loop, observed at the UNet and at the scheduler.

The UNet is wrapped to record what each call is conditioned on and what it predicts; the scheduler's
``step`` to record the combined noise prediction it is given. On ``tiny`` at 32 px.
"""

from __future__ import annotations

import pytest
import torch

from sdrepl.core.conditioning import encode_text
from sdrepl.core.plan_conditioning import encode_scheduled
from sdrepl.core.prompt import StaticLookup
from sdrepl.core.samplers import make_scheduler, sample
from sdrepl.core.schedule import prompt_schedule

LOOKUP = StaticLookup()
SIZE = 32


@pytest.fixture
def recorded(tiny_model):
    """``calls``: (encoder_hidden_states, prediction) per UNet call, while the fixture is active."""
    unet = tiny_model.pipe.unet
    original = unet.forward
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append((kwargs["encoder_hidden_states"].clone(), out[0].clone()))
        return out

    unet.forward = spy
    try:
        yield calls
    finally:
        del unet.forward


def run(model, cond, sampler="Euler", *, steps, cfg=7.0):
    scheduler = make_scheduler(sampler, model.pipe.scheduler.config)
    return sample(model, cond, steps=steps, cfg=cfg, width=SIZE, height=SIZE, seed=3, scheduler=scheduler)


def test_step_k_of_a_20_step_run_is_conditioned_on_a1111s_text_for_k(tiny_model, recorded):
    prompt = "a [fantasy:cyberpunk:16] landscape"
    cond = encode_scheduled(tiny_model, prompt, "blurry", LOOKUP, steps=20)
    run(tiny_model, cond, steps=20)
    schedule = prompt_schedule(prompt, 20)
    negative = encode_text(tiny_model, "blurry", LOOKUP)
    assert len(recorded) == 20  # Euler: one UNet call per step, batch [negative, positive]
    for k, (hidden, _) in enumerate(recorded):
        expected = encode_text(tiny_model, schedule.text_at(k), LOOKUP)
        assert torch.equal(hidden[1:], expected), k
        assert torch.equal(hidden[:1], negative), k
    assert schedule.text_at(16) == "a fantasy landscape" and schedule.text_at(17) == "a cyberpunk landscape"


def test_alternation_on_a_second_order_sampler_keeps_one_text_per_step(tiny_model, recorded):
    cond = encode_scheduled(tiny_model, "[cow|horse] in a field", "", LOOKUP, steps=3)
    run(tiny_model, cond, "Heun", steps=3)
    cow, horse = (encode_text(tiny_model, f"{w} in a field", LOOKUP) for w in ("cow", "horse"))
    used = ["cow" if torch.equal(h[1:], cow) else "horse" if torch.equal(h[1:], horse) else "?" for h, _ in recorded]
    assert used == ["cow", "cow", "cow", "cow", "horse"]  # Heun: 2 calls a step; steps 0, 1 cow, step 2 horse


@pytest.mark.parametrize("cfg", [6.0, 1.0, 0.5])
def test_and_combines_the_noise_predictions_as_a1111(tiny_model, recorded, monkeypatch, cfg):
    """A1111's ``uncond + cfg * sum(w_i * (cond_i - uncond))`` at every cfg: at cfg <= 1 too (where a plain
    prompt skips the negative, as diffusers does), the parts are not simply averaged."""
    cond = encode_scheduled(tiny_model, "a red cube AND a blue sphere:0.6 AND grass:-0.3", "blurry", LOOKUP, steps=2)
    given: list[torch.Tensor] = []
    scheduler_type = type(make_scheduler("Euler", tiny_model.pipe.scheduler.config))
    original_step = scheduler_type.step

    def step(self, model_output, *args, **kwargs):
        given.append(model_output.clone())
        return original_step(self, model_output, *args, **kwargs)

    monkeypatch.setattr(scheduler_type, "step", step)
    run(tiny_model, cond, steps=2, cfg=cfg)
    given = [g for g in given if g.abs().sum() > 0]  # core.noise probes the schedule with zero outputs first
    assert len(given) == len(recorded) == 2
    for (hidden, pred), combined in zip(recorded, given, strict=True):
        assert hidden.shape[0] == 4  # one batch: negative, then the three parts
        uncond, *parts = pred.chunk(4)
        expected = uncond + cfg * (1.0 * (parts[0] - uncond) + 0.6 * (parts[1] - uncond) - 0.3 * (parts[2] - uncond))
        assert torch.allclose(combined, expected, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(combined, uncond + cfg * (parts[0] - uncond), atol=1e-4)


def test_a_trailing_weight_scales_the_guidance(tiny_model, recorded, monkeypatch):
    cond = encode_scheduled(tiny_model, "a photo, score:2", "", LOOKUP, steps=1)
    assert [w for _, w in cond.at(0).parts] == [2.0]
    plain = encode_scheduled(tiny_model, "a photo, score", "", LOOKUP, steps=1)
    weighted = run(tiny_model, cond, steps=1, cfg=3.0)
    doubled = run(tiny_model, plain, steps=1, cfg=6.0)  # u + 3 * 2 * (c - u) is guidance 6 on "a photo, score"
    import numpy as np

    assert np.abs(np.asarray(weighted, dtype=int) - np.asarray(doubled, dtype=int)).max() <= 1
