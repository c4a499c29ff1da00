"""The ``grid`` request (``!grid PROMPT --x AXIS=V1,V2 [--y ...] [--z ...]``): A1111's X/Y/Z plot.

Every cell is a ``generate`` request of its own, built by putting the cell's axis values into the line's
parameters (``core.grid_cells.cell_params``) and validating them with :func:`daemon.generation.parse_job`, then
made by :func:`core.generation.start_generation`: a cell is exactly the picture the same ``generate`` alone
makes, with every option ``generate`` has. A ``ckpt=NAME`` axis points ``<NAME>`` at a snapshot of the
training log folder (``core.grid_cells.OverlayLookup``; no file is copied into a watched folder). Cells whose jobs
differ only in their seed run as one batch (``GenerationJob.seeds``). Progress counts over the whole
grid; ``cancel`` (Ctrl-C) stops it between and within steps. The cell pictures go to the outputs folder
as usual; then the labelled grid (``core.grid_image``) is written beside them as ``NNNNN-grid.png`` with
A1111's grid ``parameters`` (the first cell's text, ``Script: X/Y/Z plot`` and each axis).
"""

from __future__ import annotations

import asyncio
import dataclasses
import glob
import random
import threading
import time
from pathlib import Path
from typing import Any

from sdrepl.core.embedding import Embedding
from sdrepl.core.errors import Cancelled, EmbeddingError, NetworkError, PromptError, UsageError
from sdrepl.core.generation import GenerationJob, RecordingLookup, prepared, start_generation
from sdrepl.core.grid import Axis, check_count, parse_axes, with_snapshots
from sdrepl.core.grid_cells import (
    Cell,
    OverlayLookup,
    cell_params,
    cell_snapshot,
    check_search,
    fix_random_seeds,
    grid_parameters,
    plan_cells,
)
from sdrepl.core.limits import MAX_GRID_PIXELS
from sdrepl.core.names import name_problem
from sdrepl.core.outputs import OutputFolder, output_folder
from sdrepl.core.plan_budget import scheduled_prompt_budget
from sdrepl.daemon.client_outputs import client_outputs
from sdrepl.daemon.context import DaemonContext
from sdrepl.daemon.generation import parse_job
from sdrepl.daemon.inspect_handlers import snapshot_files
from sdrepl.daemon.networks import mark_broken, plan_for
from sdrepl.daemon.protocol import BadRequest
from sdrepl.daemon.registry import Request, handler
from sdrepl.daemon.uploads import discard, init_file_for


@dataclasses.dataclass
class Group:
    """Cells that run as one batch: the same job but for the seed, the same snapshot."""

    job: GenerationJob
    cells: list[Cell]
    seeds: list[int]
    lookup: Any
    networks: Any
    snapshot: tuple[str, int] | None

    def batch_job(self) -> GenerationJob:
        return dataclasses.replace(self.job, seed=self.seeds[0], n=len(self.seeds), seeds=tuple(self.seeds))


def find_log_dir(name: str, cwd: Path) -> Path:
    """NAME's training log folder, as ``!train`` lays it out: the newest ``<cwd>/textual_inversion/*/NAME``
    holding snapshots (the default log folders are dated)."""
    root = cwd / "textual_inversion"
    found = [p for p in root.glob(f"*/{glob.escape(name)}") if (p / "embeddings").is_dir()] if root.is_dir() else []
    if not found:
        raise UsageError(f"grid: ckpt={name}: no training log folder {root}/*/{name}/embeddings; train it first "
                         f"(!train {name} --data DIR --save-every N writes snapshots), or give the folder with "
                         "--log DIR")
    return max(found, key=lambda p: (p / "embeddings").stat().st_mtime_ns)


def read_snapshot(path: Path, trigger: str, library: Any) -> Embedding:
    """One snapshot as an embedding named ``trigger`` (bounded, through the library's safe readers), checked
    against the model as the library checks its files."""
    from sdrepl.core.formats import read_embedding_bytes, read_file_bytes
    from sdrepl.core.hashing import sha256_bytes
    from sdrepl.core.library_state import incompatibility

    raw, st = read_file_bytes(path)
    data = read_embedding_bytes(path, raw)
    reason = incompatibility(data, library.encoder_widths, library.model_label)
    if reason is not None:
        raise EmbeddingError(path, f"this snapshot does not fit the model: {reason}")
    return Embedding(trigger, trigger, path, data, sha256_bytes(raw), st.st_size, st.st_mtime_ns)


