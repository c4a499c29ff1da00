"""The training requests: ``create``, ``train``, ``train_status``, ``train_pause|resume|stop``, ``preprocess``.

Thin handlers (see ``registry.py``): they check parameters, build the work from ``sdrepl.core.training``
and hand device work to the worker. One training job at a time: a second ``train`` while one is active is
answered with ``Busy``, naming the running job. While a job exists the model is held resident (keep-alive
does not unload it under a paused run).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
from pathlib import Path

from sdrepl.core.create import create_embedding_vectors
from sdrepl.core.embedding import Embedding
from sdrepl.core.errors import EmbeddingError, TrainingError
from sdrepl.core.formats import write_embedding
from sdrepl.core.training.options import ENVELOPE, TrainOptions, check_name
from sdrepl.core.training.plan import plan_run
from sdrepl.core.training.preprocess import CROPS, preprocess
from sdrepl.core.training.trainer import start_training
from sdrepl.daemon.context import DaemonContext
from sdrepl.daemon.params import Params
from sdrepl.daemon.protocol import BadRequest, Busy
from sdrepl.daemon.registry import Request, handler
from sdrepl.daemon.training_job import TrainingJob

CREATE_FORMATS = ("safetensors", "pt")


def current_job(ctx: DaemonContext) -> TrainingJob | None:
    job = ctx.training
    return job if isinstance(job, TrainingJob) else None


def active_job(ctx: DaemonContext, request: str) -> TrainingJob:
    job = current_job(ctx)
    if job is None:
        raise TrainingError(f"{request}: no training job; start one with !train NAME --data DIR")
    return job


def first_folder(ctx: DaemonContext) -> Path:
    return Path(ctx.settings.embeddings[0])


def embedding_at(ctx: DaemonContext, path: Path, name: str) -> Embedding | None:
    """The library's embedding for ``path`` (by path: a name may be taken by a file in another folder)."""
    target = Path(os.path.abspath(path))
    for emb in ctx.library.embeddings():
        if Path(os.path.abspath(emb.path)) == target:
            return emb
    return ctx.library.get(name)


@handler("create")
async def create(ctx: DaemonContext, params: dict, req: Request) -> dict:
    p = Params(params, "create")
    name = check_name(p.text("name"), "!create")
    init = p.text("init", "*")
    vectors = p.integer("vectors", 1, lo=1, hi=75)
    overwrite = p.flag("overwrite", False)
    fmt = p.text("format", "safetensors", choices=CREATE_FORMATS)
    p.finish()
    path = first_folder(ctx) / f"{name}.{fmt}"
    existing = ctx.library.get(name)
    if existing is not None and not overwrite:
        raise EmbeddingError(existing.path, f"an embedding named {name!r} already exists; pass --overwrite to "
                             "replace it, or choose another name")
    assert ctx.residency is not None
    async with ctx.residency.using() as model:
        data = await ctx.worker.run(lambda: create_embedding_vectors(model, init, vectors), label="create")
        model_hash = await asyncio.to_thread(lambda: model.model_hash)
    written = await asyncio.to_thread(write_embedding, path, data, fmt, name=name, step=0,
                                      checkpoint_hash=model_hash, checkpoint_name=model.name, init_text=init,
                                      overwrite=overwrite)
    change = await asyncio.to_thread(ctx.library.update_path, written)
    ctx.apply_library_change(change)
    emb = embedding_at(ctx, written, name)
    if emb is None:
        raise EmbeddingError(written, "was written but the library did not load it; see !embeddings for why")
    return {"embedding": emb.describe(), "path": str(written)}


@handler("train")
async def train(ctx: DaemonContext, params: dict, req: Request) -> dict:
    wait = params.get("wait", False)
    if not isinstance(wait, bool):
        raise BadRequest(f"train: parameter 'wait' must be true or false, got {wait!r}")
    options = TrainOptions.from_params({k: v for k, v in params.items() if k not in ENVELOPE})
    running = current_job(ctx)
    if running is not None and running.active:
        info = running.describe()
        raise Busy(f"train: the job {info['name']!r} is {info['state']} at step {info['step']}/{info['total']}; one "
                   "job at a time: wait for it, or !train stop it first")
    assert ctx.residency is not None
    resources = contextlib.AsyncExitStack()
    try:
        model = await resources.enter_async_context(ctx.residency.using())
        folder = first_folder(ctx)
        existing = embedding_at(ctx, folder / f"{options.name}.{options.format}", options.name)
        cwd = Path.cwd()

        def build():
            plan = plan_run(model, options, embeddings_dir=folder, cwd=cwd, existing=existing)
            return start_training(model, plan, library=ctx.library)

        trainer = await ctx.worker.run(build, label="train setup")
    except BaseException:
        await resources.aclose()
        raise
    running = current_job(ctx)
    if running is not None and running.active:  # another train request won the race while we set up
        await ctx.worker.run(trainer.close, label="train setup")
        await resources.aclose()
        raise Busy(f"train: the job {running.name!r} started meanwhile; one job at a time")
    job = TrainingJob(ctx, trainer, resources=resources)
    ctx.training = job
    job.start()
    if not wait:
        return {"job": job.describe()}
    state = await job.wait_for(())
    if state == "failed" or job.path is None:  # failed, or stopped by a daemon shutdown (checkpoint only)
        raise TrainingError(f"!train {job.name}: {job.error}")
    return job.result()


