"""``!train``: every option of interface.md's table, parsed into the protocol's ``train`` parameters.

The REPL checks a line completely before anything is sent (the same checks the daemon makes, through
:meth:`TrainOptions.from_params`), so a typo in the 20th option is reported at once, naming the option,
instead of after the daemon has started to load pictures. Paths are made absolute against the session's
folder, because the daemon runs in a folder of its own.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sdrepl.core.errors import UsageError
from sdrepl.core.training.options import TrainOptions
from sdrepl.core.training.templates import BUILTIN
from sdrepl.repl.parse import Option, split_options, to_choice, to_float, to_int, to_seed, to_text

SUBCOMMANDS = ("status", "pause", "resume", "stop", "plot")


def _size(text: str) -> str:
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text)
    if not match:
        raise ValueError("is not a size; write WIDTHxHEIGHT, e.g. 512x512")
    width, height = int(match.group(1)), int(match.group(2) or match.group(1))
    if width % 8 or height % 8 or width < 64 or height < 64:
        raise ValueError("width and height must be multiples of 8, at least 64, e.g. 512x512")
    return f"{width}x{height}"


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise ValueError(f"is not a regular expression ({exc})") from None
    return text


def _clip_grad(text: str) -> str:
    mode, _, amount = text.strip().partition(":")
    try:
        number = float(amount)
    except ValueError:
        number = -1.0
    if mode.strip().lower() not in ("value", "norm") or not 0 < number < float("inf"):
        raise ValueError("expected value:X or norm:X with X > 0, e.g. norm:1.0")
    return f"{mode.strip().lower()}:{number:g}"


def _path(text: str) -> str:
    if not text.strip():
        raise ValueError("expected a folder path")
    return text.strip()


TRAIN_OPTIONS: tuple[Option, ...] = (
    Option("data", ("--data",), _path, "DIR"),
    Option("init", ("--init",), to_text, "TEXT"),
    Option("vectors", ("--vectors",), to_int(1, 75), "N"),
    Option("steps", ("--steps",), to_int(1), "N"),
    Option("lr", ("--lr",), to_text, "SCHEDULE"),
    Option("batch", ("--batch",), to_int(1), "N"),
    Option("accum", ("--accum",), to_int(1), "N"),
    Option("size", ("--size",), _size, "WxH"),
    Option("template", ("--template",), to_text, "NAME|FILE"),
    Option("property", ("--property",), to_choice("object", "style"), "object|style"),
    Option("filename_regex", ("--filename-regex",), _regex, "RE"),
    Option("join", ("--join",), to_text, "TEXT"),
    Option("shuffle_tags", ("--shuffle-tags",)),
    Option("tag_dropout", ("--tag-dropout",), to_float(0, 0.999999), "P"),
    Option("latents", ("--latents",), to_choice("once", "deterministic", "random"), "once|deterministic|random"),
    Option("clip_grad", ("--clip-grad",), _clip_grad, "value:X|norm:X"),
    Option("repeats", ("--repeats",), to_int(1), "N"),
    Option("center_crop", ("--center-crop",)),
    Option("flip", ("--flip",)),
    Option("precision", ("--precision",), to_choice("fp32", "fp16", "bf16"), "fp32|fp16|bf16"),
    Option("gradient_checkpointing", ("--gradient-checkpointing",)),
    Option("save_every", ("--save-every",), to_int(0), "N"),
    Option("preview_every", ("--preview-every",), to_int(0), "N"),
    Option("preview_prompt", ("--preview-prompt",), to_text, "TEXT"),
    Option("log_every", ("--log-every",), to_int(1), "N"),
    Option("log_dir", ("--log-dir",), _path, "DIR"),
    Option("seed", ("--seed",), to_seed, "N"),
    Option("format", ("--format",), to_choice("safetensors", "pt"), "safetensors|pt"),
    Option("resume", ("--resume",)),
    Option("overwrite", ("--overwrite",)),
    Option("wait", ("--wait",)),
)

USAGE = "!train NAME --data DIR [options] | !train status|pause|resume|stop | !train plot [NAME]"


def parse_train(args: str) -> dict[str, Any]:
    """``{"sub": "status"}`` for a subcommand, else ``{"sub": None, "params": <train parameters>}``.

    Relative paths stay relative here; :func:`resolve_paths` anchors them to the session's folder.
    """
    head, values = split_options(args, TRAIN_OPTIONS, where="!train")
    words = head.split()
    if words and words[0].lower() == "plot" and len(words) <= 2 and not values:  # !train plot [NAME]
        return {"sub": "plot", "name": words[1].strip("<>") if len(words) == 2 else None}
    if len(words) == 1 and words[0].lower() in SUBCOMMANDS and not values:
        return {"sub": words[0].lower()}
    if not words:
        raise UsageError(f"!train needs a NAME or one of {', '.join(SUBCOMMANDS)}; usage: {USAGE}")
    if len(words) > 1:
        raise UsageError(
            f"!train {head!r}: NAME is one word (got {len(words)}); options start with --, usage: {USAGE}"
        )
    name = words[0].strip("<>")
    if words[0].lower() in SUBCOMMANDS:
        raise UsageError(f"!train {words[0]} takes no options; usage: {USAGE}")
    params: dict[str, Any] = {"name": name, **values}
    params["wait"] = bool(values.get("wait", False))
    if "data" not in params and not params.get("resume"):
        raise UsageError(f"!train {name}: --data DIR is required (the folder of training pictures); usage: {USAGE}")
    TrainOptions.from_params({k: v for k, v in params.items() if k != "wait"})  # TrainingError, as the daemon
    return {"sub": None, "params": params}


def resolve_paths(params: dict[str, Any], cwd: Path) -> dict[str, Any]:
    """Absolute ``data``/``log_dir`` (and ``template`` when it names a file) for the daemon."""
    out = dict(params)
    for key in ("data", "log_dir"):
        if key in out:
            out[key] = str(_absolute(out[key], cwd))
    template = out.get("template")
    if template and template not in BUILTIN:
        path = _absolute(template, cwd)
        if not path.is_file():
            raise UsageError(
                f"--template {template!r}: neither a built-in template ({', '.join(BUILTIN)}) nor a file "
                f"(looked for {path})"
            )
        out["template"] = str(path)
    if "data" in out and not Path(out["data"]).is_dir():
        raise UsageError(f"--data {params['data']!r}: no such folder ({out['data']}); give the folder of "
                         "training pictures")
    return out


def _absolute(text: str, cwd: Path) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else cwd / path