def load_snapshots(ctx: DaemonContext, axes: list[Axis | None], log: str | None) -> tuple[list[Axis | None],
                                                                                           dict[tuple[str, int], Embedding]]:
    """The ``ckpt`` axes with their steps checked (or filled: every snapshot), and each snapshot read."""
    out: list[Axis | None] = []
    snapshots: dict[tuple[str, int], Embedding] = {}
    for letter, axis in zip("xyz", axes, strict=True):
        if axis is None or axis.kind != "ckpt":
            out.append(axis)
            continue
        assert axis.name is not None
        problem = name_problem(axis.name)
        if problem is not None:
            raise UsageError(f"--{letter} {axis.spec!r}: {axis.name!r} is not an embedding name ({problem})")
        folder = Path(log) if log is not None else find_log_dir(axis.name, Path.cwd())
        files = dict(snapshot_files(folder, axis.name, "grid"))
        axis = with_snapshots(axis, list(files), f"--{letter}")
        existing = ctx.library.get(axis.name)
        trigger = existing.trigger if existing is not None else axis.name
        for value in axis.values:
            snapshots[(axis.name, value.value)] = read_snapshot(files[value.value], trigger, ctx.library)
        out.append(axis)
    return out, snapshots


def _steps_of(job: GenerationJob) -> int:
    """The sampler steps a job reports progress over (every pass of every picture)."""
    return job.steps_run * job.n


def _where(axes: list[Axis | None], cell: Cell) -> str:
    parts = [f"{letter}={value.typed}" for letter, axis, value in zip("xyz", axes, (cell.x, cell.y, cell.z),
                                                                      strict=True) if axis is not None and value]
    return "grid cell " + ", ".join(parts)


def plan_groups(ctx: DaemonContext, model: Any, base: dict[str, Any], axes: list[Axis | None], cells: list[Cell],
                snapshots: dict[tuple[str, int], Embedding]) -> list[Group]:
    """Validate every cell as a ``generate`` (parameters, prompt, networks, token budget) and group those
    that can share a batch; nothing runs on the device yet."""
    groups: list[Group] = []
    checked: dict[tuple, None] = {}
    for cell in cells:
        params = cell_params(base, axes, cell)
        snapshot = cell_snapshot(axes, cell)
        try:
            job, _random = parse_job(params, model.native_size, ctx.settings)
            networks = plan_for(ctx, job.prompt, job.negative)
            lookup = ctx.library if snapshot is None else OverlayLookup(ctx.library,
                                                                          {snapshot[0]: snapshots[snapshot]})
            key = (job.prompt, job.negative, job.steps, job.clip_skip, job.emphasis, job.comma_window, snapshot)
            if key not in checked:
                recorder = RecordingLookup(lookup)
                scheduled_prompt_budget(networks.text, job.negative, model.tokenizer, recorder, job.options,
                                        steps=job.steps)
                if snapshot is not None and snapshot[0].lower() not in {n.lower() for n in recorder.used}:
                    raise UsageError(f"the prompt does not use <{snapshot[0]}>, so ckpt={snapshot[0]} would change "
                                     f"nothing; write <{snapshot[0]}> in the prompt")
                checked[key] = None
        except (BadRequest, PromptError, UsageError) as exc:
            raise type(exc)(f"{_where(axes, cell)}: {exc}") from None
        shape = dataclasses.replace(job, seed=0)
        group = next((g for g in groups if g.snapshot == snapshot and dataclasses.replace(g.job, seed=0) == shape),
                     None)
        if group is None:
            groups.append(Group(job, [cell], [job.seed], lookup, networks, snapshot))
        else:
            group.cells.append(cell)
            group.seeds.append(job.seed)
    return groups


