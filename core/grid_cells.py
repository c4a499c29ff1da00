"""The cells of an X/Y/Z grid (``!grid``): their order, each cell's ``generate`` parameters, and what a grid says.

Pure, as ``core/grid.py`` (which parses the axes): cells run x fastest, then y, then z (:func:`plan_cells`),
the order of the JSON rows and of A1111's grid; :func:`cell_params` puts a cell's values into the line's
parameters; a ``ckpt`` cell's ``<NAME>`` is looked up through :class:`OverlayLookup`; A1111's rules for
random seeds (drawn once per grid) and prompt S/R (the first value must be in the prompt) are here too.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sdrepl.core.errors import UsageError
from sdrepl.core.grid import AXIS_TYPES, Axis, AxisValue, number_text

_LORA_TAG = re.compile(r"(?<!\\)<(lora|lyco):([^<>:]*)(?::[^<>]*)?>", re.IGNORECASE)


@dataclass(frozen=True)
class Cell:
    """One picture of the grid: its position (``ix`` fastest) and the value of each axis (None: no axis)."""

    index: int
    ix: int
    iy: int
    iz: int
    x: AxisValue | None
    y: AxisValue | None
    z: AxisValue | None


def fix_random_seeds(axes: Sequence[Axis | None], rng: random.Random | None = None) -> list[Axis | None]:
    """The axes with every seed ``-1`` replaced by a random seed, drawn once for the grid (A1111's rule);
    ``typed`` stays ``-1``."""
    rng = rng or random.Random()
    out: list[Axis | None] = []
    for axis in axes:
        if axis is None or axis.kind != "seed":
            out.append(axis)
            continue
        out.append(replace(axis, values=tuple(AxisValue(v.typed, rng.randrange(2**32)) if v.value == -1 else v
                                               for v in axis.values)))
    return out


def plan_cells(axes: Sequence[Axis | None]) -> list[Cell]:
    """Every cell, x fastest, then y, then z (the order of the JSON rows and of A1111's grid)."""
    x, y, z = (list(a.values) if a is not None else [None] for a in axes)
    cells: list[Cell] = []
    for iz, zv in enumerate(z):
        for iy, yv in enumerate(y):
            for ix, xv in enumerate(x):
                cells.append(Cell(len(cells), ix, iy, iz, xv, yv, zv))
    return cells


def check_search(axes: Sequence[Axis | None], prompt: str, negative: str) -> None:
    """A1111's rule for prompt S/R: the first value must occur in the prompt (or the negative prompt)."""
    for letter, axis in zip("xyz", axes, strict=True):
        if axis is None or axis.kind != "sr":
            continue
        search = axis.values[0].value
        if search not in prompt and search not in negative:
            raise UsageError(f"--{letter} {axis.spec!r}: prompt S/R searches for its first value {search!r}, which "
                             "is not in the prompt or the negative prompt; put the text to replace first (e.g. "
                             "sr=cat,dog,fox for a prompt with 'cat')")


def set_lora_weight(prompt: str, name: str, weight: float) -> str:
    """``prompt`` with every ``<lora:NAME:...>`` tag set to ``<lora:NAME:WEIGHT>``, or that tag appended
    when the prompt has none (A1111's extra-network syntax; the weight applies to text encoder and UNet)."""
    tag = f"<lora:{name}:{number_text(weight)}>"
    found = False

    def swap(match: re.Match[str]) -> str:
        nonlocal found
        if match.group(2).strip().lower() != name.lower():
            return match.group(0)
        found = True
        return tag

    changed = _LORA_TAG.sub(swap, prompt)
    return changed if found else f"{prompt} {tag}".strip()


def cell_params(base: dict[str, Any], axes: Sequence[Axis | None], cell: Cell) -> dict[str, Any]:
    """The ``generate`` parameters of ``cell``: ``base`` (the line's options) with each axis's value put in.
    ``ckpt`` changes no parameter: the daemon points ``<NAME>`` at the snapshot instead."""
    params = dict(base)
    for axis, value in zip(axes, (cell.x, cell.y, cell.z), strict=True):
        if axis is None or value is None:
            continue
        if axis.kind == "seed":
            params["seed"] = value.value
        elif axis.kind == "steps":
            params["steps"] = value.value
        elif axis.kind == "cfg":
            params["cfg"] = float(value.value)
        elif axis.kind == "sampler":
            params["sampler"] = value.value
        elif axis.kind == "size":
            params["width"], params["height"] = value.value
        elif axis.kind == "sr":
            search = axis.values[0].value
            params["prompt"] = str(params.get("prompt", "")).replace(search, value.value)
            params["negative"] = str(params.get("negative") or "").replace(search, value.value)
        elif axis.kind == "lora":
            assert axis.name is not None
            params["prompt"] = set_lora_weight(str(params.get("prompt", "")), axis.name, value.value)
    return params


def cell_snapshot(axes: Sequence[Axis | None], cell: Cell) -> tuple[str, int] | None:
    """``(NAME, step)`` when a ``ckpt`` axis points ``<NAME>`` at a snapshot for this cell."""
    for axis, value in zip(axes, (cell.x, cell.y, cell.z), strict=True):
        if axis is not None and value is not None and axis.kind == "ckpt":
            assert axis.name is not None
            return axis.name, int(value.value)
    return None


def grid_parameters(first_cell: str, axes: Sequence[Axis | None]) -> str:
    """A1111's grid ``parameters``: the first cell's text plus ``Script: X/Y/Z plot`` and each axis's type
    and values (``X Type: CFG Scale, X Values: "5,7"``; a seed axis adds the seeds it used)."""
    from sdrepl.core.pnginfo import quote

    fields = ["Script: X/Y/Z plot"]
    for letter, axis in zip("XYZ", axes, strict=True):
        if axis is None:
            continue
        kind = AXIS_TYPES[axis.kind] + (f" {axis.name}" if axis.name else "")
        fields.append(f"{letter} Type: {quote(kind)}")
        fields.append(f"{letter} Values: {quote(values_text(v.typed for v in axis.values))}")
        if axis.kind == "seed":
            fields.append(f"Fixed {letter} Values: {quote(', '.join(str(v.value) for v in axis.values))}")
    lines = first_cell.split("\n")
    lines[-1] = ", ".join([lines[-1], *fields]) if lines[-1] else ", ".join(fields)
    return "\n".join(lines)


def values_text(values: Iterable[str]) -> str:
    """Values joined as an axis takes them back (``core.grid.split_values``): CSV-quoted where needed."""
    out = []
    for value in values:
        out.append('"' + value.replace('"', '""') + '"' if any(c in value for c in ',"') else value)
    return ", ".join(out)


#: ``X Type`` (as :func:`grid_parameters` and A1111 write it) -> axis kind.
_KIND_OF_TYPE = {label.lower(): kind for kind, label in AXIS_TYPES.items()}


def axes_from_parameters(extra: dict[str, Any]) -> dict[str, str] | None:
    """The ``--x/--y/--z`` specs of a grid picture's parameters (``Script: X/Y/Z plot``), or None when the
    picture is no grid or names an axis sdrepl does not sweep. Seeds come back as the ones used."""
    if str(extra.get("Script", "")).strip() != "X/Y/Z plot":
        return None
    specs: dict[str, str] = {}
    for letter in "XYZ":
        kind_text = str(extra.get(f"{letter} Type", "")).strip()
        if not kind_text or kind_text.lower() == "nothing":
            continue
        values = str(extra.get(f"Fixed {letter} Values") or extra.get(f"{letter} Values") or "").strip()
        kind = _KIND_OF_TYPE.get(kind_text.lower())
        name = None
        if kind is None:
            head, _, name = kind_text.rpartition(" ")
            kind = _KIND_OF_TYPE.get(head.lower())
            if kind not in ("ckpt", "lora") or not name:
                return None
        if not values:
            return None
        specs[letter.lower()] = f"{kind}={name}:{values}" if name else f"{kind}={values}"
    return specs or None


class OverlayLookup:
    """The library as a cell's prompt sees it: ``<NAME>`` is the training snapshot the cell's ``ckpt`` value
    names (no file is copied into a watched folder), every other name the library's own."""

    def __init__(self, lookup: Any, overrides: dict[str, Any]) -> None:
        self._lookup = lookup
        self._overrides = {name.lower(): emb for name, emb in overrides.items()}

    def get(self, name: str) -> Any:
        emb = self._overrides.get(name.strip().lower())
        return emb if emb is not None else self._lookup.get(name)

    def suggest(self, name: str, limit: int = 3) -> list[str]:
        return self._lookup.suggest(name, limit)

    def triggers(self) -> list[str]:
        names = list(self._lookup.triggers())
        known = {n.lower() for n in names}
        return names + [emb.trigger for key, emb in self._overrides.items() if key not in known]
