"""The log folder of a training run: what a user looks at to judge a run, as A1111 lays it out.

``<log_dir>/settings.json`` (every option, the seed, the model), ``loss.csv`` (step, epoch, loss,
learning_rate; one row per step, flushed as it goes), ``embeddings/<name>-<step>.safetensors`` every
``--save-every`` steps, ``images/<name>-<step>.png`` previews plus their A1111 picture cards
``images/<name>-<step>.card.png``, ``loss.png`` (loss and learning rate, redrawn with each snapshot; see
loss_plot.py) and ``checkpoint.pt`` (see checkpoint.py).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, TextIO

from sdrepl.core.atomic import atomic_write_bytes

LOSS_HEADER = ("step", "epoch", "loss", "learning_rate")
#: Steps kept in memory for ``loss.png`` and the sparkline; beyond it every other row is dropped (the
#: plot stays a faithful curve, memory stays bounded for any run length).
HISTORY_LIMIT = 20_000


class TrainingLog:
    """Paths and writers of one run's log folder."""

    def __init__(self, log_dir: Path, name: str) -> None:
        self.dir = Path(log_dir)
        self.name = name
        self._loss: TextIO | None = None
        self._writer: Any = None
        #: ``(step, loss, learning_rate)`` of the run so far (thinned past HISTORY_LIMIT).
        self.history: list[tuple[int, float, float]] = []

    @property
    def loss_path(self) -> Path:
        return self.dir / "loss.csv"

    @property
    def plot_path(self) -> Path:
        return self.dir / "loss.png"

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
        self.history = []
        for row in rows:
            try:
                self._remember(int(row[0]), float(row[2]), float(row[3]))
            except (IndexError, ValueError):
                continue

    def write_settings(self, settings: dict[str, Any]) -> None:
        data = json.dumps(settings, indent=2, sort_keys=True, default=str).encode("utf-8")
        atomic_write_bytes(self.dir / "settings.json", data + b"\n")

    def log_loss(self, step: int, epoch: int, loss: float, learning_rate: float) -> None:
        if self._writer is None or self._loss is None:
            return
        self._writer.writerow([step, epoch, f"{loss:.8f}", f"{learning_rate:.8g}"])
        self._loss.flush()
        self._remember(step, loss, learning_rate)

    def _remember(self, step: int, loss: float, learning_rate: float) -> None:
        self.history.append((step, loss, learning_rate))
        if len(self.history) > HISTORY_LIMIT:
            self.history = self.history[::2]

    def recent_losses(self, count: int = 64) -> list[float]:
        return [loss for _, loss, _ in self.history[-count:]]

    def write_plot(self) -> Path:
        """Redraw ``loss.png`` from the run so far (atomically)."""
        from sdrepl.core.training.loss_plot import loss_png

        steps = [s for s, _, _ in self.history]
        data = loss_png(steps, [v for _, v, _ in self.history], [r for _, _, r in self.history],
                        title=f"{self.name}: loss (blue) and learning rate (orange)")
        atomic_write_bytes(self.plot_path, data)
        return self.plot_path

    def close(self) -> None:
        if self._loss is not None:
            self._loss.close()
            self._loss = self._writer = None
