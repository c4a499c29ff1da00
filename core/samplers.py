"""Samplers by the names users know from AUTOMATIC1111 (and ComfyUI), mapped to diffusers schedulers.

A name is matched case-insensitively with spaces, ``_``, ``-`` and ``+`` folded, so ``DPM++ 2M Karras``,
``dpmpp_2m_karras`` and ``dpm++ 2m karras`` are one sampler.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sdrepl.core.errors import SamplerError

#: The Stable Diffusion noise schedule, used when a model brings no scheduler config of its own.
SD_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "prediction_type": "epsilon",
    # As SD's own scheduler config (and A1111's DDIM/PLMS): no x0 clipping, last alpha from the schedule.
    # diffusers' DDIM/PNDM class defaults differ, and a pipeline fixes ``clip_sample`` only at construction,
    # never for a scheduler swapped in later.
    "clip_sample": False,
    "set_alpha_to_one": False,
}


@dataclass(frozen=True)
class Sampler:
    name: str
    scheduler: str
    options: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()


SAMPLERS: tuple[Sampler, ...] = (
    Sampler("Euler a", "EulerAncestralDiscreteScheduler", aliases=("euler_ancestral", "euler_a")),
    Sampler("Euler", "EulerDiscreteScheduler"),
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2},
            aliases=("dpmpp_2m",)),
    Sampler("DPM++ 2M Karras", "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
            aliases=("dpmpp_2m_karras",)),
    Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"},
            aliases=("dpmpp_2m_sde",)),
    Sampler("DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}, aliases=("dpmpp_2m_sde_karras",)),
    Sampler("DPM++ SDE", "DPMSolverSDEScheduler", aliases=("dpmpp_sde",)),
    Sampler("DPM++ SDE Karras", "DPMSolverSDEScheduler", {"use_karras_sigmas": True},
            aliases=("dpmpp_sde_karras",)),
    Sampler("DPM2", "KDPM2DiscreteScheduler", aliases=("dpm_2",)),
    Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler", aliases=("dpm_2_ancestral",)),
    Sampler("DDIM", "DDIMScheduler"),
    Sampler("PLMS", "PNDMScheduler", {"skip_prk_steps": True}),
    Sampler("UniPC", "UniPCMultistepScheduler", aliases=("uni_pc",)),
    Sampler("LMS", "LMSDiscreteScheduler"),
    Sampler("LMS Karras", "LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    Sampler("Heun", "HeunDiscreteScheduler"),
)

DEFAULT_SAMPLER = "Euler a"


def _fold(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name.lower().replace("++", "pp").replace("+", "p"))


_BY_KEY: dict[str, Sampler] = {}
for _s in SAMPLERS:
    for _n in (_s.name, *_s.aliases):
        _BY_KEY[_fold(_n)] = _s


def sampler_names() -> list[str]:
    return [s.name for s in SAMPLERS]


def find_sampler(name: str) -> Sampler:
    """The sampler called ``name``, or a :class:`SamplerError` listing the valid names."""
    sampler = _BY_KEY.get(_fold(name or ""))
    if sampler is None:
        raise SamplerError(f"unknown sampler {name!r}; valid samplers: {', '.join(sampler_names())}")
    return sampler


def make_scheduler(name: str, base_config: Mapping[str, Any] | None):
    """A fresh diffusers scheduler for sampler ``name``, keeping the model's noise schedule.

    ``base_config`` is the model's own scheduler config (its betas and prediction type matter: SD 2.x
    768 models use v-prediction); without one, the SD 1.x schedule is used.
    """
    import diffusers

    sampler = find_sampler(name)
    cls = getattr(diffusers, sampler.scheduler)
    config = dict(SD_SCHEDULE)
    if base_config:
        for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                    "prediction_type", "steps_offset", "timestep_spacing", "rescale_betas_zero_snr",
                    "clip_sample", "set_alpha_to_one"):
            if key in base_config and base_config[key] is not None:
                config[key] = base_config[key]
    config.update(sampler.options)
    return cls.from_config(config)


def sample(model: Any, cond: Any, *, steps: int, cfg: float, width: int, height: int, seed: int,
           on_step: Any = None, scheduler: Any = None):
    """One picture from prepared conditioning (``core.conditioning.Conditioning``) through sdrepl's own loop
    (``core.denoise``); the noise comes from a CPU generator seeded with ``seed``, so a seed gives the same
    picture on every device. ``scheduler`` defaults to a fresh copy of the model's current one;
    ``on_step(done, total)`` is called after each sampler step. Returns a PIL image."""
    return sample_batch(model, cond, steps=steps, cfg=cfg, width=width, height=height, seeds=[seed],
                        on_step=on_step, scheduler=scheduler)[0]


def sample_batch(model: Any, cond: Any, *, steps: int, cfg: float, width: int, height: int, seeds: list[int],
                 on_step: Any = None, scheduler: Any = None, init_latents: Any = None, start_step: int = 0,
                 output: str = "pil") -> Any:
    """``len(seeds)`` pictures in one batch; picture ``i`` is the picture :func:`sample` makes with
    ``seeds[i]``. ``init_latents``/``start_step``: img2img (``core.denoise.denoise``); ``output="latent"``
    gives the final latents (hires fix's first pass)."""
    from sdrepl.core.denoise import Components, StepCond, denoise

    current = model.pipe.scheduler
    scheduler = scheduler if scheduler is not None else type(current).from_config(current.config)
    # A scheduled prompt (core.plan_conditioning) answers per step; a plain Conditioning is constant.
    provider = getattr(cond, "provider", None)
    conditioning = provider(width, height) if provider is not None else StepCond.of(cond, width, height).constant()
    return denoise(Components.of(model.pipe), scheduler=scheduler, steps=steps, cfg=cfg, width=width,
                   height=height, seeds=seeds, conditioning=conditioning, on_step=on_step,
                   init_latents=init_latents, start_step=start_step, output=output)
