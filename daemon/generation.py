"""The ``generate`` request: prompt -> conditioning -> pipeline -> PNG files with A1111 metadata.

The handler validates everything on the event loop (parameters, sampler name, size, the prompt's
``<names>``) so a mistake is answered at once, even while the device is busy; only then does the work
queue on the device thread. :func:`run_generation` is the device-side work and has no daemon in it, so
the benchmark can call it in-process to measure what the daemon adds.

Reproducibility: noise comes from a CPU ``torch.Generator`` seeded per picture (picture i uses seed+i), so
a seed gives the same picture on every device, and ``n`` pictures are n single-picture runs (a picture
made in a batch of 4 is the picture made alone with its seed).
"""

from __future__ import annotations

import datetime
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdrepl.core.atomic import atomic_writer
from sdrepl.core.budget import prompt_budget
from sdrepl.core.embedding import Embedding
from sdrepl.core.models import LoadedModel
from sdrepl.core.pnginfo import build_parameters, png_text_chunks
from sdrepl.core.prompt import EmbeddingLookup, PromptOptions
from sdrepl.core.samplers import DEFAULT_SAMPLER, find_sampler
from sdrepl.daemon.context import DaemonContext
from sdrepl.daemon.params import Params
from sdrepl.daemon.protocol import BadRequest, Cancelled
from sdrepl.daemon.registry import Request, handler

MAX_SEED = 2**64 - 1 - 16  # picture i uses seed + i; torch seeds are 64-bit
_COUNTER = re.compile(r"^(\d+)-")


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


