"""Prompt -> conditioning -> pipeline -> PNG files with A1111 metadata, on the calling (device) thread.

:func:`run_generation` is the device-side work of a ``generate`` request and has no daemon in it (the
daemon's handler in ``daemon/generation.py`` only validates and queues), so the benchmark can call it
in-process to measure what the daemon adds.

Reproducibility: noise comes from a CPU ``torch.Generator`` seeded per picture (picture i uses seed+i), so
a seed gives the same picture on every device, and ``n`` pictures run as one batch where the device
holds it, each the picture made alone with its seed (see ``core.denoise.default_unet_batch`` for what
"the same" means on a GPU). PNG encoding and fsync run on a writer thread; the result waits for them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sdrepl.core.embedding import Embedding
from sdrepl.core.errors import Cancelled
from sdrepl.core.hires import HiresFix
from sdrepl.core.models import LoadedModel
from sdrepl.core.outputs import OutputFolder
from sdrepl.core.picture_writer import PendingWrites
from sdrepl.core.pnginfo import build_parameters
from sdrepl.core.prompt import EmbeddingLookup, PromptOptions


@dataclass(frozen=True)
class GenerationJob:
    """One validated ``generate`` request (the seed is always decided by now)."""

    prompt: str
    negative: str
    steps: int
    cfg: float
    seed: int
    width: int
    height: int
    sampler: str
    n: int
    clip_skip: int
    #: A1111's emphasis mode and comma backtrack window (``core.prompt.EMPHASIS_MODES``).
    emphasis: str = "Original"
    comma_window: int = 20
    #: img2img (``core.img2img``): the init picture's path as the daemon reads it, and the strength.
    init: str | None = None
    strength: float = 0.75
    #: No size was asked for: the init picture's own size (rounded to a multiple of 8) is used.
    size_from_init: bool = False
    #: Hires. fix (``core.hires``), or None.
    hires: HiresFix | None = None
    #: The decoded init picture (``core.img2img.InitPicture``) once :func:`prepared` loaded it.
    init_picture: Any = field(default=None, compare=False, repr=False)
    #: Each picture's seed when they are not ``seed, seed + 1, ...``: ``!grid`` runs cells that differ only
    #: in their seed as one batch. Empty: ``n`` pictures from ``seed`` on (the ``generate`` form).
    seeds: tuple[int, ...] = ()

    @property
    def options(self) -> PromptOptions:
        return PromptOptions(clip_skip=self.clip_skip, emphasis=self.emphasis, comma_window=self.comma_window)

    @property
    def picture_seeds(self) -> list[int]:
        """The seed of each of the ``n`` pictures, in order."""
        return list(self.seeds) if self.seeds else [self.seed + index for index in range(self.n)]

    @property
    def final_size(self) -> tuple[int, int]:
        """The size of the pictures made: the hires pass's, or the job's."""
        if self.hires is None:
            return self.width, self.height
        from sdrepl.core.hires import hires_size

        return hires_size(self.width, self.height, self.hires.scale)

    @property
    def steps_run(self) -> int:
        """Sampler steps one picture takes over all its passes (what progress counts per picture)."""
        return sum(run for _, run in self.pass_steps())

    def pass_steps(self) -> list[tuple[int, int]]:
        """``(schedule steps, steps run)`` of each sampler pass: one, or two with hires fix; an img2img pass
        runs ``int(steps * strength)`` of its schedule."""
        from sdrepl.core.img2img import steps_to_run

        first = (self.steps, steps_to_run(self.steps, self.strength) if self.init is not None else self.steps)
        if self.hires is None:
            return [first]
        second = self.hires.second_steps(self.steps)
        return [first, (second, steps_to_run(second, self.hires.denoise))]


def prepared(job: GenerationJob, shown: str | None = None) -> GenerationJob:
    """``job`` with its init picture loaded (``core.img2img.load_init_picture``: bounded, checked) and,
    when no size was asked for, the picture's size as the job's; jobs without ``init`` are returned as is.
    ``shown`` names the picture in errors (an upload's name, not the daemon's temp path). Raises ``core.img2img.InitImageError`` for a picture that cannot be used."""
    if job.init is None or job.init_picture is not None:
        return job
    from sdrepl.core.img2img import fitted_size, load_init_picture

    picture = load_init_picture(job.init, shown)
    if job.size_from_init:
        width, height = fitted_size(*picture.size)
        return replace(job, init_picture=picture, width=width, height=height, size_from_init=False)
    return replace(job, init_picture=picture)


def job_summary(job: GenerationJob) -> dict[str, Any]:
    """What a result reports of img2img and hires fix (``init``, ``strength``, ``hires``); ``{}`` for txt2img."""
    out: dict[str, Any] = {}
    if job.init is not None:
        out["init"] = job.init
        out["strength"] = job.strength
    if job.hires is not None:
        width, height = job.final_size
        out["hires"] = {"scale": job.hires.scale, "steps": job.pass_steps()[1][0], "denoise": job.hires.denoise,
                        "upscaler": job.hires.upscaler, "width": width, "height": height}
    return out


def job_parameters(job: GenerationJob) -> dict[str, Any]:
    """A1111's fields of img2img (``Denoising strength``) and hires fix (``Hires upscale``, ...)."""
    if job.hires is not None:
        return job.hires.parameters()
    if job.init is not None:
        return {"Denoising strength": job.strength}
    return {}


