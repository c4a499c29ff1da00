"""Every ``!train`` option (interface.md), as one dataclass with the documented defaults.

``TrainOptions.from_params`` takes the ``train`` request's parameters (long option names with ``-`` as
``_``), checks each one and names the option in any error, so a typo or a bad value is reported before
a single picture is loaded. Values may arrive typed (JSON numbers, booleans) or as the strings a REPL
line holds. The REPL checks ``!train`` lines with this module too, so it must not import torch. Which
options the user gave is remembered in ``explicit``: a resumed job takes everything
else from the settings saved with its checkpoint.
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from sdrepl.core.display import visible
from sdrepl.core.errors import TrainingError
from sdrepl.core.names import name_problem
from sdrepl.core.training.schedule import parse_schedule
from sdrepl.core.training.templates import BUILTIN, template_for_property

#: ``sdrepl.core.embedding.MAX_VECTORS``, repeated so this module (which the REPL imports to check a
#: ``!train`` line) does not pull in torch.
MAX_VECTORS = 75
LATENT_MODES = ("once", "deterministic", "random")
PRECISIONS = ("fp32", "fp16", "bf16")
FORMATS = ("safetensors", "pt")
#: Request keys that are not training options (the protocol envelope and the handler's own flags).
ENVELOPE = frozenset({"id", "type", "wait"})


@dataclass(frozen=True)
class TrainOptions:
    name: str
    data: Path | None = None
    init: str = "*"
    vectors: int = 1
    steps: int = 3000
    lr: str = "0.005"
    batch: int = 1
    accum: int = 1
    #: (width, height); None: the model's native size.
    size: tuple[int, int] | None = None
    template: str = "subject_filewords"
    property: str | None = None
    filename_regex: str | None = None
    join: str = " "
    shuffle_tags: bool = False
    tag_dropout: float = 0.0
    latents: str = "once"
    #: ("value" | "norm", X) or None.
    clip_grad: tuple[str, float] | None = None
    repeats: int = 1
    center_crop: bool = False
    flip: bool = False
    #: None: by device (the resident model's dtype).
    precision: str | None = None
    gradient_checkpointing: bool = False
    save_every: int = 500
    preview_every: int = 500
    #: Steps between loss read-backs (loss.csv rows, NaN/Inf checks, the loss in status): no host sync between.
    log_every: int = 10
    preview_prompt: str | None = None
    #: None: ``./textual_inversion/<YYYY-MM-DD>/<NAME>`` under the daemon's working folder.
    log_dir: Path | None = None
    seed: int | None = None
    format: str = "safetensors"
    resume: bool = False
    overwrite: bool = False
    explicit: frozenset[str] = field(default=frozenset(), compare=False)

    @classmethod
    def from_params(cls, params: dict[str, Any], base: dict[str, Any] | None = None) -> TrainOptions:
        """Validate ``params``; keys missing from it come from ``base`` (saved settings), then defaults."""
        known = {f.name for f in fields(cls)} - {"explicit"}
        unknown = sorted(set(params) - known - ENVELOPE)
        if unknown:
            raise TrainingError(
                f"unknown !train option(s): {', '.join('--' + k.replace('_', '-') for k in unknown)}; "
                "see !help train for the list"
            )
        given = {k: v for k, v in params.items() if k in known and v is not None}
        merged = {k: v for k, v in (base or {}).items() if k in known and v is not None}
        merged.update(given)
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "explicit" or f.name not in merged:
                continue
            values[f.name] = _CONVERT[f.name](f.name, merged[f.name])
        if "name" not in values:
            raise TrainingError("!train needs a NAME: !train NAME --data DIR")
        if "property" in values and "template" not in given:
            values["template"] = template_for_property(values["property"])
        elif "property" in given and "template" in given:
            raise TrainingError("give --template or --property, not both (--property is a shorthand for a template)")
        if values.get("data") is None and not values.get("resume"):
            raise TrainingError(f"!train {values['name']}: --data DIR is required (the folder of training pictures)")
        opts = cls(**values, explicit=frozenset(given))
        parse_schedule(opts.lr)  # report a bad schedule now, not at the first step
        return opts

    def to_params(self) -> dict[str, Any]:
        """JSON-safe request parameters that recreate these options (saved in settings.json)."""
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if key == "explicit" or value is None:
                continue
            if isinstance(value, Path):
                value = str(value)
            elif key == "size":
                value = f"{value[0]}x{value[1]}"
            elif key == "clip_grad":
                value = f"{value[0]}:{value[1]:g}"
            out[key] = value
        return out

    def default_log_dir(self, cwd: Path, today: _dt.date | None = None) -> Path:
        day = (today or _dt.date.today()).isoformat()
        return cwd / "textual_inversion" / day / self.name

    def resolved_log_dir(self, cwd: Path) -> Path:
        """The log folder: ``--log-dir`` (relative to ``cwd``) or the dated default."""
        if self.log_dir is None:
            return self.default_log_dir(cwd)
        path = self.log_dir.expanduser()
        return path if path.is_absolute() else cwd / path


def _int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (
        isinstance(value, str) and not re.fullmatch(r"\s*-?\d+\s*", value)
    ):
        raise TrainingError(f"--{_opt(name)} {value!r}: expected a whole number >= {minimum}")
    number = int(value)
    if number < minimum:
        raise TrainingError(f"--{_opt(name)} {number}: must be {minimum} or more")
    return number


def _opt(name: str) -> str:
    return name.replace("_", "-")


def _nonneg(name: str, value: Any) -> int:
    return _int(name, value, minimum=0)


def _seed(name: str, value: Any) -> int:
    number = _int(name, value, minimum=0)
    if number >= 2**63:
        raise TrainingError(f"--seed {number}: must be below 2**63")
    return number


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on", ""):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise TrainingError(f"--{_opt(name)} {value!r}: expected a flag (true or false)")


def _str(name: str, value: Any) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise TrainingError(f"--{_opt(name)}: expected text, got {type(value).__name__}")
    return str(value)


def _choice(options: tuple[str, ...]):
    def convert(name: str, value: Any) -> str:
        text = _str(name, value).strip().lower()
        if text not in options:
            raise TrainingError(f"--{_opt(name)} {value!r}: expected one of {', '.join(options)}")
        return text

    return convert


def check_name(value: Any, command: str = "!train") -> str:
    """An embedding name usable as a file name and a ``<name>``, or a TrainingError saying why not.

    The name is taken as given, not trimmed: ``"cat\\n"`` from a script is refused (it names the newline)
    rather than quietly becoming ``cat``, so a client never works on another name than the one it sent.
    The REPL's own tokenizer never hands over surrounding whitespace."""
    text = _str("name", value)
    problem = name_problem(text)
    if problem is not None:
        raise TrainingError(
            f"{command} {visible(repr(value))}: not a usable embedding name ({problem}); use letters, digits, '-', "
            "'_' and '.', no spaces or slashes (the name becomes the file name and the <name> of prompts)"
        )
    return text


