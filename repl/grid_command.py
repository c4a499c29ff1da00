"""``!grid PROMPT --x AXIS=VALUES [--y ...] [--z ...] [--log DIR] [generation options]``: A1111's X/Y/Z plot.

The line is a generation line with axes: ``--x``/``--y``/``--z`` (and ``--log``) are taken out, the rest
is parsed as any generation line (``repl.parse.parse_generation``, with the session's ``!set`` defaults),
so every generation option applies to all cells. The axes are parsed here with ``core.grid`` too, so a
typo is answered at once; the daemon (``daemon/grid_handler.py``) parses them again, runs the cells and
draws the grid. The JSON result is the daemon's reply (``"grid": {"path", "width", "height"}, "cells":
[{"path", "seed", "x", "y", "z"}]``); the human text is one summary line with the grid's path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdrepl.core.display import visible
from sdrepl.core.errors import UsageError
from sdrepl.core.grid import AXIS_NAMES, parse_axes, split_values
from sdrepl.core.grid_cells import axes_from_parameters, check_search
from sdrepl.repl import render
from sdrepl.repl.actions import Outcome, Started, cancellable, generation_params, picture_params
from sdrepl.repl.parse import (
    _SHORT_RE,
    GENERATION_OPTIONS,
    Option,
    parse_generation,
    to_text,
    unescape,
    unquote,
)

if TYPE_CHECKING:
    from sdrepl.repl.session import Session

USAGE = "!grid PROMPT --x AXIS=V1,V2 [--y AXIS=...] [--z AXIS=...] [--log DIR] [generation options]"
HELP = ("An X/Y/Z plot as AUTOMATIC1111's: one picture per combination of the axis values, each saved as its own "
        "PNG with its full parameters, plus one labelled grid PNG (x across, y down, one sub-grid per z value "
        "side by side). Axes: seed, steps, cfg, sampler, size (WxH), sr (prompt search/replace: the first value "
        "is found in the prompt and replaced by each value), ckpt=NAME (the snapshots NAME-STEP of NAME's "
        "training log folder, used as <NAME>; ckpt=NAME for all of them, ckpt=NAME:500,1000 for some; the log "
        "folder is the newest ./textual_inversion/*/NAME where the daemon runs, or --log DIR) and "
        "lora=NAME:W1,W2 (also lora=NAME=W1,W2: sets <lora:NAME:W> in the prompt, added if absent). Values are "
        "comma-separated (quote one holding a comma: sr=\"a, b\",c) and numbers take A1111's ranges: 1-4, "
        "1-10 (+3), 10-1 (-3), 0-1 [5] (five values); seed=-1 is one random seed. Every generation option on "
        "the line (--steps, --cfg, --size, --neg, --seed, <lora:...> tags...) applies to every cell; "
        "--seed -1 draws one seed for the whole grid. Cells that differ only in the seed run as one batch. "
        "Example: !grid a <cat> photo --x ckpt=cat --y cfg=5,7,9 --steps 20")

AXIS_OPTIONS = ("x", "y", "z", "log")
#: ``!grid``'s own options (completion reads them; the generation options follow).
OPTIONS = (
    Option("x", ("--x",), to_text, "AXIS=VALUES"),
    Option("y", ("--y",), to_text, "AXIS=VALUES"),
    Option("z", ("--z",), to_text, "AXIS=VALUES"),
    Option("log", ("--log",), to_text, "DIR"),
    *GENERATION_OPTIONS,
)


def split_axes(args: str) -> tuple[str, dict[str, str]]:
    """The line without its ``--x/--y/--z/--log`` options, and their values (each runs to the next option)."""
    matches = list(_SHORT_RE.finditer(args))
    kept: list[str] = []
    values: dict[str, str] = {}
    position = 0
    for i, match in enumerate(matches):
        token = match.group(1)
        name = token[2:].lower() if token.startswith("--") else ""
        if name not in AXIS_OPTIONS:
            continue
        end = matches[i + 1].start() if i + 1 < len(matches) else len(args)
        raw = args[match.end():end]
        raw = raw[1:] if raw.startswith("=") else raw
        value = unescape(unquote(raw))
        if not value.strip():
            raise UsageError(f"!grid --{name} needs a value: --{name} {'DIR' if name == 'log' else 'AXIS=V1,V2'}")
        values[name] = value.strip()
        kept.append(args[position:match.start()])
        position = end
    kept.append(args[position:])
    return "".join(kept), values


def parse_grid(args: str) -> dict[str, Any]:
    """``!grid``'s arguments -> ``{"line": GenerationLine, "x", "y", "z", "log"}`` (axes checked)."""
    rest, axes = split_axes(args)
    line = parse_generation(rest)
    if not line.prompt.strip():
        raise UsageError(f"!grid needs a prompt; usage: {USAGE}")
    if line.n is not None and line.n != 1:
        raise UsageError("!grid makes one picture per cell, so --n does not apply; sweep seeds instead (e.g. "
                         "--y seed=1-4)")
    parse_axes(axes.get("x"), axes.get("y"), axes.get("z"))  # the daemon checks again; this answers typos now
    return {"line": line, **axes}