class RecordingLookup:
    """The library as the prompt language sees it, remembering which embeddings a prompt used.

    The ``TI hashes`` written into a picture must name exactly the files its conditioning came from, even
    if the watcher swaps a file a moment later, so they are recorded at lookup time.
    """

    def __init__(self, lookup: EmbeddingLookup) -> None:
        self._lookup = lookup
        self.used: dict[str, Embedding] = {}

    def get(self, name: str) -> Embedding | None:
        emb = self._lookup.get(name)
        if emb is not None:
            self.used.setdefault(emb.qualified if "/" in name else emb.trigger, emb)
        return emb

    def suggest(self, name: str, limit: int = 3) -> list[str]:
        return self._lookup.suggest(name, limit)

    def triggers(self) -> list[str]:
        return self._lookup.triggers()

    def ti_hashes(self) -> dict[str, str]:
        return {name: emb.short_hash for name, emb in self.used.items()}


def model_label(model: LoadedModel) -> str:
    """A1111's ``Model``: the checkpoint's name without folder or extension."""
    return Path(str(model.name).rstrip("/")).stem or str(model.name)


def _conditioning(model: LoadedModel, job: GenerationJob, lookup: EmbeddingLookup, prompt: str) -> Any:
    """The prompt pair planned for ``job.steps`` and encoded (each distinct text once); sampling asks it
    for each step's conditioning (prompt editing, alternation, ``AND``). ``prompt`` has its extra-network
    tags cut out already, as A1111 cuts them before it reads the rest."""
    from sdrepl.core.plan_conditioning import encode_scheduled

    return encode_scheduled(model, prompt, job.negative, lookup, job.options, steps=job.steps)


def generation_extras(job: GenerationJob, texts: list[str]) -> dict[str, Any]:
    """The A1111 ``parameters`` fields the prompt settings add: ``Emphasis`` when not ``Original`` and one
    of the ``texts`` encoded has brackets (A1111's rule), and sdrepl's ``Comma padding backtrack`` when not
    the default 20 (A1111 does not record it; a picture made with another window could not be made again)."""
    extra: dict[str, Any] = {}
    if job.emphasis != "Original" and any(c in text for text in texts for c in "(["):
        extra["Emphasis"] = job.emphasis
    if job.comma_window != 20:
        extra["Comma padding backtrack"] = job.comma_window
    return extra


def prediction_field(model: LoadedModel) -> dict[str, str]:
    """``Prediction type`` for the metadata where it is not self-evident: every SD 2.x model (whose 512 and
    768 releases differ in it) and any model that predicts something other than epsilon."""
    kind = getattr(model, "prediction_type", "epsilon")
    return {"Prediction type": kind} if model.family == "sd2" or kind != "epsilon" else {}


def run_generation(
    model: LoadedModel,
    lookup: EmbeddingLookup,
    job: GenerationJob,
    outputs: OutputFolder,
    *,
    cancel_event: threading.Event | None = None,
    on_progress: Callable[[int, int, int], None] | None = None,
    networks: Any = None,
) -> dict[str, Any]:
    """Make ``job.n`` pictures on the calling (device) thread and wait for their files;
    ``on_progress(step, total, image)``. ``networks``: see :func:`start_generation`."""
    return start_generation(model, lookup, job, outputs, cancel_event=cancel_event, on_progress=on_progress,
                            networks=networks).wait()


class PendingGeneration:
    """A generation whose device work is done and whose files are being written (``wait`` for them)."""

    def __init__(self, writes: PendingWrites, result: dict[str, Any], started: float) -> None:
        self._writes = writes
        self._result = result
        self._started = started

    def wait(self) -> dict[str, Any]:
        images = self._writes.wait()
        return {"images": images, **self._result, "elapsed_s": round(time.monotonic() - self._started, 4)}