def _check_pixels(groups: list[Group], axes: list[Axis | None]) -> None:
    sizes = [g.job.final_size for g in groups]
    slots = max(w for w, _ in sizes) * max(h for _, h in sizes)
    count = sum(len(g.cells) for g in groups)
    if slots * count > MAX_GRID_PIXELS:
        raise UsageError(f"!grid: {count} cells of up to {max(w for w, _ in sizes)}x{max(h for _, h in sizes)} make a "
                         f"grid of over {MAX_GRID_PIXELS // 2**20} megapixels; sweep fewer values or smaller sizes")


async def _run_group(ctx: DaemonContext, model: Any, group: Group, folder: OutputFolder, req: Request,
                     progress: Any) -> tuple[Any, Any]:
    """One batch on the device the way ``generate`` runs (one worker, a pool of devices, or a Ray fleet)."""
    job = group.batch_job()

    def work(on: Any = model) -> Any:
        return start_generation(on, group.lookup, job, folder, cancel_event=req.cancel_event, on_progress=progress,
                                networks=group.networks)

    try:
        if ctx.fleet is not None:
            lookup = ctx.fleet.lookup(group.lookup)
            scheduled_prompt_budget(group.networks.text, job.negative, model.tokenizer, lookup, job.options,
                                    steps=job.steps)  # the replica gets what this reads
            return await ctx.fleet.run(job, lookup, group.networks, folder, req.cancel_event, model)
        if ctx.pool is not None:
            return await ctx.pool.run(work, model, req.cancel_event)
        return await ctx.worker.run(work, cancel_event=req.cancel_event, label="grid"), None
    except NetworkError as exc:
        mark_broken(ctx, group.networks, exc)
        raise


async def _run_groups(ctx: DaemonContext, model: Any, groups: list[Group], folder: OutputFolder, req: Request,
                      total: int, cells: int) -> list[tuple[Any, Any]]:
    """Every batch on the device(s): one after the other on one device (another client's request can run
    between two batches), all at once over a pool of devices or a Ray fleet (each takes a free one).
    Progress is the sum of the steps done over all batches. Returns ``(pending result, worker)`` per batch."""
    done: dict[int, int] = {}
    lock = threading.Lock()

    async def one(index: int, group: Group, first: int) -> Any:
        def progress(step: int, _total: int, image: int) -> None:
            with lock:  # sent under the lock too, so the steps reported never go back
                done[index] = step
                req.send_event("progress", request=req.id, step=sum(done.values()), total=total, image=first + image,
                               images=cells)

        if req.cancel_event.is_set():
            raise Cancelled(f"grid: cancelled after {first} of {cells} cells")
        return await _run_group(ctx, model, group, folder, req, progress)

    firsts = [sum(len(g.cells) for g in groups[:i]) for i in range(len(groups))]
    if ctx.pool is None and ctx.fleet is None:
        return [await one(i, group, firsts[i]) for i, group in enumerate(groups)]
    tasks = [asyncio.ensure_future(one(i, group, firsts[i])) for i, group in enumerate(groups)]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        req.cancel_event.set()  # the grid has failed: its other batches stop too
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _text_param(params: dict[str, Any], name: str) -> str | None:
    value = params.pop(name, None)
    if value is not None and (not isinstance(value, str) or "\x00" in value):
        raise BadRequest(f"grid: parameter {name!r} must be a string, got {value!r}"[:300])
    return value


def compose_and_save(cells: list[dict[str, Any]], axes: list[Axis | None], folder: OutputFolder) -> dict[str, Any]:
    """Draw the grid from the cell files and write it (atomically, never over a file) with its metadata."""
    from sdrepl.core.grid_image import compose_grid
    from sdrepl.core.picture_files import open_picture
    from sdrepl.core.pnginfo import png_text_chunks, read_png_parameters

    pictures = {(row["ix"], row["iy"], row["iz"]): open_picture(row["path"]) for row in cells}
    labels = [[a.label(v) for v in a.values] if a is not None else [] for a in axes]
    counts = [max(1, len(a.values)) if a is not None else 1 for a in axes]
    grid, layout = compose_grid(pictures, counts[0], counts[1], counts[2], *labels)
    text = grid_parameters(read_png_parameters(cells[0]["path"]) or "", axes)
    info = png_text_chunks(text)
    path = folder.save(lambda tmp: grid.save(tmp, format="PNG", pnginfo=info), "grid")
    return {"path": str(path), "width": layout.width, "height": layout.height, "columns": counts[0],
            "rows": counts[1], "planes": counts[2]}