def _name(name: str, value: Any) -> str:
    return check_name(value)


def _path(name: str, value: Any) -> Path:
    text = _str(name, value).strip()
    if not text:
        raise TrainingError(f"--{_opt(name)}: expected a folder path")
    return Path(text).expanduser()


def _size(name: str, value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        width, height = value
    elif isinstance(value, int) and not isinstance(value, bool):
        width = height = value
    else:
        match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", str(value))
        if not match:
            raise TrainingError(f"--size {value!r}: expected WxH such as 512x512 (or one number for a square)")
        width, height = int(match.group(1)), int(match.group(2) or match.group(1))
    width, height = _int("size", width), _int("size", height)
    if width % 8 or height % 8:
        raise TrainingError(f"--size {width}x{height}: width and height must be multiples of 8")
    return width, height


def _vectors(name: str, value: Any) -> int:
    number = _int(name, value)
    if number > MAX_VECTORS:
        raise TrainingError(f"--vectors {number}: at most {MAX_VECTORS} (a prompt chunk holds 75 tokens)")
    return number


def _dropout(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not 0.0 <= number < 1.0:
        raise TrainingError(f"--tag-dropout {value!r}: expected a probability from 0 up to (not including) 1")
    return number


def _clip(name: str, value: Any) -> tuple[str, float]:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        mode, amount = str(value[0]), value[1]
    else:
        mode, _, amount = str(value).partition(":")
    mode = mode.strip().lower()
    try:
        number = float(amount)
    except (TypeError, ValueError):
        number = float("nan")
    if mode not in ("value", "norm") or not number > 0 or number == float("inf"):
        raise TrainingError(f"--clip-grad {value!r}: expected value:X or norm:X with X > 0, e.g. norm:1.0")
    return mode, number


def _template(name: str, value: Any) -> str:
    text = _str(name, value).strip()
    if not text:
        raise TrainingError(f"--template: expected one of {', '.join(BUILTIN)} or a template file")
    return text


def _lr(name: str, value: Any) -> str:
    return _str(name, value).strip()


_CONVERT = {
    "name": _name, "data": _path, "init": _str, "vectors": _vectors, "steps": _int, "lr": _lr,
    "batch": _int, "accum": _int, "size": _size, "template": _template,
    "property": _choice(("object", "style")), "filename_regex": _str, "join": _str,
    "shuffle_tags": _bool, "tag_dropout": _dropout, "latents": _choice(LATENT_MODES), "clip_grad": _clip,
    "repeats": _int, "center_crop": _bool, "flip": _bool, "precision": _choice(PRECISIONS),
    "gradient_checkpointing": _bool, "save_every": _nonneg, "preview_every": _nonneg, "log_every": _int,
    "preview_prompt": _str, "log_dir": _path, "seed": _seed, "format": _choice(FORMATS),
    "resume": _bool, "overwrite": _bool,
}