@handler("train_status")
async def train_status(ctx: DaemonContext, params: dict, req: Request) -> dict:
    Params(params, "train_status").finish()
    job = current_job(ctx)
    return {"job": job.describe() if job is not None else None}


@handler("train_pause")
async def train_pause(ctx: DaemonContext, params: dict, req: Request) -> dict:
    Params(params, "train_pause").finish()
    job = active_job(ctx, "train_pause")
    await job.pause()
    return {"job": job.describe()}


#: A job's end state in words, for messages about a job that cannot be resumed.
_ENDED = {"done": "finished", "stopped": "been stopped", "failed": "failed"}


@handler("train_resume")
async def train_resume(ctx: DaemonContext, params: dict, req: Request) -> dict:
    Params(params, "train_resume").finish()
    job = active_job(ctx, "train_resume")
    if not job.active:
        steps = job.trainer.step_count
        raise TrainingError(f"!train resume: training {job.name} has already {_ENDED.get(job.state, 'ended')} "
                            f"(step {steps}/{job.trainer.total}); only a paused job resumes. To train it further: "
                            f"!train {job.name} --data DIR --resume --steps N, with N above {steps}")
    job.resume()
    return {"job": job.describe()}


@handler("train_stop")
async def train_stop(ctx: DaemonContext, params: dict, req: Request) -> dict:
    Params(params, "train_stop").finish()
    job = active_job(ctx, "train_stop")
    await job.stop()
    return {"job": job.describe()}


@handler("preprocess")
async def preprocess_request(ctx: DaemonContext, params: dict, req: Request) -> dict:
    p = Params(params, "preprocess")
    src = p.text("src", file_name=True)
    dst = p.text("dst", file_name=True)
    native = ctx.residency.description.get("native_size") if ctx.residency is not None else None
    size = p.integer("size", None, lo=64, hi=4096, nullable=True) or int(native or 512)
    crop = p.text("crop", "center", choices=CROPS)
    flip = p.flag("flip", False)
    caption = p.flag("caption", False)
    p.finish()
    report = await asyncio.to_thread(preprocess, Path(src), Path(dst), size, crop=crop, flip=flip, caption=caption)
    return report.describe()


#: The plot a training log folder holds (``core.training.outputs.RunOutputs.plot_path``).
PLOT_NAME = "loss.png"


def plot_folder(ctx: DaemonContext, name: str | None) -> tuple[str, Path]:
    """(job name, log folder) for ``train_plot``: the current or last job's, or NAME's newest default folder.

    Never a path from the request: a NAME that is not this daemon's job is looked up as training puts
    it, ``<daemon's folder>/textual_inversion/<date>/<NAME>`` (the newest date wins).
    """
    job = current_job(ctx)
    if name is None:
        if job is None:
            raise TrainingError("train_plot: no training job in this daemon yet; give a NAME to find its newest "
                                "log folder (./textual_inversion/<date>/NAME), or start one with !train NAME --data DIR")
        return job.name, Path(job.trainer.plan.log_dir)
    if job is not None and job.name == name:
        return name, Path(job.trainer.plan.log_dir)
    root = Path.cwd() / "textual_inversion"
    found = [p.parent for p in root.glob(f"*/{name}/{PLOT_NAME}")] if root.is_dir() else []
    if not found:
        raise TrainingError(f"train_plot {name}: no training log folder of {name!r} with a {PLOT_NAME} (looked in "
                            f"{root}/<date>/{name}); the plot is drawn at each checkpoint of a run")
    return name, max(found, key=lambda folder: (folder / PLOT_NAME).stat().st_mtime_ns)


@handler("train_plot")
async def train_plot(ctx: DaemonContext, params: dict, req: Request) -> dict:
    """A training log folder's ``loss.png`` as base64 bytes (protocol v2; remote clients cannot read it)."""
    from sdrepl.core.formats.png_chunks import PNG_MAGIC
    from sdrepl.core.safe_open import UnsafeFile, read_regular_file
    from sdrepl.daemon.remote_files import MAX_PICTURE

    p = Params(params, "train_plot")
    name = p.text("name", None)
    p.finish()
    if name is not None:
        name = check_name(name, "!train plot")
    job_name, folder = plot_folder(ctx, name)
    path = folder / PLOT_NAME
    job = current_job(ctx)
    step = job.trainer.step_count if job is not None and job.name == job_name else None
    try:
        data, _ = await asyncio.to_thread(read_regular_file, path, MAX_PICTURE, follow_symlinks=False)
    except FileNotFoundError:
        at = f" (the job is at step {step})" if step is not None else ""
        raise TrainingError(f"!train plot: no {PLOT_NAME} in {folder} yet{at}; it is drawn at each checkpoint "
                            "(every --save-every steps) and when the run ends") from None
    except (UnsafeFile, OSError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise TrainingError(f"!train plot: cannot read {path}: {reason}") from None
    if not data.startswith(PNG_MAGIC):
        raise TrainingError(f"!train plot: {path} is not a PNG file")
    return {"name": job_name, "log_dir": str(folder), "path": str(path), "step": step, "size": len(data),
            "data": base64.b64encode(data).decode("ascii")}
