"""Options in REPL lines: the ``--name value`` rule, value checks, and the generation line.

The contract's rule (interface.md): an option's value runs to the next `` --``, so prompts and paths need
no quoting. Precisely:

- an option starts at the beginning of the text or after whitespace, with ``--`` and a letter
  (``--steps``, ``--neg``); ``--name=value`` also works. ``--`` followed by a space or a digit is text,
  so ``a cat -- dog`` is a prompt;
- to write a literal `` --word`` in a prompt, escape it: ``\\--word``;
- a value wrapped in one pair of matching quotes loses them (``--join " "`` is a single space);
- a repeated option: the last one wins, so an option appended to a line from history overrides;
- a prompt wrapped whole in quotes loses them (InvokeAI's ``"a cat" -s 30``);
- InvokeAI's short options (``-s 30``, ``-S 42``, ``-C 7.5``, ``-W 512``, ``-H 768``, ``-A k_lms``,
  ``-n 2``, also glued: ``-s30``) are understood on generation lines.

Unknown options are a :class:`UsageError` naming the option and listing the valid ones; a value that is
not what the option takes is a :class:`PromptError` on generation lines (that is how core classifies a
bad prompt) and a :class:`UsageError` in meta-commands.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sdrepl.core.errors import PromptError, SdreplError, UsageError
from sdrepl.core.limits import LIMITS, MAX_SEED, float_range, int_range
from sdrepl.core.prompt import MAX_COMMA_WINDOW, emphasis_mode
from sdrepl.core.samplers import find_sampler

_LONG = r"--[A-Za-z][\w-]*(?==|\s|$)"
_SHORT_GLUED = r"-(?:[sWHn]\d+|S-?\d+|C\d+(?:\.\d+)?|f\d*\.?\d+|Ak_\w+|A(?:ddim|plms))(?=\s|$)"
_SHORT_ALONE = r"-[sSCWHAnIf](?=\s|$)"
_LONG_RE = re.compile(rf"(?:(?<=\s)|^)({_LONG})")
_SHORT_RE = re.compile(rf"(?:(?<=\s)|^)({_LONG}|{_SHORT_GLUED}|{_SHORT_ALONE})")


@dataclass(frozen=True)
class Option:
    """One option of a line: its canonical ``key``, the spellings it answers to, and how to read its value.

    ``convert`` is None for a flag (no value; True when present). ``metavar`` appears in messages.
    """

    key: str
    names: tuple[str, ...]
    convert: Callable[[str], Any] | None = None
    metavar: str = ""

    @property
    def spelling(self) -> str:
        return self.names[0] if not self.metavar else f"{self.names[0]} {self.metavar}"


def unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def unescape(text: str) -> str:
    return re.sub(r"\\(--|-(?=[A-Za-z]))", r"\1", text)


def escape(text: str) -> str:
    """The inverse of :func:`unescape` for text that must survive being put back on a line (``!fetch``)."""
    return re.sub(r"(^|\s)--(?=[A-Za-z])", r"\1\\--", text)


def split_options(
    text: str, options: Sequence[Option], *, where: str, short: bool = False,
    value_error: type[SdreplError] = UsageError,
) -> tuple[str, dict[str, Any]]:
    """Split ``text`` into the head (what comes before the first option) and the parsed options.

    ``where`` names the line kind in messages (``generation line``, ``!train``). Values are converted
    with each option's ``convert``; its ``ValueError`` becomes ``value_error`` naming the option.
    """
    by_name = {name: opt for opt in options for name in opt.names}
    pattern = _SHORT_RE if short else _LONG_RE
    matches = list(pattern.finditer(text))
    head = unescape(text[: matches[0].start()] if matches else text).strip()
    values: dict[str, Any] = {}
    for i, match in enumerate(matches):
        token = match.group(1)
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        raw = text[match.end():end]
        name, glued = _name_and_glued_value(token, raw, by_name)
        if name not in by_name:
            close = difflib.get_close_matches(name, [n for n in by_name if n.startswith("--")], n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UsageError(f"unknown option {name} in {where}{hint}; valid options: {_valid(options)}")
        option = by_name[name]
        value = unescape(unquote(glued if glued is not None else raw))
        if option.convert is None:
            if glued is not None or value:
                raise UsageError(f"{name} in {where} takes no value (got {value!r}); write it alone, e.g. {name}")
            values[option.key] = True
            continue
        if not value and glued is None and not raw.strip():
            raise UsageError(f"{name} in {where} needs a value: {option.spelling}")
        try:
            values[option.key] = option.convert(value)
        except ValueError as exc:
            raise value_error(f"{name} {value!r} in {where}: {exc}") from None
    return head, values


def _name_and_glued_value(token: str, raw: str, by_name: dict[str, Option]) -> tuple[str, str | None]:
    """``--steps=30`` -> (``--steps``, ``30 ...``); ``-s30`` -> (``-s``, ``30``); else (token, None)."""
    if token.startswith("--"):
        if raw.startswith("="):
            return token, raw[1:]
        return token, None
    if len(token) > 2:
        return token[:2], token[2:] + raw
    return token, None


def _valid(options: Sequence[Option]) -> str:
    return ", ".join(opt.spelling for opt in options)


# -- value converters: raise ValueError with a message that says what a good value looks like ---------

def to_int(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            number = int(text.strip())
        except ValueError:
            raise ValueError(f"is not a whole number{_range(low, high)}") from None
        if (low is not None and number < low) or (high is not None and number > high):
            raise ValueError(f"is out of range; use a whole number{_range(low, high)}")
        return number
    return convert


def to_float(low: float | None = None, high: float | None = None) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            number = float(text.strip())
        except ValueError:
            raise ValueError(f"is not a number{_range(low, high)}") from None
        if number != number or (low is not None and number < low) or (high is not None and number > high):
            raise ValueError(f"is out of range; use a number{_range(low, high)}")
        return number
    return convert


def _range(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f" from {low:g} to {high:g}"
    if low is not None:
        return f" of at least {low:g}"
    return ""


def to_choice(*choices: str) -> Callable[[str], str]:
    def convert(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"is not one of {', '.join(choices)}")
        return value
    return convert


def to_text(text: str) -> str:
    return text


def to_seed(text: str) -> int | None:
    """A seed: a whole number >= 0, or ``random`` / ``-1`` (A1111's spelling of random) for None."""
    value = text.strip().lower()
    if value in ("random", "-1", "none", ""):
        return None
    try:
        seed = int(value)
    except ValueError:
        raise ValueError("is not a seed; use a whole number such as 1234, or random") from None
    if not LIMITS["seed"].check(seed):
        raise ValueError(f"is out of range; use a whole number from 0 to {MAX_SEED}, or random")
    return seed


def to_size(text: str) -> tuple[int, int]:
    """``512x768`` (also ``512X768``, ``512*768``, or ``512`` for a square); in ``core.limits``' range."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX*×]\s*(\d+))?\s*", text)
    if not match:
        raise ValueError("is not a size; write WIDTHxHEIGHT, e.g. 512x512 or 768x512")
    width = int(match.group(1))
    height = int(match.group(2) or width)
    for key, dim in (("width", width), ("height", height)):
        limit = LIMITS[key]
        if not limit.check(dim):
            raise ValueError(f"{width}x{height}: width and height must be multiples of {limit.multiple} from "
                             f"{limit.lo:g} to {limit.hi:g}, e.g. 512x512")
    return width, height


def to_dim(text: str) -> int:
    width, _ = to_size(text)
    return width


def to_sampler(text: str) -> str:
    """A sampler by any spelling A1111, ComfyUI or InvokeAI (``k_euler_a``) users know; the canonical name."""
    name = text.strip()
    if name.lower().startswith("k_"):
        name = name[2:]
    return find_sampler(name).name  # SamplerError (listing the valid names) passes through as itself


# -- the generation line ------------------------------------------------------------------------------

GENERATION_OPTIONS: tuple[Option, ...] = (
    Option("negative", ("--neg", "--negative", "--negative-prompt", "--negative_prompt"), to_text, "TEXT"),
    Option("steps", ("--steps", "-s"), to_int(*int_range("steps")), "N"),
    Option("cfg", ("--cfg", "--cfg-scale", "--cfg_scale", "-C"), to_float(*float_range("cfg")), "F"),
    Option("seed", ("--seed", "-S"), to_seed, "N"),
    Option("size", ("--size",), to_size, "WxH"),
    Option("sampler", ("--sampler", "--sampler-name", "--sampler_name", "-A"), to_sampler, "NAME"),
    Option("n", ("--n", "-n", "--n-iter", "--batch-count"), to_int(*int_range("n")), "N"),
    Option("width", ("--width", "-W"), to_dim, "W"),
    Option("height", ("--height", "-H"), to_dim, "H"),
    Option("clip_skip", ("--clip-skip", "--clip_skip"), to_int(*int_range("clip_skip")), "N"),
    Option("emphasis", ("--emphasis",), lambda v: to_emphasis(v), "MODE"),
    Option("comma_padding_backtrack", ("--comma-padding-backtrack", "--comma_padding_backtrack"),
           to_int(0, MAX_COMMA_WINDOW), "N"),
    # img2img (InvokeAI's -I/-f, A1111's img2img tab) and A1111's Hires. fix (core/img2img.py, core/hires.py)
    Option("init", ("--init", "-I", "--init_img", "--init-img"), lambda v: to_path(v), "IMAGE"),
    Option("strength", ("--strength", "-f", "--denoising-strength", "--denoising_strength"),
           to_float(*float_range("strength")), "F"),
    Option("hires", ("--hires", "--hr-scale", "--hr_scale"), to_float(*float_range("hires_scale")), "SCALE"),
    Option("hires_steps", ("--hires-steps", "--hires_steps"), to_int(*int_range("hires_steps")), "N"),
    Option("hires_denoise", ("--hires-denoise", "--hires_denoise"), to_float(*float_range("hires_denoise")), "F"),
    Option("hires_upscaler", ("--hires-upscaler", "--hires_upscaler"), to_choice("latent", "lanczos"),
           "latent|lanczos"),
)

#: Hires fix's options that mean nothing without ``--hires SCALE``.
HIRES_DETAILS = ("hires_steps", "hires_denoise", "hires_upscaler")


def to_path(text: str) -> str:
    """A file path as typed (resolved against the session folder when the line runs)."""
    value = text.strip()
    if not value or "\x00" in value:
        raise ValueError("is not a file path; give the picture, e.g. --init photos/cat.png")
    return value


def to_emphasis(text: str) -> str:
    """A1111's emphasis mode by name (``Original``, ``No norm``, ``Ignore``, ``None``; case and spaces free)."""
    try:
        return emphasis_mode(text.strip().strip("\"'"))
    except SdreplError as exc:
        raise ValueError(str(exc)) from None


@dataclass
class GenerationLine:
    """What a generation line says; None means "not given" (the session default applies).

    ``width``/``height`` may come alone (``-W 768``); the session fills the other from its default size.
    """

    prompt: str
    negative: str | None = None
    steps: int | None = None
    cfg: float | None = None
    seed: int | None = None
    seed_given: bool = False
    width: int | None = None
    height: int | None = None
    sampler: str | None = None
    n: int | None = None
    clip_skip: int | None = None
    emphasis: str | None = None
    comma_padding_backtrack: int | None = None
    init: str | None = None
    strength: float | None = None
    hires: float | None = None
    hires_steps: int | None = None
    hires_denoise: float | None = None
    hires_upscaler: str | None = None


#: InvokeAI's short switches that sdrepl does not support: an error naming the switch, never prompt text.
UNSUPPORTED_SWITCHES = {
    "M": "an init mask", "F": "fit to the init image",
    "U": "upscaling", "G": "face restoration", "v": "variation amount", "V": "variations",
    "x": "skip normalizing variations", "g": "a grid of the pictures", "i": "individual pictures",
    "t": "tokenization logs (use !tokens)", "T": "fit", "E": "embiggen", "k": "embiggen tiles",
}
_SWITCH = re.compile(r"(?:(?<=\s)|^)-([A-Za-z])(?=[\s\d.]|$)")


def check_switches(text: str) -> None:
    """Refuse InvokeAI switches sdrepl does not have (``-I init.png``), naming the switch and the way out."""
    for match in _SWITCH.finditer(text):
        letter = match.group(1)
        if letter in UNSUPPORTED_SWITCHES:
            raise UsageError(f"-{letter} (InvokeAI's {UNSUPPORTED_SWITCHES[letter]}) is not supported by sdrepl; "
                             f"remove it, or write \\-{letter} to keep it as prompt text. Options: "
                             f"{generation_help()}")


def parse_generation(text: str) -> GenerationLine:
    """Parse ``PROMPT [--neg TEXT] [--steps N] ...``; raise UsageError/PromptError/SamplerError."""
    check_switches(text)
    head, values = split_options(text, GENERATION_OPTIONS, where="generation line", short=True,
                                 value_error=PromptError)
    if len(head) >= 2 and head[0] == head[-1] and head[0] in "\"'" and head[0] not in head[1:-1]:
        head = head[1:-1].strip()  # InvokeAI's habit: "a prompt in quotes" -s 30
    line = GenerationLine(prompt=head)
    for key in ("negative", "steps", "cfg", "sampler", "n", "clip_skip", "emphasis", "comma_padding_backtrack",
                "init", "strength", "hires", *HIRES_DETAILS):
        if key in values:
            setattr(line, key, values[key])
    check_img2img(line)
    if "seed" in values:
        line.seed, line.seed_given = values["seed"], True
    if "size" in values:
        line.width, line.height = values["size"]
    line.width = values.get("width", line.width)
    line.height = values.get("height", line.height)
    return line


def check_img2img(line: GenerationLine) -> None:
    """The img2img and hires options' rules, said on the line that breaks them (the daemon checks too)."""
    if line.strength is not None and line.init is None:
        raise UsageError("--strength/-f is img2img's denoising strength: give the picture too, --init IMAGE "
                         "(A1111 and sdrepl do not store the init picture in a PNG's parameters)")
    if line.hires is None:
        given = [f"--{key.replace('_', '-')}" for key in HIRES_DETAILS if getattr(line, key) is not None]
        if given:
            raise UsageError(f"{', '.join(given)} set(s) hires fix: give the scale too, --hires SCALE (e.g. 2)")
    elif line.init is not None:
        raise UsageError("--hires is txt2img's Hires. fix and does not combine with --init (img2img): for a larger "
                         "img2img picture give the size you want with --size")


def generation_help() -> str:
    return "PROMPT " + " ".join(f"[{opt.spelling}]" for opt in GENERATION_OPTIONS[:7])
