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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdrepl.core.embedding import Embedding
from sdrepl.core.errors import Cancelled
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

    @property
    def options(self) -> PromptOptions:
        return PromptOptions(clip_skip=self.clip_skip, emphasis=self.emphasis, comma_window=self.comma_window)


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
    pipe = model.pipe
    pipe.scheduler = make_scheduler(job.sampler, pipe.scheduler.config)
    recorder = RecordingLookup(lookup)
    activate(pipe, networks)
    prompt_text = networks.text if networks is not None else job.prompt
    cond = _conditioning(model, job, recorder, prompt_text)
    extra = {**prediction_field(model), **(networks.parameters() if networks is not None else {}),
             **generation_extras(job, cond.plan.texts())}
    ti_hashes = recorder.ti_hashes()
    total = job.steps * job.n
    writes = PendingWrites()
    seeds = [job.seed + index for index in range(job.n)]
    first = 0  # index of the current batch's first picture

    def run(batch: list[int]) -> list[Any]:
        def on_step(done: int, _steps: int) -> None:
            if cancel_event is not None and cancel_event.is_set():
                raise Cancelled(f"generate: cancelled at step {done} of {job.steps} (picture {first + 1}"
                                f"{f'-{first + len(batch)}' if len(batch) > 1 else ''} of {job.n})")
            if on_progress is not None:
                on_progress(first * job.steps + done * len(batch), total, first)

        if cancel_event is not None and cancel_event.is_set():
            raise Cancelled(f"generate: cancelled before picture {first + 1} of {job.n}")
        return sample_batch(model, cond, steps=job.steps, cfg=job.cfg, width=job.width, height=job.height,
                            seeds=batch, on_step=on_step)

    size = pictures_per_batch(model, job.width, job.height, job.n)
    for batch, images in in_batches(seeds, size, run):
        for seed, image in zip(batch, images, strict=True):
            text = build_parameters(prompt=job.prompt, negative=job.negative, steps=job.steps,
                                    sampler=job.sampler, cfg=job.cfg, seed=seed, width=job.width,
                                    height=job.height, model_hash=model.model_hash, model=model_label(model),
                                    clip_skip=job.clip_skip, ti_hashes=ti_hashes, extra=extra)
            writes.add(outputs, image, text, seed)
        first += len(batch)
    loras = networks.describe() if networks is not None else []
    return PendingGeneration(writes, {"tokens": cond.budget, "loras": loras}, started)