class OutputFolder:
    """``<root>/<YYYY-MM-DD>/<00001>-<seed>.png``: numbering continues from the files already there."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._next: dict[Path, int] = {}
        self._lock = threading.Lock()

    def _scan(self, folder: Path) -> int:
        highest = 0
        if folder.is_dir():
            for entry in folder.iterdir():
                match = _COUNTER.match(entry.name)
                if match:
                    highest = max(highest, int(match.group(1)))
        return highest + 1

    def save(self, write: Callable[[Path], None], seed: int) -> Path:
        """Write a new picture through ``write(temp_path)``; never overwrites (a taken name is skipped)."""
        folder = self.root / datetime.date.today().isoformat()
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(1000):
            with self._lock:
                number = self._next.get(folder) or self._scan(folder)
                self._next[folder] = number + 1
            path = folder / f"{number:05d}-{seed}.png"
            try:
                with atomic_writer(path, overwrite=False) as tmp:
                    write(tmp)
                return path
            except FileExistsError:  # another writer (a second daemon) took it: rescan
                with self._lock:
                    self._next[folder] = self._scan(folder)
        raise OSError(f"cannot find a free picture name in {folder}")


_OUTPUTS: dict[Path, OutputFolder] = {}


def output_folder(root: Path) -> OutputFolder:
    root = Path(root)
    if root not in _OUTPUTS:
        _OUTPUTS[root] = OutputFolder(root)
    return _OUTPUTS[root]


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


def run_generation(
    model: LoadedModel,
    lookup: EmbeddingLookup,
    job: GenerationJob,
    outputs: OutputFolder,
    *,
    cancel_event: threading.Event | None = None,
    on_progress: Callable[[int, int, int], None] | None = None,
) -> dict[str, Any]:
    """Make ``job.n`` pictures on the calling (device) thread; ``on_progress(step, total, image)``."""
    from sdrepl.core.conditioning import encode_prompts
    from sdrepl.core.samplers import make_scheduler, sample

    started = time.monotonic()
    pipe = model.pipe
    pipe.scheduler = make_scheduler(job.sampler, pipe.scheduler.config)
    recorder = RecordingLookup(lookup)
    cond = encode_prompts(model, job.prompt, job.negative, recorder, PromptOptions(clip_skip=job.clip_skip))
    ti_hashes = recorder.ti_hashes()
    total = job.steps * job.n
    images = []
    for index in range(job.n):
        seed = job.seed + index

        def on_step(_pipe: Any, step: int, _timestep: Any, kwargs: dict, index: int = index) -> dict:
            if cancel_event is not None and cancel_event.is_set():
                raise Cancelled(f"generate: cancelled at step {step + 1} of {job.steps} (picture {index + 1} of "
                                f"{job.n})")
            if on_progress is not None:
                on_progress(index * job.steps + step + 1, total, index)
            return kwargs

        if cancel_event is not None and cancel_event.is_set():
            raise Cancelled(f"generate: cancelled before picture {index + 1} of {job.n}")
        image = sample(model, cond, steps=job.steps, cfg=job.cfg, width=job.width, height=job.height, seed=seed,
                       on_step=on_step)
        text = build_parameters(prompt=job.prompt, negative=job.negative, steps=job.steps, sampler=job.sampler,
                                cfg=job.cfg, seed=seed, width=job.width, height=job.height,
                                model_hash=model.model_hash, model=model_label(model), clip_skip=job.clip_skip,
                                ti_hashes=ti_hashes)
        info = png_text_chunks(text)
        path = outputs.save(lambda tmp, image=image, info=info: image.save(tmp, format="PNG", pnginfo=info), seed)
        images.append({"path": str(path), "seed": seed})
    return {"images": images, "tokens": cond.budget, "elapsed_s": round(time.monotonic() - started, 4)}


def parse_job(params: dict, native_size: int | None = None) -> tuple[GenerationJob, bool]:
    """Validate a ``generate`` request's parameters; also whether the seed was chosen at random."""
    p = Params(params, "generate")
    prompt = p.text("prompt")
    negative = p.text("negative", "")
    steps = p.integer("steps", 20, lo=1, hi=1000)
    cfg = p.number("cfg", 7.0, lo=0.0, hi=100.0)
    seed = p.integer("seed", None, lo=-1, hi=MAX_SEED, nullable=True)
    width = p.integer("width", None, lo=8, hi=8192, nullable=True)
    height = p.integer("height", None, lo=8, hi=8192, nullable=True)
    sampler = find_sampler(p.text("sampler", DEFAULT_SAMPLER)).name
    n = p.integer("n", 1, lo=1, hi=16)
    clip_skip = p.integer("clip_skip", 1, lo=1, hi=12)
    p.finish()
    width = width or native_size or 512
    height = height or native_size or 512
    for name, value in (("width", width), ("height", height)):
        if value % 8:
            raise BadRequest(f"generate: parameter {name!r} must be a multiple of 8, got {value} (e.g. "
                             f"{value - value % 8} or {value - value % 8 + 8})")
    random_seed = seed is None or seed == -1  # -1 is A1111's "random"
    if random_seed:
        seed = random.randrange(2**32)
    return GenerationJob(prompt, negative, steps, cfg, int(seed), width, height, sampler, n, clip_skip), random_seed


@handler("generate")
async def generate(ctx: DaemonContext, params: dict, req: Request) -> dict:
    received = time.monotonic()
    parse_job(params, 8)  # reject bad parameters before waiting for a model that keep-alive unloaded
    assert ctx.residency is not None
    async with ctx.residency.using() as model:
        job, random_seed = parse_job(params, model.native_size)
        # An unknown <name> is answered now, not after the queue (the device may be busy for a while).
        # On the loop, not in a thread: a budget takes well under a millisecond with a warm cache, and
        # a thread pool would let two requests reach the device queue in another order than they came.
        prompt_budget(job.prompt, job.negative, model.tokenizer, ctx.library, PromptOptions(clip_skip=job.clip_skip))

        def progress(step: int, total: int, image: int) -> None:
            req.send_event("progress", request=req.id, step=step, total=total, image=image, images=job.n)

        queued = time.monotonic()
        started: list[float] = []

        def work() -> dict[str, Any]:
            started.append(time.monotonic())
            return run_generation(model, ctx.library, job, output_folder(ctx.settings.outputs),
                                  cancel_event=req.cancel_event, on_progress=progress)

        result = await ctx.worker.run(work, cancel_event=req.cancel_event, label="generate")
    result["seed"] = job.seed
    result["random_seed"] = random_seed
    result["queued_s"] = round((started[0] if started else queued) - queued, 4)
    result["total_s"] = round(time.monotonic() - received, 4)
    return result
