"""The ``inspect`` request (``!inspect NAME [--log DIR]``): an embedding measured against the model's vocabulary.

Thin: it finds the embedding, reads a training log folder's snapshots when asked (bounded, through the safe
embedding readers), and runs :mod:`sdrepl.core.inspect_embedding` on the device thread with the resident
model's token tables. ``log`` names a path on the daemon's machine, so remote clients may not send it
(``remote_files.DAEMON_PATHS``).
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import torch

from sdrepl.core.embedding import CLIP_G, CLIP_L, SINGLE
from sdrepl.core.errors import EmbeddingError, UsageError
from sdrepl.core.formats import read_embedding
from sdrepl.core.inspect_embedding import Vocabulary, inspect_vectors, trail
from sdrepl.daemon.context import DaemonContext
from sdrepl.daemon.handlers import find_embedding
from sdrepl.daemon.params import Params
from sdrepl.daemon.protocol import BadRequest
from sdrepl.daemon.registry import Request, handler

#: At most this many snapshots of a log folder are read (evenly spaced, first and last always kept).
MAX_SNAPSHOTS = 200


def encoders_of(model: Any) -> dict[str, tuple[Any, Any]]:
    """Embedding key -> (tokenizer, text encoder) of the loaded model."""
    pipe = getattr(model, "pipe", model)
    first = (pipe.tokenizer, pipe.text_encoder)
    second = getattr(pipe, "text_encoder_2", None)
    if second is None:
        return {SINGLE: first}
    return {CLIP_L: first, CLIP_G: (pipe.tokenizer_2, second)}


def snapshot_files(log_dir: Path, name: str, where: str = "inspect") -> list[tuple[int, Path]]:
    """``(step, path)`` of ``<log>/embeddings/<name>-<step>.safetensors|pt``, by step, at most MAX_SNAPSHOTS
    (``!grid``'s ``ckpt`` axis reads them too; ``where`` names the request in messages)."""
    folder = log_dir / "embeddings"
    if not folder.is_dir():
        raise UsageError(f"{where}: {log_dir} is not a training log folder (it has no embeddings/ folder); "
                         "give the folder !train wrote (its --log-dir)")
    pattern = re.compile(re.escape(name) + r"-(\d{1,9})\.(?:safetensors|pt)", re.IGNORECASE)
    found: dict[int, Path] = {}
    for entry in folder.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and entry.is_file() and not entry.is_symlink():
            found.setdefault(int(match.group(1)), entry)
    steps = sorted(found)
    if not steps:
        raise UsageError(f"{where}: {folder} has no snapshots of {name!r} ({name}-STEP.safetensors)")
    if len(steps) > MAX_SNAPSHOTS:
        picks = {steps[round(i * (len(steps) - 1) / (MAX_SNAPSHOTS - 1))] for i in range(MAX_SNAPSHOTS)}
        steps = sorted(picks)
    return [(s, found[s]) for s in steps]


def read_snapshots(files: list[tuple[int, Path]]) -> tuple[list[tuple[int, dict[str, torch.Tensor]]], list[dict]]:
    """The snapshots' vectors, and the files that could not be read (with why); no file stops the others."""
    series: list[tuple[int, dict[str, torch.Tensor]]] = []
    skipped: list[dict] = []
    for step, path in files:
        try:
            series.append((step, read_embedding(path).vectors))
        except (EmbeddingError, OSError) as exc:
            skipped.append({"path": str(path), "reason": str(exc)[:300]})
    return series, skipped


@handler("inspect")
async def inspect(ctx: DaemonContext, params: dict, req: Request) -> dict:
    p = Params(params, "inspect")
    name = p.text("name", file_name=True)
    log = p.raw("log", None)
    top = p.integer("top", 5, lo=1, hi=50)
    p.finish()
    if log is not None and (not isinstance(log, str) or not log or "\x00" in log or not Path(log).is_absolute()):
        raise BadRequest(f"inspect: parameter 'log' must be the absolute path of a training log folder, got {log!r}"[:300])
    emb = find_embedding(ctx, name, "inspect")
    series: list[tuple[int, dict[str, torch.Tensor]]] = []
    skipped: list[dict] = []
    if log is not None:
        files = await asyncio.to_thread(snapshot_files, Path(log), emb.trigger)
        series, skipped = await asyncio.to_thread(read_snapshots, files)
    assert ctx.residency is not None
    async with ctx.residency.using() as model:
        def work() -> dict[str, Any]:
            encoders = encoders_of(model)
            missing = [key for key in emb.vectors if key not in encoders]
            if missing:
                raise EmbeddingError(emb.path, f"has vectors for {', '.join(missing)}, which this model has no text "
                                     f"encoder for")
            per_key: dict[str, Any] = {}
            for key, vectors in emb.vectors.items():
                vocab = Vocabulary.of(*encoders[key])
                report = inspect_vectors(vectors, vocab, top)
                if log is not None:
                    report["checkpoints"] = trail([(s, v[key]) for s, v in series
                                                   if key in v and v[key].shape == vectors.shape], vocab)
                per_key[key] = report
            return per_key

        per_key = await ctx.worker.run(work, label="inspect")
    first = next(iter(per_key.values()))
    result: dict[str, Any] = {"name": emb.trigger, "path": str(emb.path), **first}
    if len(per_key) > 1:
        result["encoders"] = per_key
    if log is not None:
        result["log"] = log
        result["skipped"] = skipped
    return result
