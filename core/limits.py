"""The one table of generation parameter limits, read by the REPL (where values are typed and ``!set``)
and by the daemon (where requests are validated).

Before this table the REPL took ``n`` up to 64 and the daemon up to 16, so ``!set n 30`` was accepted and
then broke every later line. Both sides now ask :data:`LIMITS`; a contract test feeds every REPL-side
parameter through the daemon's validation.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdrepl.core.prompt import MAX_COMMA_WINDOW


@dataclass(frozen=True)
class Limit:
    """The accepted range of one numeric parameter (both ends included); ``multiple`` for sizes."""

    lo: float
    hi: float
    multiple: int | None = None

    def check(self, value: float) -> bool:
        """Whether ``value`` is accepted."""
        return self.lo <= value <= self.hi and (self.multiple is None or int(value) % self.multiple == 0)


#: Picture i of a request uses seed + i, and torch seeds are 64-bit: leave room for ``n`` pictures.
MAX_SEED = 2**64 - 1 - 64

LIMITS: dict[str, Limit] = {
    "steps": Limit(1, 1000),
    "cfg": Limit(0.0, 100.0),
    "n": Limit(1, 64),
    "clip_skip": Limit(1, 12),
    "seed": Limit(0, MAX_SEED),
    "width": Limit(8, 8192, multiple=8),
    "height": Limit(8, 8192, multiple=8),
    "comma_padding_backtrack": Limit(0, MAX_COMMA_WINDOW),
    # img2img and hires fix (A1111's sliders): denoising strengths 0..1, upscale 1..4, second-pass steps
    # 0 (= the first pass's steps) up to the steps limit.
    "strength": Limit(0.0, 1.0),
    "hires_scale": Limit(1.0, 4.0),
    "hires_steps": Limit(0, 1000),
    "hires_denoise": Limit(0.0, 1.0),
}


def int_range(name: str) -> tuple[int, int]:
    """``(lo, hi)`` of an integer parameter, for ``to_int(*int_range("steps"))`` and ``p.int(lo=, hi=)``."""
    limit = LIMITS[name]
    return int(limit.lo), int(limit.hi)


def float_range(name: str) -> tuple[float, float]:
    limit = LIMITS[name]
    return float(limit.lo), float(limit.hi)


#: ``!grid``: at most this many cells (A1111's 10x10 sweeps fit), checked before anything is generated.
MAX_GRID_CELLS = 100
#: ``!grid``: the composed grid picture at most this many pixels (~400 MB as RGB while it is drawn).
MAX_GRID_PIXELS = 2**27
