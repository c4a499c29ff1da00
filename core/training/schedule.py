"""The A1111 learning-rate schedule syntax: ``0.005`` or ``0.005:100, 1e-3:1000, 1e-5``.

Each comma-separated piece is ``RATE[:STEP]``: the rate holds up to and including STEP, then the next
piece takes over. A bare rate runs to the end of training. As in AUTOMATIC1111, a schedule whose last
piece has a step ends training at that step (``--steps`` larger than it is cut down to it), so a user
who pastes a webui schedule gets the run they know. Parsing happens before any training starts, and every
error names the piece that is wrong and what a good one looks like.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sdrepl.core.errors import TrainingError

_EXAMPLE = "e.g. --lr 0.005 or --lr '0.005:100, 1e-3:1000, 1e-5'"


@dataclass(frozen=True)
class Piece:
    rate: float
    #: The last step (1-based, inclusive) at which this rate is used; None: until the end.
    until: int | None


@dataclass(frozen=True)
class LearningRateSchedule:
    """A parsed schedule; :meth:`rate_at` answers the rate for a 1-based optimizer step."""

    text: str
    pieces: tuple[Piece, ...]

    @property
    def last_step(self) -> int | None:
        """The step where the schedule ends training, or None when its last rate runs to the end."""
        return self.pieces[-1].until

    def rate_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (1 = the first step of the run)."""
        for piece in self.pieces:
            if piece.until is None or step <= piece.until:
                return piece.rate
        return self.pieces[-1].rate  # past a closed schedule: keep the last rate (training stops there)

    def total_steps(self, steps: int) -> int:
        """``steps`` cut down to where a closed schedule ends."""
        return steps if self.last_step is None else min(steps, self.last_step)


def parse_schedule(text: str | float | int) -> LearningRateSchedule:
    """Parse ``--lr``; raise :class:`TrainingError` naming the bad piece."""
    raw = str(text).strip()
    if not raw:
        raise TrainingError(f"--lr is empty; give a learning rate, {_EXAMPLE}")
    pieces: list[Piece] = []
    parts = raw.split(",")
    for index, part in enumerate(parts, start=1):
        piece = part.strip()
        where = f"--lr {raw!r}: piece {index} {piece!r}"
        if not piece:
            raise TrainingError(f"--lr {raw!r}: piece {index} is empty (a stray comma?); {_EXAMPLE}")
        if pieces and pieces[-1].until is None:
            raise TrainingError(
                f"{where} comes after the bare rate {pieces[-1].rate:g}, which already runs to the end; "
                "only the last piece may leave out its ':STEP'"
            )
        rate_text, sep, step_text = piece.partition(":")
        rate = _parse_rate(rate_text.strip(), where)
        until: int | None = None
        if sep:
            until = _parse_step(step_text.strip(), where)
            if pieces and pieces[-1].until is not None and until <= pieces[-1].until:
                raise TrainingError(
                    f"{where}: step {until} does not come after the previous piece's step "
                    f"{pieces[-1].until}; steps must increase from piece to piece"
                )
        pieces.append(Piece(rate, until))
    return LearningRateSchedule(raw, tuple(pieces))


def _parse_rate(text: str, where: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise TrainingError(f"{where}: rate {text!r} is not a number; {_EXAMPLE}") from None
    if not math.isfinite(rate) or rate <= 0:
        raise TrainingError(f"{where}: rate {text!r} must be a positive number such as 0.005")
    return rate


def _parse_step(text: str, where: str) -> int:
    if not text.isdigit():
        raise TrainingError(f"{where}: step {text!r} is not a whole number; write RATE:STEP such as 0.005:100")
    step = int(text)
    if step < 1:
        raise TrainingError(f"{where}: step {step} must be 1 or more")
    return step
