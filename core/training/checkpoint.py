"""Resumable training checkpoints: ``<log_dir>/checkpoint.pt``.

A checkpoint holds everything the next step depends on: the vectors, the optimizer (and fp16 grad
scaler) state, the step, and the state of every random generator the trainer draws from (noise and
timesteps, caption augmentation, picture order). With those restored, N steps in one go and the same N
steps interrupted and resumed give the same vectors. It is written with :func:`atomic_writer`, so a
crash while saving leaves the previous checkpoint whole; that is what makes SIGKILL safe.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from sdrepl.core.atomic import TEMP_MARK, atomic_write_bytes, is_temp_name
from sdrepl.core.errors import TrainingError

CHECKPOINT_NAME = "checkpoint.pt"
#: Bump when the layout changes; older checkpoints are then refused with a clear message.
CHECKPOINT_VERSION = 1


def checkpoint_path(log_dir: Path) -> Path:
    return Path(log_dir) / CHECKPOINT_NAME


def save_checkpoint(log_dir: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (plus the layout version) atomically to ``<log_dir>/checkpoint.pt``."""
    path = checkpoint_path(log_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Serialised in memory first (a checkpoint is small): torch's file writer reports a full disk as
    # "RuntimeError: [enforce fail at inline_container.cc]", a plain write as OSError(ENOSPC) naming it.
    buffer = io.BytesIO()
    torch.save({"version": CHECKPOINT_VERSION, **state}, buffer)
    atomic_write_bytes(path, buffer.getvalue(), overwrite=True)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint (tensors only, no code: ``weights_only``); TrainingError if it is unusable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise TrainingError(f"--resume: cannot read the checkpoint {path} ({type(exc).__name__}: "
                            f"{str(exc)[:200]}); start a new run without --resume") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        found = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise TrainingError(f"--resume: {path} is not a checkpoint of this sdrepl version (layout {found!r}, expected "
                            f"{CHECKPOINT_VERSION}); start a new run without --resume")
    return state


def find_checkpoint(name: str, cwd: Path, log_dir: Path | None = None) -> Path | None:
    """NAME's latest checkpoint: in ``log_dir`` when given, else the newest of
    ``<cwd>/textual_inversion/*/<NAME>/checkpoint.pt`` (the default log folders are dated, so a run
    resumed on another day is still found)."""
    if log_dir is not None:
        path = checkpoint_path(log_dir)
        return path if path.is_file() else None
    root = Path(cwd) / "textual_inversion"
    if not root.is_dir():
        return None
    found = [p for p in root.glob(f"*/{name}/{CHECKPOINT_NAME}") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def remove_stale_temps(folder: Path, *, names: tuple[str, ...] | None = None) -> list[Path]:
    """Delete temporaries of atomic writes that a killed process left in ``folder`` (recursively).

    Only our own temporaries (``.<name>.sdrepl-*.tmp``) are touched, and with ``names`` only those of
    files with these names: call it for folders no other writer is using at the time (the run's own log
    folder; the run's own output name in the embeddings folder).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.rglob(f"*{TEMP_MARK}*") if names is None else folder.glob(f"*{TEMP_MARK}*"):
        if not is_temp_name(path) or not path.is_file():
            continue
        if names is not None and not any(path.name.startswith(f".{name}{TEMP_MARK}") for name in names):
            continue
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed
