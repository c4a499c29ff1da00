"""The ``generate`` request: validate on the event loop, then queue :func:`start_generation` on the device.

The handler validates everything on the event loop (parameters, sampler name, size, the prompt's
``<names>``) so a mistake is answered at once, even while the device is busy; only then does the work
queue on the device thread. The work itself (``core/generation.py``) and the output folder
(``core/outputs.py``) are core logic with no daemon in them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from pathlib import Path
from typing import Any

from sdrepl.core.errors import NetworkError, PromptError
from sdrepl.core.generation import GenerationJob, PendingGeneration, prepared, start_generation
from sdrepl.core.hires import DEFAULT_DENOISE, DEFAULT_UPSCALER, UPSCALERS, HiresError, HiresFix, hires_size
from sdrepl.core.limits import LIMITS, MAX_SEED
from sdrepl.core.outputs import output_folder
from sdrepl.core.plan_budget import scheduled_prompt_budget
from sdrepl.core.prompt import MAX_COMMA_WINDOW, emphasis_mode
from sdrepl.core.samplers import DEFAULT_SAMPLER, find_sampler
from sdrepl.daemon.client_outputs import client_outputs
from sdrepl.daemon.context import DaemonContext
from sdrepl.daemon.networks import mark_broken, plan_for
from sdrepl.daemon.params import Params
from sdrepl.daemon.protocol import BadRequest
from sdrepl.daemon.registry import Request, handler
from sdrepl.daemon.uploads import discard, init_file_for


def _limited(p: Params, name: str, default: Any) -> Any:
    """Parameter ``name`` within ``core.limits.LIMITS`` (the table the REPL checks against too)."""
    limit = LIMITS[name]
    if isinstance(limit.lo, float):
        return p.number(name, default, lo=limit.lo, hi=limit.hi)
    return p.integer(name, default, lo=int(limit.lo), hi=int(limit.hi), nullable=default is None)


def prompt_settings(p: Params, settings: Any, request: str = "generate") -> tuple[str, int]:
    """A request's ``emphasis`` and ``comma_padding_backtrack`` (the daemon's settings where not given)."""
    emphasis = p.text("emphasis", getattr(settings, "emphasis", "Original"))
    try:
        emphasis = emphasis_mode(emphasis)
    except PromptError as exc:
        raise BadRequest(f"{request}: parameter 'emphasis': {exc}") from None
    window = p.integer("comma_padding_backtrack", getattr(settings, "comma_padding_backtrack", 20), lo=0,
                       hi=MAX_COMMA_WINDOW)
    return emphasis, window


def parse_job(params: dict, native_size: int | None = None, settings: Any = None) -> tuple[GenerationJob, bool]:
    """Validate a ``generate`` request's parameters; also whether the seed was chosen at random.
    ``settings`` (the daemon's) give the prompt settings a request does not name."""
    p = Params(params, "generate")
    prompt = p.text("prompt")
    negative = p.text("negative", "")
    steps = _limited(p, "steps", 20)
    cfg = _limited(p, "cfg", 7.0)
    seed = p.integer("seed", None, lo=-1, hi=MAX_SEED, nullable=True)  # -1: A1111's "random"
    width = _limited(p, "width", None)
    height = _limited(p, "height", None)
    sampler = find_sampler(p.text("sampler", DEFAULT_SAMPLER)).name
    n = _limited(p, "n", 1)
    clip_skip = _limited(p, "clip_skip", 1)
    emphasis, window = prompt_settings(p, settings)
    init, strength, hires = _img2img_and_hires(p)
    p.finish()
    size_from_init = init is not None and width is None and height is None
    width = width or native_size or 512
    height = height or native_size or 512
    for name, value in (("width", width), ("height", height)):
        if value % 8:
            raise BadRequest(f"generate: parameter {name!r} must be a multiple of 8, got {value} (e.g. "
                             f"{value - value % 8} or {value - value % 8 + 8})")
    random_seed = seed is None or seed == -1  # -1 is A1111's "random"
    if random_seed:
        seed = random.randrange(2**32)
    if hires is not None:
        try:
            hires_size(width, height, hires.scale)
        except HiresError as exc:
            raise BadRequest(f"generate: {exc}") from None
    job = GenerationJob(prompt, negative, steps, cfg, int(seed), width, height, sampler, n, clip_skip, emphasis,
                        window, init=init, strength=strength, size_from_init=size_from_init, hires=hires)
    return job, random_seed


def _img2img_and_hires(p: Params) -> tuple[str | None, float, HiresFix | None]:
    """``init`` (a picture path, or an ``upload:<id>`` token resolved by the handler), ``strength``, and the
    hires fix settings (``hires`` the scale; ``hires_steps``, ``hires_denoise``, ``hires_upscaler``)."""
    init = p.text("init", None)
    strength = _limited(p, "strength", None)
    scale_limit = LIMITS["hires_scale"]
    scale = p.number("hires", None, lo=scale_limit.lo, hi=scale_limit.hi)
    hires_steps = _limited(p, "hires_steps", None)
    denoise = _limited(p, "hires_denoise", None)
    upscaler = p.text("hires_upscaler", None, choices=tuple(UPSCALERS))
    if init is not None and (not init or "\x00" in init):
        raise BadRequest(f"generate: parameter 'init' must be a picture path, got {init!r}"[:300])
    if strength is not None and init is None:
        raise BadRequest("generate: parameter 'strength' is img2img's: give 'init' (the picture) too")
    if scale is None:
        given = [name for name, value in (("hires_steps", hires_steps), ("hires_denoise", denoise),
                                          ("hires_upscaler", upscaler)) if value is not None]
        if given:
            raise BadRequest(f"generate: parameter(s) {', '.join(given)} belong to hires fix: give 'hires' (the "
                             "scale) too")
        return init, 0.75 if strength is None else strength, None
    if init is not None:
        raise BadRequest("generate: 'hires' is A1111's txt2img Hires. fix and does not combine with 'init' "
                         "(img2img): for a larger img2img picture give the size you want")
    hires = HiresFix(scale, hires_steps or 0, DEFAULT_DENOISE if denoise is None else denoise,
                     upscaler or DEFAULT_UPSCALER)
    return None, 0.75, hires


async def _with_init_picture(job: GenerationJob, owner: int) -> GenerationJob:
    """The job with its init picture loaded (``core.generation.prepared``, in a thread: it decodes); an
    ``upload:<id>`` init (sent by a remote client, ``repl/uploads.py``) is read from the upload, which is
    then removed. The result reports the picture by the name it was sent under."""
    token = job.init if job.init is not None and job.init.startswith("upload:") else None
    if token is None:
        return await asyncio.to_thread(prepared, job)
    path = init_file_for(token, owner)
    try:
        loaded = await asyncio.to_thread(prepared, dataclasses.replace(job, init=path), Path(path).name)
    finally:
        discard(token, owner)
    return dataclasses.replace(loaded, init=Path(path).name)


@handler("generate")
async def generate(ctx: DaemonContext, params: dict, req: Request) -> dict:
    received = time.monotonic()
    params = dict(params)
    outputs = client_outputs(ctx, params.pop("outputs", None), remote=getattr(req.connection, "remote", False))
    parse_job(params, 8, ctx.settings)  # reject bad parameters before waiting for a model keep-alive unloaded
    assert ctx.residency is not None
    async with ctx.residency.using() as model:
        job, random_seed = parse_job(params, model.native_size, ctx.settings)
        if job.init is not None:  # img2img: the picture read and checked now (bounded), off the loop
            job = await _with_init_picture(job, id(req.connection))
        # An unknown <name> is answered now, not after the queue (the device may be busy for a while).
        # On the loop, not in a thread: a budget takes well under a millisecond with a warm cache, and
        # a thread pool would let two requests reach the device queue in another order than they came.
        # Extra-network tags are cut from the raw prompt first (they cost no tokens); unknown names and
        # tags in the negative prompt are answered here too.
        networks = plan_for(ctx, job.prompt, job.negative)
        # Every text the schedule uses is checked (a bad weight in a later step's text fails now too).
        # With a Ray fleet the lookup remembers the embeddings the prompt uses; they travel with the request.
        lookup = ctx.library if ctx.fleet is None else ctx.fleet.lookup(ctx.library)
        scheduled_prompt_budget(networks.text, job.negative, model.tokenizer, lookup, job.options,
                                steps=job.steps)

        def progress(step: int, total: int, image: int) -> None:
            req.send_event("progress", request=req.id, step=step, total=total, image=image, images=job.n)

        queued = time.monotonic()
        started: list[float] = []
        ahead = ctx.worker.ahead if ctx.pool is None else ctx.pool.ahead
        if ahead:  # protocol v2: the client can say "queued (position N)" until the first step arrives
            req.send_event("progress", request=req.id, step=0, total=job.steps_run * job.n, image=0, images=job.n,
                           queued=ahead)

        def work(on: Any = model) -> PendingGeneration:
            started.append(time.monotonic())
            return start_generation(on, ctx.library, job, output_folder(outputs),
                                    cancel_event=req.cancel_event, on_progress=progress, networks=networks)

        worker = None
        try:
            if ctx.fleet is not None:  # serve --ray: a replica of the Serve deployment (daemon/fleet.py)
                pending, worker = await ctx.fleet.run(job, lookup, networks, output_folder(outputs), req.cancel_event,
                                                      model)
            elif ctx.pool is None:
                pending = await ctx.worker.run(work, cancel_event=req.cancel_event, label="generate")
            else:  # --device a,b: the first free device (daemon/workers.py)
                pending, worker = await ctx.pool.run(work, model, req.cancel_event)
        except NetworkError as exc:
            mark_broken(ctx, networks, exc)
            raise
        # The device is free for the next request now; the reply waits for the writer thread's files.
        result = await asyncio.to_thread(pending.wait)
    if worker is not None:
        result["worker"] = worker if isinstance(worker, str) else worker.label
    result["seed"] = job.seed
    result["random_seed"] = random_seed
    result["queued_s"] = round((started[0] if started else queued) - queued, 4)
    result["total_s"] = round(time.monotonic() - received, 4)
    return result