async def run_grid(session: Session, parsed: dict[str, Any], started: Started) -> Outcome:
    line = parsed["line"]
    params = generation_params(line, session.defaults)
    params.pop("n", None)  # one picture per cell (a !set n does not multiply a grid)
    axes = parse_axes(parsed.get("x"), parsed.get("y"), parsed.get("z"))
    check_search(axes, params["prompt"], params.get("negative") or "")
    params.update({key: parsed[key] for key in ("x", "y", "z") if parsed.get(key)})
    if parsed.get("log"):
        path = Path(os.path.expanduser(parsed["log"]))
        path = path if path.is_absolute() else Path(session.cwd) / path
        if not path.is_dir():
            raise UsageError(f"!grid --log {visible(parsed['log'])}: no such folder ({visible(str(path))})")
        params["log"] = str(path.resolve())
    await picture_params(session, params)  # an img2img grid: the picture as generate takes it
    result = await cancellable(session, "grid", params, started)
    outputs = getattr(session.client, "local_outputs", None)
    if outputs is not None:  # a remote daemon: the grid and its cells come back as bytes
        result = await bring_grid_home(session.client, result, outputs)
    return Outcome(result, render_grid(result, session.cwd))


async def bring_grid_home(client: Any, result: dict[str, Any], outputs: Path) -> dict[str, Any]:
    """The grid picture and every cell fetched from a remote daemon into this machine's outputs."""
    from sdrepl.core.outputs import output_folder
    from sdrepl.repl.remote_pictures import fetch_picture

    folder = output_folder(outputs)
    cells = []
    for cell in result.get("cells") or []:
        local = await fetch_picture(client, cell["path"], folder, int(cell.get("seed", 0)), outputs)
        cells.append({**cell, "path": local, "daemon_path": cell["path"]})
    grid = dict(result.get("grid") or {})
    if grid.get("path"):
        grid["daemon_path"] = grid["path"]
        grid["path"] = await fetch_picture(client, grid["path"], folder, "grid", outputs)
    return {**result, "cells": cells, "grid": grid}


def render_grid(result: dict[str, Any], cwd: Path | None = None) -> str:
    """``grid 3x2 (6 cells, 2 batches): outputs/.../00007-grid.png  (832x512, seed 5, 4.1 s)``."""
    grid = result.get("grid") or {}
    shape = "x".join(str(grid.get(k, 1)) for k in ("columns", "rows", "planes") if k != "planes"
                     or grid.get("planes", 1) > 1)
    cells = result.get("cells") or []
    facts = [f"{grid.get('width', '?')}x{grid.get('height', '?')}"]
    swept = any(axis.get("type") == "seed" for axis in result.get("axes") or [])
    if result.get("seed") is not None and not swept:
        facts.append(f"seed {result['seed']}{' (random)' if result.get('random_seed') else ''}")
    elapsed = result.get("total_s")
    if isinstance(elapsed, (int, float)):
        facts.append(f"{elapsed:.1f} s")
    return (f"grid {shape} ({len(cells)} cell{'s' if len(cells) != 1 else ''}, {result.get('batches', '?')} batch"
            f"{'es' if result.get('batches') != 1 else ''}): {render.display_path(str(grid.get('path')), cwd)}  "
            f"({', '.join(facts)})")


def axis_completions(fragment: str, embeddings: list[str], loras: list[str], samplers: list[str]) -> list[str]:
    """What to offer after ``--x ``: axis names, then names (``ckpt=``, ``lora=``) and sampler values."""
    kind, eq, rest = fragment.partition("=")
    if not eq:
        return [f"{name}=" for name in AXIS_NAMES]
    key = kind.strip().lower()
    if key in ("ckpt", "lora") and not any(c in rest for c in ":="):
        return [f"{kind}={name}" + (":" if key == "lora" else "") for name in (embeddings if key == "ckpt" else loras)]
    if key == "sampler":
        head = rest[:rest.rfind(",") + 1] if "," in rest else ""
        done = {v.lower() for v in split_values(head)}
        return [f"{kind}={head}{name}" for name in samplers if name.lower() not in done]
    return []


#: The fields of a grid picture's parameters that ``!fetch`` turns back into axes.
GRID_FIELDS = ("Script", *(f"{pre}{letter} {what}" for letter in "XYZ" for pre, what in
                           (("", "Type"), ("", "Values"), ("Fixed ", "Values"))))


def fetched_grid(parsed: dict[str, Any], line: str, unsupported: list[str]) -> tuple[str, list[str]]:
    """``!fetch`` of a grid picture: the ``!grid`` line that makes the grid again (the first cell's line
    with the axes of its ``X Type``/``X Values``...), else the line and notes as they were."""
    specs = axes_from_parameters(parsed.get("extra") or {})
    if specs is None:
        return line, unsupported
    axes = " ".join(f"--{letter} {spec}" for letter, spec in specs.items())
    return f"!grid {line} {axes}", [name for name in unsupported if name not in GRID_FIELDS]
