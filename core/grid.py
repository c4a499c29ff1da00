"""X/Y/Z grids (``!grid``): axis parsing, range expansion and cell planning, as A1111's X/Y/Z plot does them.

Pure: strings in, plain values out; no model, no files (the daemon reads training snapshots and runs the
cells, ``daemon/grid_handler.py``; ``core/grid_image.py`` draws the labelled grid). The REPL parses the axes
with this module too, so a typo is answered before anything is sent.

An axis is ``KIND=VALUES``; ``ckpt`` and ``lora`` name what they sweep: ``ckpt=NAME[:STEPS]``,
``lora=NAME:WEIGHTS`` (``=`` is accepted in place of that ``:``, as in ``lora=foo=0,0.5``). VALUES are
comma-separated (A1111's CSV rule: ``"a, b",c`` is two values), and numeric axes take A1111's ranges:
``1-4`` (1,2,3,4), ``1-10 (+3)`` (1,4,7,10), ``10-1 (-3)``, ``1-2 [5]`` (five values from 1 to 2 evenly).
A seed of ``-1`` is a random seed, drawn once per grid (``core.grid_cells.fix_random_seeds``).

The cells themselves (their order, each cell's parameters, the grid's metadata) are ``core/grid_cells.py``.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sdrepl.core.errors import UsageError
from sdrepl.core.limits import LIMITS, MAX_GRID_CELLS, MAX_SEED

#: Axis kind -> the spellings it answers to (A1111's labels and the obvious shorthands, folded).
AXIS_NAMES: dict[str, tuple[str, ...]] = {
    "seed": ("seed", "seeds"),
    "steps": ("steps", "step"),
    "cfg": ("cfg", "cfgscale", "cfg_scale", "scale", "guidance"),
    "sampler": ("sampler", "samplers", "samplername", "sampler_name"),
    "size": ("size", "resolution", "wxh"),
    "sr": ("sr", "s/r", "promptsr", "prompt_sr", "prompts/r", "searchreplace", "search_replace"),
    "ckpt": ("ckpt", "checkpoint", "snapshot", "snapshots", "embedding", "ti"),
    "lora": ("lora", "loraweight", "lora_weight", "lyco"),
}
#: The label A1111 draws before a value ("CFG Scale: 7"); None: the value alone (samplers, prompts).
AXIS_LABELS: dict[str, str | None] = {"seed": "Seed", "steps": "Steps", "cfg": "CFG Scale", "sampler": None,
                                      "size": "Size", "sr": None, "ckpt": None, "lora": None}
#: A1111's ``X Type`` names for the grid's metadata.
AXIS_TYPES = {"seed": "Seed", "steps": "Steps", "cfg": "CFG Scale", "sampler": "Sampler", "size": "Size",
              "sr": "Prompt S/R", "ckpt": "Embedding checkpoint", "lora": "LoRA weight"}
#: Axes that name the embedding or LoRA they sweep.
NAMED = ("ckpt", "lora")
_BY_SPELLING = {spelling: kind for kind, names in AXIS_NAMES.items() for spelling in names}

_INT = r"[+-]?\s*\d+"
_FLOAT = r"[+-]?\s*(?:\d+(?:\.\d*)?|\.\d+)"
_INT_RANGE = re.compile(rf"\s*({_INT})\s*-\s*({_INT})\s*(?:\(\s*([+-]\s*\d+)\s*\)|\[\s*(\d+)\s*\])?\s*")
_FLOAT_RANGE = re.compile(rf"\s*({_FLOAT})\s*-\s*({_FLOAT})\s*(?:\(\s*([+-]\s*(?:\d+(?:\.\d*)?|\.\d+))\s*\)|"
                          rf"\[\s*(\d+)\s*\])?\s*")
_SIZE = re.compile(r"\s*(\d+)\s*(?:[xX*×]\s*(\d+))?\s*")


@dataclass(frozen=True)
class AxisValue:
    """One value of an axis: ``typed`` is its text as typed (a range's members as numbers written out),
    used in labels and the JSON rows; ``value`` is what it means (an int, a float, a name, ``(w, h)``)."""

    typed: str
    value: Any


@dataclass(frozen=True)
class Axis:
    """One axis: its kind, the embedding/LoRA it sweeps (``ckpt``/``lora``), and its values in order.

    A ``ckpt`` axis written without steps (or with ``all``) has ``every_snapshot`` and no values until the
    daemon fills them from the log folder (:func:`with_snapshots`)."""

    kind: str
    values: tuple[AxisValue, ...]
    name: str | None = None
    spec: str = ""
    every_snapshot: bool = False

    @property
    def key(self) -> tuple[str, str | None]:
        """What two axes must not share: the same kind over the same thing (sr: the same search text)."""
        if self.kind == "sr":
            return self.kind, self.values[0].typed if self.values else ""
        return self.kind, (self.name or "").lower() or None

    def label(self, value: AxisValue) -> str:
        """The text drawn for ``value`` (A1111: ``CFG Scale: 7``, a sampler or prompt by itself)."""
        if self.kind == "ckpt":
            return f"{self.name}-{value.typed}"
        if self.kind == "lora":
            return f"{self.name}: {value.typed}"
        if self.kind == "seed" and value.typed.strip() == "-1":
            return f"Seed: {value.value}"  # the seed drawn for it (A1111 shows the fixed value)
        prefix = AXIS_LABELS[self.kind]
        return f"{prefix}: {value.typed}" if prefix else value.typed


def _fold(text: str) -> str:
    return re.sub(r"[\s\-.]+", "", text.strip().lower())


def axis_kind(text: str, where: str) -> str:
    """The axis ``text`` names, or a UsageError listing the axes."""
    kind = _BY_SPELLING.get(_fold(text))
    if kind is None:
        import difflib

        close = difflib.get_close_matches(_fold(text), list(_BY_SPELLING), n=1, cutoff=0.6)
        hint = f" (did you mean {_BY_SPELLING[close[0]]}?)" if close else ""
        raise UsageError(f"{where}: unknown axis {text.strip()!r}{hint}; axes: {', '.join(AXIS_NAMES)} "
                         f"(e.g. {where} cfg=5,7,9 or {where} lora=NAME:0,0.5,1)")
    return kind


def split_values(text: str) -> list[str]:
    """Comma-separated values (A1111 reads them as CSV: quote a value holding a comma), blanks dropped."""
    try:
        rows = list(csv.reader(io.StringIO(text), skipinitialspace=True))
    except csv.Error:
        rows = [text.split(",")]
    return [value.strip() for row in rows for value in row if value.strip()]


def number_text(value: float) -> str:
    """``7`` for 7.0 and ``0.3`` for 0.30000000000000004 (range steps add binary noise)."""
    rounded = round(value, 6)
    return str(int(rounded)) if float(rounded).is_integer() else f"{rounded:g}"


def _too_many(where: str, count: int) -> UsageError:
    return UsageError(f"{where}: the range has {count} values, more than a grid's {MAX_GRID_CELLS} cells; "
                      "use a larger step (+N) or fewer values ([N])")


def _int_range(text: str, where: str) -> list[int] | None:
    match = _INT_RANGE.fullmatch(text)
    if match is None:
        return None
    start, end = int(match.group(1).replace(" ", "")), int(match.group(2).replace(" ", ""))
    if match.group(4) is not None:  # [count]: evenly spaced, rounded down as A1111 does (int of linspace)
        count = int(match.group(4))
        if count < 1 or count > MAX_GRID_CELLS:
            raise _too_many(where, count) if count else UsageError(f"{where}: {text!r}: [0] values")
        if count == 1:
            return [start]
        return [int(start + (end - start) * i / (count - 1)) for i in range(count)]
    step = int(match.group(3).replace(" ", "")) if match.group(3) else (1 if end >= start else -1)
    if step == 0 or (end - start) * step < 0:
        raise UsageError(f"{where}: {text!r}: the step {step:+d} never gets from {start} to {end}; write e.g. "
                         f"{start}-{end} ({'+' if end >= start else '-'}1)")
    count = (end - start) // step + 1
    if count > MAX_GRID_CELLS:
        raise _too_many(where, count)
    return list(range(start, end + (1 if step > 0 else -1), step))


def _float_range(text: str, where: str) -> list[float] | None:
    match = _FLOAT_RANGE.fullmatch(text)
    if match is None:
        return None
    start, end = float(match.group(1).replace(" ", "")), float(match.group(2).replace(" ", ""))
    if match.group(4) is not None:
        count = int(match.group(4))
        if count < 1 or count > MAX_GRID_CELLS:
            raise _too_many(where, count) if count else UsageError(f"{where}: {text!r}: [0] values")
        if count == 1:
            return [start]
        return [start + (end - start) * i / (count - 1) for i in range(count)]
    step = float(match.group(3).replace(" ", "")) if match.group(3) else (1.0 if end >= start else -1.0)
    if step == 0 or (end - start) * step < 0:
        raise UsageError(f"{where}: {text!r}: the step {step:+g} never gets from {start:g} to {end:g}")
    count = math.floor((end - start) / step + 1e-9) + 1
    if count > MAX_GRID_CELLS:
        raise _too_many(where, count)
    return [start + i * step for i in range(count)]


def _check_limit(name: str, value: float, where: str, typed: str) -> None:
    limit = LIMITS[name]
    if not limit.check(value):
        raise UsageError(f"{where}: {name} {typed!r} is out of range; use {limit.lo:g} to {limit.hi:g}")


def _ints(values: list[str], where: str, check: Callable[[int, str], None]) -> list[AxisValue]:
    out: list[AxisValue] = []
    for text in values:
        expanded = _int_range(text, where)
        if expanded is None:
            try:
                number = int(text.replace(" ", ""))
            except ValueError:
                raise UsageError(f"{where}: {text!r} is not a whole number (or a range such as 1-4, 1-10 (+3))") \
                    from None
            check(number, text)
            out.append(AxisValue(text, number))
            continue
        for number in expanded:
            check(number, str(number))
            out.append(AxisValue(str(number), number))
    return out


def _floats(values: list[str], where: str, check: Callable[[float, str], None]) -> list[AxisValue]:
    out: list[AxisValue] = []
    for text in values:
        expanded = _float_range(text, where)
        if expanded is None:
            try:
                number = float(text.replace(" ", ""))
            except ValueError:
                raise UsageError(f"{where}: {text!r} is not a number (or a range such as 5-9 (+2), 0-1 [5])") \
                    from None
            if not math.isfinite(number):
                raise UsageError(f"{where}: {text!r} is not a finite number")
            check(number, text)
            out.append(AxisValue(text, number))
            continue
        for number in expanded:
            number = round(number, 6)
            check(number, number_text(number))
            out.append(AxisValue(number_text(number), number))
    return out


def _size(text: str, where: str) -> AxisValue:
    match = _SIZE.fullmatch(text)
    if match is None:
        raise UsageError(f"{where}: {text!r} is not a size; write WIDTHxHEIGHT, e.g. size=512x512,768x512")
    width = int(match.group(1))
    height = int(match.group(2) or width)
    for key, dim in (("width", width), ("height", height)):
        limit = LIMITS[key]
        if not limit.check(dim):
            raise UsageError(f"{where}: size {text!r}: width and height must be multiples of {limit.multiple} from "
                             f"{limit.lo:g} to {limit.hi:g}, e.g. 512x512")
    return AxisValue(text, (width, height))


def _seed_check(where: str) -> Callable[[int, str], None]:
    def check(seed: int, typed: str) -> None:
        if seed != -1 and not 0 <= seed <= MAX_SEED:
            raise UsageError(f"{where}: seed {typed!r} is out of range; use 0 to {MAX_SEED}, or -1 for a random one")
    return check


def _limit_check(name: str, where: str) -> Callable[[float, str], None]:
    return lambda value, typed: _check_limit(name, value, where, typed)


def _weight_check(where: str) -> Callable[[float, str], None]:
    def check(weight: float, typed: str) -> None:
        if abs(weight) > 100:
            raise UsageError(f"{where}: LoRA weight {typed!r} is out of range (-100 to 100)")
    return check


def _step_check(where: str) -> Callable[[int, str], None]:
    def check(step: int, typed: str) -> None:
        if step < 0:
            raise UsageError(f"{where}: snapshot step {typed!r} must be 0 or more (a step of the training run)")
    return check


def _sampler(text: str, where: str) -> AxisValue:
    from sdrepl.core.errors import SamplerError
    from sdrepl.core.samplers import find_sampler

    name = text[2:] if text.lower().startswith("k_") else text
    try:
        return AxisValue(text, find_sampler(name).name)
    except SamplerError as exc:
        raise UsageError(f"{where}: {exc}") from None


def parse_axis(spec: str, where: str = "--x") -> Axis:
    """``KIND=VALUES`` (``ckpt=NAME[:STEPS]``, ``lora=NAME:WEIGHTS``) -> :class:`Axis`; UsageError naming
    ``where`` (the option it came from) and the fix."""
    head, eq, rest = spec.partition("=")
    if not eq:
        raise UsageError(f"{where} {spec.strip()!r}: write AXIS=VALUES, e.g. {where} cfg=5,7,9 (axes: "
                         f"{', '.join(AXIS_NAMES)})")
    kind = axis_kind(head, where)
    name: str | None = None
    if kind in NAMED:
        match = re.match(r"\s*([^:=,]*?)\s*(?:[:=]|$)", rest)
        name = match.group(1) if match else ""
        rest = rest[match.end():] if match else ""
        if not name:
            example = f"{kind}=NAME:0,0.5,1" if kind == "lora" else f"{kind}=NAME (every snapshot) or {kind}=NAME:500,1000"
            raise UsageError(f"{where} {spec.strip()!r}: name the {'LoRA' if kind == 'lora' else 'embedding'} it "
                             f"sweeps: {where} {example}")
        name = name.strip().strip("<>")
        if any(c in name for c in "<>"):
            raise UsageError(f"{where} {spec.strip()!r}: {name!r} cannot be a name (it holds < or >)")
    values = split_values(rest)
    if kind == "ckpt" and (not values or [v.lower() for v in values] == ["all"]):
        return Axis(kind, (), name, spec.strip(), every_snapshot=True)
    if not values:
        raise UsageError(f"{where} {spec.strip()!r}: no values; e.g. {where} {head.strip()}="
                         + {"lora": f"{name}:0,0.5,1", "sr": "cat,dog", "sampler": "Euler a,DPM++ 2M",
                            "size": "512x512,768x512"}.get(kind, "1,2,3"))
    if kind == "seed":
        parsed = _ints(values, where, _seed_check(where))
    elif kind == "steps":
        parsed = _ints(values, where, _limit_check("steps", where))
    elif kind == "ckpt":
        parsed = _ints(values, where, _step_check(where))
    elif kind == "cfg":
        parsed = _floats(values, where, _limit_check("cfg", where))
    elif kind == "lora":
        parsed = _floats(values, where, _weight_check(where))
    elif kind == "size":
        parsed = [_size(v, where) for v in values]
    elif kind == "sampler":
        parsed = [_sampler(v, where) for v in values]
    else:  # sr: the first value is searched for, every value replaces it
        parsed = [AxisValue(v, v) for v in values]
    if len(parsed) > MAX_GRID_CELLS:
        raise _too_many(where, len(parsed))
    return Axis(kind, tuple(parsed), name, spec.strip())


def parse_axes(x: str | None, y: str | None = None, z: str | None = None) -> list[Axis | None]:
    """The three axes (None where not given); UsageError for a bad one, a repeated one, no x, or too many
    cells (:data:`~sdrepl.core.limits.MAX_GRID_CELLS`)."""
    axes = [parse_axis(spec, f"--{letter}") if spec is not None and spec.strip() else None
            for letter, spec in (("x", x), ("y", y), ("z", z))]
    if axes[0] is None:
        raise UsageError("!grid needs an x axis: !grid PROMPT --x AXIS=V1,V2 [--y ...] [--z ...], e.g. "
                         "!grid a cat --x cfg=5,7,9 --y seed=1-3")
    seen: dict[tuple[str, str | None], str] = {}
    for letter, axis in zip("xyz", axes, strict=True):
        if axis is None:
            continue
        if axis.key in seen:
            raise UsageError(f"--{letter} {axis.spec!r} sweeps what --{seen[axis.key]} already sweeps; give each "
                             "axis once (use one axis with more values)")
        seen[axis.key] = letter
    check_count(axes)
    return axes


def cell_count(axes: Sequence[Axis | None]) -> int:
    """How many cells the axes make (an unfilled ``ckpt`` axis counts as one for now)."""
    total = 1
    for axis in axes:
        if axis is not None:
            total *= max(1, len(axis.values))
    return total


def check_count(axes: Sequence[Axis | None]) -> None:
    """The one cell limit: UsageError when the axes make more than :data:`MAX_GRID_CELLS` cells."""
    count = cell_count(axes)
    if count > MAX_GRID_CELLS:
        given = [a for a in axes if a is not None]
        sizes = " x ".join(str(len(a.values)) for a in given) + " = " if len(given) > 1 else ""
        snapshots = [a for a in given if a.kind == "ckpt" and len(a.values) > 1]
        hint = (f"; name the snapshots to compare, e.g. ckpt={snapshots[0].name}:{snapshots[0].values[0].typed},"
                f"{snapshots[0].values[-1].typed}" if snapshots else "")
        raise UsageError(f"!grid: {sizes}{count} cells, more than {MAX_GRID_CELLS}; sweep fewer values (or "
                         f"split it into several grids){hint}")


def with_snapshots(axis: Axis, steps: Sequence[int], where: str) -> Axis:
    """A ``ckpt`` axis with its values checked against (or, for every snapshot, taken from) the ``steps``
    of the snapshots found; UsageError naming the steps there are."""
    available = sorted(set(steps))
    if axis.every_snapshot:
        return replace(axis, values=tuple(AxisValue(str(s), s) for s in available), every_snapshot=False)
    missing = [v.typed for v in axis.values if v.value not in available]
    if missing:
        raise UsageError(f"{where} {axis.spec!r}: no snapshot of {axis.name} at step {', '.join(missing)}; its "
                         f"snapshots are at steps {', '.join(map(str, available))} (or write {axis.kind}={axis.name} "
                         "for all of them)")
    return axis
