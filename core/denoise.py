"""sdrepl's denoising loop: scheduler, initial latents, UNet with classifier-free guidance, VAE decode.

It does what ``StableDiffusionPipeline.__call__`` does (the tests check the pixels are bit-identical for
every sampler at fixed seeds) but owns the loop, so the rest of sdrepl can reach into it:

- **conditioning per step**: ``conditioning(step) -> StepCond`` is asked before every UNet call with the
  index of the sampler step among those this run takes (A1111's prompt editing ``[a:b:0.5]`` and
  alternation ``[a|b]``; an img2img run starting at step 10 asks for step 0 first, as A1111 does);
- **several positives with weights** (A1111's ``AND``, composable diffusion): the noise prediction is
  ``uncond + sum(w_i * cfg * (cond_i - uncond))`` at every cfg, as A1111's (a plain prompt at cfg <= 1
  skips the negative, as diffusers does); one positive of weight 1 is plain guidance, computed with
  diffusers' own expression so it stays bit-identical;
- **extra UNet inputs per conditioning** (SDXL's ``added_cond_kwargs``: ``text_embeds``, ``time_ids``),
  batched in the same order as the prompt embeddings;
- **initial latents and a start step** (img2img: the clean latents are noised to the start step);
- **batches**: ``seeds`` is one seed per picture, and picture ``i`` is the picture a batch of one with
  ``seeds[i]`` gives (noise from a generator per picture, decode per picture);
- **noise** is drawn on the CPU once, before the first step, and fed from the device (``core.noise``);
- ``on_step(done, total)`` after every sampler step (progress; raise from it to cancel).

The pipeline object is used for its components only (:class:`Components`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sdrepl.core.noise import plan_noise


@dataclass(frozen=True)
class Cond:
    """One prompt's encoding: hidden states ``[1, L, D]`` and its extra UNet inputs (each ``[1, ...]``)."""

    embeds: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class StepCond:
    """What one UNet call is conditioned on: weighted positives (``AND``) and the negative."""

    positives: list[tuple[Cond, float]]
    negative: Cond

    @classmethod
    def of(cls, conditioning: Any, width: int, height: int) -> StepCond:
        """From a ``core.conditioning.Conditioning`` (one positive, weight 1); an SDXL one
        (``core.conditioning_sdxl.SdxlConditioning``) brings its pooled embeddings and the time ids for
        this picture size as the UNet's extra inputs."""
        added_cond = getattr(conditioning, "added_cond", None)
        negative: dict[str, torch.Tensor] = {}
        positive: dict[str, torch.Tensor] = {}
        if added_cond is not None:
            for key, value in added_cond(width, height).items():  # a CFG batch: negative first
                negative[key], positive[key] = value.chunk(2)
        return cls([(Cond(conditioning.prompt_embeds, positive), 1.0)],
                   Cond(conditioning.negative_prompt_embeds, negative))

    def constant(self) -> Callable[[int], StepCond]:
        """A provider giving this conditioning at every step."""
        return lambda step: self

    @property
    def plain(self) -> bool:
        return len(self.positives) == 1 and self.positives[0][1] == 1.0


CondProvider = Callable[[int], StepCond]
StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class Components:
    """The parts of a diffusers pipeline the loop uses (the pipeline's ``__call__`` is never used)."""

    unet: Any
    vae: Any
    image_processor: Any
    vae_scale_factor: int
    #: ``core.speed.Speed`` when the fast path was set up (``--compile`` warm-ups are recorded there).
    speed: Any = None

    @classmethod
    def of(cls, pipe: Any) -> Components:
        from sdrepl.core.speed import speed_of

        return cls(pipe.unet, pipe.vae, pipe.image_processor, int(pipe.vae_scale_factor), speed_of(pipe))