def start_generation(
    model: LoadedModel,
    lookup: EmbeddingLookup,
    job: GenerationJob,
    outputs: OutputFolder,
    *,
    cancel_event: threading.Event | None = None,
    on_progress: Callable[[int, int, int], None] | None = None,
    networks: Any = None,
) -> PendingGeneration:
    """The device work of :func:`run_generation`: ``job.n`` pictures in as few batches as the device holds
    (``core.batching``; picture ``i`` uses seed ``seed + i`` and is the picture a batch of one makes),
    each handed to the writer thread (``core.picture_writer``) as soon as it is decoded.

    ``networks`` is the prompt's :class:`~sdrepl.core.networks.use.NetworkPlan` (its text has the
    ``<lora:...>`` tags cut out); None means a prompt without tags. Either way the model carries exactly
    those networks for this job and nothing else (a plan without LoRAs is the untouched model).
    """
    from sdrepl.core.batching import in_batches, pictures_per_batch
    from sdrepl.core.networks.use import activate
    from sdrepl.core.samplers import make_scheduler, sample_batch

    started = time.monotonic()
    job = prepared(job)
    pipe = model.pipe
    pipe.scheduler = make_scheduler(job.sampler, pipe.scheduler.config)
    recorder = RecordingLookup(lookup)
    activate(pipe, networks)
    prompt_text = networks.text if networks is not None else job.prompt
    cond = _conditioning(model, job, recorder, prompt_text)
    passes = job.pass_steps()
    # Hires fix's second pass: the same prompt and networks, its schedule planned for its own steps.
    conds = [cond] + [cond if steps == job.steps else _conditioning(model, replace(job, steps=steps), recorder,
                                                                    prompt_text) for steps, _ in passes[1:]]
    extra = {**prediction_field(model), **(networks.parameters() if networks is not None else {}),
             **generation_extras(job, cond.plan.texts()), **job_parameters(job)}
    ti_hashes = recorder.ti_hashes()
    per_picture = job.steps_run
    total = per_picture * job.n
    writes = PendingWrites()
    seeds = job.picture_seeds
    first = 0  # index of the current batch's first picture
    # img2img / hires: the init picture encoded once per job (txt2img needs none of it)
    sampling = _Passes(model, job, conds, sample_batch) if job.init is not None or job.hires is not None else None

    def run(batch: list[int]) -> list[Any]:
        def on_step(done: int, _steps: int) -> None:
            if cancel_event is not None and cancel_event.is_set():
                raise Cancelled(f"generate: cancelled at step {done} of {job.steps} (picture {first + 1}"
                                f"{f'-{first + len(batch)}' if len(batch) > 1 else ''} of {job.n})")
            if on_progress is not None:
                on_progress(first * per_picture + done * len(batch), total, first)

        if cancel_event is not None and cancel_event.is_set():
            raise Cancelled(f"generate: cancelled before picture {first + 1} of {job.n}")
        if sampling is None:  # txt2img: the call it always was
            return sample_batch(model, cond, steps=job.steps, cfg=job.cfg, width=job.width, height=job.height,
                                seeds=batch, on_step=on_step)
        return sampling.run(batch, on_step)

    size = pictures_per_batch(model, *job.final_size, job.n)
    for batch, images in in_batches(seeds, size, run):
        for seed, image in zip(batch, images, strict=True):
            text = build_parameters(prompt=job.prompt, negative=job.negative, steps=job.steps,
                                    sampler=job.sampler, cfg=job.cfg, seed=seed, width=job.width,
                                    height=job.height, model_hash=model.model_hash, model=model_label(model),
                                    clip_skip=job.clip_skip, ti_hashes=ti_hashes, extra=extra)
            writes.add(outputs, image, text, seed)
        first += len(batch)
    loras = networks.describe() if networks is not None else []
    return PendingGeneration(writes, {"tokens": cond.budget, "loras": loras, **job_summary(job)}, started)


class _Passes:
    """The sampler passes of an img2img or hires job for one batch of seeds; ``on_step(done, total)``
    counts the steps run over all passes (an img2img pass's first report is 1, not its start step)."""

    def __init__(self, model: LoadedModel, job: GenerationJob, conds: list[Any], sample_batch: Any) -> None:
        from sdrepl.core.denoise import Components

        self.model = model
        self.job = job
        self.conds = conds
        self.sample_batch = sample_batch
        self.components = Components.of(model.pipe)
        self.clean = None
        if job.init is not None:  # encoded once per job; the batch expands it per picture
            from sdrepl.core.img2img import init_latents

            self.clean = init_latents(self.components, job.init_picture, job.width, job.height)

    def _pass(self, index: int, batch: list[int], latents: Any, width: int, height: int, done_before: int,
              on_step: Any, output: str) -> Any:
        from sdrepl.core.denoise import decode

        steps, run_steps = self.job.pass_steps()[index]
        if latents is not None and run_steps == 0:  # strength 0: the latents decoded unchanged
            latents = latents.expand(len(batch), *latents.shape[1:]) if latents.shape[0] == 1 else latents
            return latents if output == "latent" else decode(self.components, latents)
        start = steps - run_steps

        def counted(done: int, _total: int) -> None:
            on_step(done_before + done - start, self.job.steps)

        return self.sample_batch(self.model, self.conds[index], steps=steps, cfg=self.job.cfg, width=width,
                                 height=height, seeds=batch, on_step=counted, init_latents=latents,
                                 start_step=start, output=output)

    def run(self, batch: list[int], on_step: Any) -> list[Any]:
        job = self.job
        if job.hires is None:
            return self._pass(0, batch, self.clean, job.width, job.height, 0, on_step, "pil")
        from sdrepl.core.hires import upscale

        latents = self._pass(0, batch, self.clean, job.width, job.height, 0, on_step, "latent")
        width, height = job.final_size
        upscaled = upscale(self.components, latents, job.hires, width, height)
        return self._pass(1, batch, upscaled, width, height, job.pass_steps()[0][1], on_step, "pil")
