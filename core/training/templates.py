"""Prompt templates: the lines a training caption is made from, with ``[name]`` and ``[filewords]``.

``[name]`` is where the trained vectors go; ``[filewords]`` is the picture's caption (see captions.py).
The built-in lists follow the spirit of AUTOMATIC1111's ``textual_inversion_templates`` (our own
wording): ``subject`` and ``style`` describe a thing or a look, the ``*_filewords`` variants add the
caption, and ``none`` trains on the bare token. A template FILE has one line per template (blank lines
and lines starting with ``#`` ignored). ``--property object|style`` is the diffusers script's shorthand.
"""

from __future__ import annotations

from pathlib import Path

from sdrepl.core.errors import TrainingError

NAME = "[name]"
FILEWORDS = "[filewords]"

_SUBJECT = (
    "a photo of a [name]",
    "a rendering of a [name]",
    "a cropped photo of the [name]",
    "the photo of a [name]",
    "a photo of a clean [name]",
    "a photo of a dirty [name]",
    "a dark photo of the [name]",
    "a photo of my [name]",
    "a photo of the cool [name]",
    "a close-up photo of a [name]",
    "a bright photo of the [name]",
    "a cropped photo of a [name]",
    "a good photo of the [name]",
    "a photo of one [name]",
    "a rendition of the [name]",
    "a photo of the small [name]",
    "a photo of the large [name]",
    "a close-up photo of the [name]",
    "a photo of a nice [name]",
    "a weird photo of a [name]",
)
_STYLE = (
    "a painting in the style of [name]",
    "a rendering in the style of [name]",
    "a cropped painting in the style of [name]",
    "the painting in the style of [name]",
    "a clean painting in the style of [name]",
    "a dark painting in the style of [name]",
    "a picture in the style of [name]",
    "a cool painting in the style of [name]",
    "a close-up painting in the style of [name]",
    "a bright painting in the style of [name]",
    "a good painting in the style of [name]",
    "a small painting in the style of [name]",
    "a large painting in the style of [name]",
    "a weird painting in the style of [name]",
    "art by [name]",
)

BUILTIN: dict[str, tuple[str, ...]] = {
    "subject": _SUBJECT,
    "style": _STYLE,
    "subject_filewords": tuple(f"{line}, {FILEWORDS}" for line in _SUBJECT),
    "style_filewords": tuple(f"{line}, {FILEWORDS}" for line in _STYLE),
    "none": (NAME,),
}

#: ``--property`` as in diffusers' textual_inversion.py (``--learnable_property object|style``).
PROPERTY_TEMPLATES = {"object": "subject", "style": "style"}


def template_for_property(prop: str) -> str:
    try:
        return PROPERTY_TEMPLATES[prop]
    except KeyError:
        raise TrainingError(f"--property {prop!r}: expected object or style") from None


def load_template(spec: str) -> tuple[str, ...]:
    """The template lines of a built-in name or a file; every line must contain ``[name]``."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise TrainingError(
            f"--template {spec!r} is neither a built-in template ({', '.join(BUILTIN)}) nor an existing file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainingError(f"--template {path}: cannot read it as UTF-8 text ({exc})") from None
    lines = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    if not lines:
        raise TrainingError(f"--template {path}: the file has no template lines; write one per line, e.g. "
                            "'a photo of a [name], [filewords]'")
    missing = [i for i, line in enumerate(text.splitlines(), 1)
               if line.strip() and not line.lstrip().startswith("#") and NAME not in line]
    if missing:
        raise TrainingError(
            f"--template {path}: line(s) {', '.join(map(str, missing[:10]))} have no [name]; every line must say "
            "where the trained embedding goes"
        )
    return lines


def uses_filewords(lines: tuple[str, ...]) -> bool:
    return any(FILEWORDS in line for line in lines)


def fill_filewords(line: str, filewords: str) -> str:
    """Put the caption in; ``[name]`` stays as a marker for the trainer to splice the vectors at."""
    text = line.replace(FILEWORDS, filewords)
    # A template ending in ", [filewords]" with an empty caption would leave a dangling comma.
    return text.strip().rstrip(",").strip()