def _batched(conds: Sequence[Cond], batch: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
    """``conds`` each repeated ``batch`` times, in order ([c0]*B + [c1]*B ...), as the pipeline batches."""
    embeds = torch.cat([c.embeds.to(device, dtype).expand(batch, -1, -1) for c in conds])
    keys = set(conds[0].added)
    if any(set(c.added) != keys for c in conds):
        raise ValueError("every conditioning of one step must bring the same extra UNet inputs")
    added = {}
    for key in sorted(keys):
        parts = []
        for c in conds:
            value = c.added[key].to(device)
            if value.is_floating_point():
                value = value.to(dtype)
            parts.append(value.expand(batch, *value.shape[1:]))
        added[key] = torch.cat(parts)
    return embeds, added


def _predict(unet: Any, latents: torch.Tensor, t: Any, conds: Sequence[Cond], scheduler: Any,
             unet_kwargs: dict[str, Any], unet_batch: int) -> list[torch.Tensor]:
    """The UNet's noise prediction for ``latents`` under each of ``conds``: one call per ``unet_batch``
    pictures and group of equal sequence length (normally one group)."""
    groups: dict[int, list[int]] = {}
    for index, c in enumerate(conds):
        groups.setdefault(int(c.embeds.shape[1]), []).append(index)
    out: list[list[torch.Tensor]] = [[] for _ in conds]
    for part in latents.split(unet_batch):
        batch = part.shape[0]
        for indices in groups.values():
            members = [conds[i] for i in indices]
            model_input = torch.cat([part] * len(members)) if len(members) > 1 else part
            if hasattr(scheduler, "scale_model_input"):
                model_input = scheduler.scale_model_input(model_input, t)
            embeds, added = _batched(members, batch, latents.device, unet.dtype)
            pred = unet(model_input, t, encoder_hidden_states=embeds, timestep_cond=None,
                        added_cond_kwargs=added or None, return_dict=False, **unet_kwargs)[0]
            for i, chunk in zip(indices, pred.chunk(len(members)), strict=True):
                out[i].append(chunk)
    return [parts[0] if len(parts) == 1 else torch.cat(parts) for parts in out]


def default_unet_batch(device: torch.device, pictures: int) -> int:
    """Pictures per UNet call. On a GPU the whole batch (the point of batching); on the CPU one, because
    CPU kernels (oneDNN convolutions, MKL's small-matrix paths) sum in an order that depends on the batch
    size, and a picture made in a batch must be bit for bit the picture made alone with its seed, while a
    CPU gains little from batching. GPU kernels too may pick other algorithms per batch size, so there a
    batch's pictures equal their batch-of-one pictures up to the last bits of the float sums."""
    return pictures if device.type in ("cuda", "mps", "xpu") else 1


def guided(step: StepCond, preds: list[torch.Tensor], cfg: float, use_cfg: bool) -> torch.Tensor:
    """Combine the predictions (``preds[0]`` the negative's when ``use_cfg``, then one per positive).

    Without guidance (``cfg <= 1``, diffusers skips the negative) a plain prompt's prediction is used as
    it is; a step with several weighted positives (``AND``) always has the negative's prediction too,
    since A1111 combines ``uncond + cfg * sum(w_i * (cond_i - uncond))`` at every cfg."""
    if not use_cfg:
        assert step.plain, "an AND step always runs with the negative"
        return preds[0]
    uncond, *conds = preds
    if step.plain:
        return uncond + cfg * (conds[0] - uncond)  # diffusers' expression, for bit-identical pictures
    result = uncond.clone()
    for pred, (_, weight) in zip(conds, step.positives, strict=True):
        result += (pred - uncond) * (weight * cfg)
    return result


def latent_stats(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The VAE's per-channel latent mean and std (``[1, C, 1, 1]``, on ``like``'s device and dtype) where its
    config has them (some SDXL-family VAEs), else None: only ``scaling_factor`` maps latents to the UNet's
    space then. Used both ways: decoding here, encoding in ``core.img2img``."""
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None
    return (torch.tensor(mean).view(1, -1, 1, 1).to(like.device, like.dtype),
            torch.tensor(std).view(1, -1, 1, 1).to(like.device, like.dtype))


def decode(components: Components, latents: torch.Tensor, output: str = "pil") -> list[Any]:
    """Latents -> pictures, one picture at a time (a batch's pictures equal their batch-of-one pictures,
    and the VAE's peak memory stays that of one picture). An fp16 VAE that overflows (NaN/Inf: SDXL's
    VAE does at 1024 px) is retried in fp32 for that picture only, as A1111 does."""
    vae = components.vae
    stats = latent_stats(vae, latents)
    if stats is not None:
        mean_t, std_t = stats
        latents = latents * std_t / vae.config.scaling_factor + mean_t
    else:
        latents = latents / vae.config.scaling_factor
    pictures = []
    for index in range(latents.shape[0]):
        one = latents[index:index + 1]
        image = vae.decode(one.to(vae.dtype), return_dict=False)[0]
        if vae.dtype == torch.float16 and not bool(torch.isfinite(image).all()):
            image = _decode_fp32(vae, one)
        pictures.extend(components.image_processor.postprocess(image, output_type=output, do_denormalize=[True]))
    return pictures


def _decode_fp32(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    vae.to(torch.float32)
    try:
        return vae.decode(latents.to(torch.float32), return_dict=False)[0]
    finally:
        vae.to(torch.float16)


@torch.no_grad()
def denoise(
    components: Components,
    *,
    scheduler: Any,
    steps: int,
    cfg: float,
    width: int,
    height: int,
    seeds: Sequence[int],
    conditioning: CondProvider,
    init_latents: torch.Tensor | None = None,
    start_step: int = 0,
    on_step: StepCallback | None = None,
    unet_kwargs: dict[str, Any] | None = None,
    unet_batch: int | None = None,
    output: str = "pil",
) -> Any:
    """Run the sampler and return ``len(seeds)`` pictures (PIL, or numpy with ``output="np"``), or the
    final latents with ``output="latent"``.

    ``scheduler`` is a fresh scheduler (``core.samplers.make_scheduler``); it is set up here.
    ``unet_batch`` is the pictures per UNet call (:func:`default_unet_batch`). With ``init_latents`` (clean latents, ``[1 or B, C, h, w]``) the run starts at sampler step ``start_step``
    from those latents noised to that step (img2img); ``on_step(done, total)`` counts sampler steps
    (``total`` = ``steps``), so an img2img run's first report is ``start_step + 1``.
    """
    unet = components.unet
    device = unet.device
    dtype = unet.dtype
    batch = len(seeds)
    if not 0 <= start_step < steps:
        raise ValueError(f"start step {start_step} is outside 0..{steps - 1}")
    if start_step and init_latents is None:
        raise ValueError("a start step needs the initial latents to start from")
    shape = (batch, int(unet.config.in_channels), height // components.vae_scale_factor,
             width // components.vae_scale_factor)

    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    order = getattr(scheduler, "order", 1)
    begin = start_step * order
    if begin:
        timesteps = timesteps[begin:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)
    noise = plan_noise(scheduler, steps=steps, shape=shape, dtype=dtype, seeds=seeds, device=device,
                       begin_index=begin)
    if init_latents is None:
        latents = noise.latents * scheduler.init_noise_sigma
    else:
        clean = init_latents.to(device, dtype)
        clean = clean.expand(batch, *clean.shape[1:]) if clean.shape[0] == 1 else clean
        latents = scheduler.add_noise(clean, noise.latents, timesteps[:1].repeat(batch))

    use_cfg = cfg > 1.0
    kwargs = dict(unet_kwargs or {})
    per_call = unet_batch or default_unet_batch(device, batch)
    # The step count diffusers' progress bar shows: one per ``order`` UNet calls, after a warm-up.
    warmup = len(timesteps) - (steps - start_step) * order
    done = start_step
    speed = components.speed
    first_use = speed.first_use(batch, height, width, device) if speed is not None else contextlib.nullcontext()
    with first_use:  # --compile: the first run at a shape compiles; its time is reported in status
        with noise.feeding(scheduler):
            for i, t in enumerate(timesteps):
                # A1111 counts the steps a run takes from 0 (an img2img run too, against the full schedule)
                step = conditioning(min(done - start_step, steps - 1))
                with_negative = use_cfg or not step.plain  # AND: A1111's formula at every cfg
                conds = [c for c, _ in step.positives]
                conds = [step.negative, *conds] if with_negative else conds
                preds = _predict(unet, latents, t, conds, scheduler, kwargs, per_call)
                noise_pred = guided(step, preds, cfg, with_negative)
                latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if i == len(timesteps) - 1 or ((i + 1) > warmup and (i + 1) % order == 0):
                    done += 1
                    if on_step is not None:
                        on_step(done, steps)
        result = latents if output == "latent" else decode(components, latents, output)
    return result