@handler("grid")
async def grid(ctx: DaemonContext, params: dict, req: Request) -> dict:
    received = time.monotonic()
    params = dict(params)
    outputs = client_outputs(ctx, params.pop("outputs", None), remote=getattr(req.connection, "remote", False))
    specs = [_text_param(params, name) for name in ("x", "y", "z")]
    log = _text_param(params, "log")
    if log is not None and not Path(log).is_absolute():
        raise BadRequest(f"grid: parameter 'log' must be the absolute path of a training log folder, got {log!r}"[:300])
    axes = parse_axes(*specs)
    if params.get("n") not in (None, 1):
        raise UsageError("!grid makes one picture per cell, so --n does not apply; sweep seeds instead "
                         "(e.g. --y seed=1-4)")
    base = dict(params)
    parse_job(base, 8, ctx.settings)  # bad parameters are answered before any snapshot is read
    random_seed = base.get("seed") in (None, -1)
    if random_seed:  # A1111: a random seed is drawn once, for every cell of the grid
        base["seed"] = random.randrange(2**32)
    axes = fix_random_seeds(axes)
    check_search(axes, str(base.get("prompt", "")), str(base.get("negative") or ""))
    axes, snapshots = await asyncio.to_thread(load_snapshots, ctx, axes, log)
    check_count(axes)
    token = base.get("init") if str(base.get("init")).startswith("upload:") else None
    if token is not None:  # a remote client's init picture (repl/uploads.py), removed after the grid
        base["init"] = init_file_for(token, id(req.connection))
    try:
        return await _run_grid(ctx, req, base, axes, snapshots, output_folder(outputs), received, random_seed)
    finally:
        if token is not None:
            discard(token, id(req.connection))


async def _run_grid(ctx: DaemonContext, req: Request, base: dict[str, Any], axes: list[Axis | None],
                    snapshots: dict[tuple[str, int], Embedding], folder: OutputFolder, received: float,
                    random_seed: bool) -> dict[str, Any]:
    cells = plan_cells(axes)
    assert ctx.residency is not None
    async with ctx.residency.using() as model:
        groups = plan_groups(ctx, model, base, axes, cells, snapshots)
        for group in groups:  # img2img: each init picture read and checked now (bounded), off the loop
            group.job = await asyncio.to_thread(prepared, group.job)
        _check_pixels(groups, axes)
        total = sum(_steps_of(g.batch_job()) for g in groups)
        ahead = ctx.worker.ahead if ctx.pool is None else ctx.pool.ahead
        if ahead:
            req.send_event("progress", request=req.id, step=0, total=total, image=0, images=len(cells), queued=ahead)
        ran = await _run_groups(ctx, model, groups, folder, req, total, len(cells))
        results = [(group, await asyncio.to_thread(result.wait)) for group, (result, _) in zip(groups, ran, strict=True)]
    workers = sorted({w if isinstance(w, str) else w.label for _, w in ran if w is not None})
    rows: dict[int, dict[str, Any]] = {}
    tokens = None
    for group, result in results:
        tokens = tokens or result.get("tokens")
        for cell, image in zip(group.cells, result["images"], strict=True):
            rows[cell.index] = {"path": image["path"], "seed": image["seed"], "ix": cell.ix, "iy": cell.iy,
                                "iz": cell.iz, **{k: (v.typed if v is not None else None)
                                                  for k, v in (("x", cell.x), ("y", cell.y), ("z", cell.z))}}
    ordered = [rows[cell.index] for cell in cells]
    picture = await asyncio.to_thread(compose_and_save, ordered, axes, folder)
    described = [{"axis": letter, "type": a.kind, "name": a.name, "values": [v.typed for v in a.values]}
                 for letter, a in zip("xyz", axes, strict=True) if a is not None]
    return {"grid": picture, "cells": [{k: r[k] for k in ("path", "seed", "x", "y", "z")} for r in ordered],
            "axes": described, "batches": len(groups), "tokens": tokens, "seed": base["seed"],
            "random_seed": random_seed, "total_s": round(time.monotonic() - received, 4),
            **({"workers": workers} if workers else {})}
