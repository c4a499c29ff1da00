"""The log folder of a training run: what a user looks at to judge a run, as A1111 lays it out.

``<log_dir>/settings.json`` (every option, the seed, the model), ``loss.csv`` (step, epoch, loss,
learning_rate; one row per step, flushed as it goes), ``embeddings/<name>-<step>.safetensors`` every
``--save-every`` steps, ``images/<name>-<step>.png`` previews plus their A1111 picture cards
``images/<name>-<step>.card.png``, and ``checkpoint.pt`` (see checkpoint.py).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, TextIO

from sdrepl.core.atomic import atomic_write_bytes

LOSS_HEADER = ("step", "epoch", "loss", "learning_rate")


class TrainingLog:
    """Paths and writers of one run's log folder."""

    def __init__(self, log_dir: Path, name: str) -> None:
        self.dir = Path(log_dir)
        self.name = name
        self._loss: TextIO | None = None
        self._writer: Any = None

    @property
    def loss_path(self) -> Path:
        return self.dir / "loss.csv"

    def embedding_path(self, step: int) -> Path:
        return self.dir / "embeddings" / f"{self.name}-{step}.safetensors"

    def image_path(self, step: int) -> Path:
        return self.dir / "images" / f"{self.name}-{step}.png"

    def card_path(self, step: int) -> Path:
        return self.dir / "images" / f"{self.name}-{step}.card.png"

    def open(self, resume_step: int | None) -> None:
        """Create the folders and open ``loss.csv``: fresh for a new run; for a resumed run, the rows up to
        the checkpoint's step are kept and later ones (steps that will be done again) dropped."""
        for sub in ("embeddings", "images"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        rows: list[list[str]] = []
        if resume_step is not None and self.loss_path.is_file():
            with open(self.loss_path, newline="", encoding="utf-8") as fh:
                for row in list(csv.reader(fh))[1:]:
                    if row and row[0].isdigit() and int(row[0]) <= resume_step:
                        rows.append(row)
        self._loss = open(self.loss_path, "w", newline="", encoding="utf-8")  # noqa: SIM115 (open for the run)
        self._writer = csv.writer(self._loss)
        self._writer.writerow(LOSS_HEADER)
        self._writer.writerows(rows)
        self._loss.flush()

    def write_settings(self, settings: dict[str, Any]) -> None:
        data = json.dumps(settings, indent=2, sort_keys=True, default=str).encode("utf-8")
        atomic_write_bytes(self.dir / "settings.json", data + b"\n")

    def log_loss(self, step: int, epoch: int, loss: float, learning_rate: float) -> None:
        if self._writer is None or self._loss is None:
            return
        self._writer.writerow([step, epoch, f"{loss:.8f}", f"{learning_rate:.8g}"])
        self._loss.flush()

    def close(self) -> None:
        if self._loss is not None:
            self._loss.close()
            self._loss = self._writer = None
