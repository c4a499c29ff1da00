"""``[filewords]``: the caption of a training picture, and the augmentations applied to it each step.

The caption of ``DIR/000001-1-a man in suit.png`` follows AUTOMATIC1111: a sidecar ``DIR/000001-1-a man
in suit.txt`` wins when it exists; otherwise the file name without its extension and without the
``000001-1-`` numbering that A1111's preprocessing puts in front. ``--filename-regex RE`` then keeps only
the matches of RE, joined with ``--join`` (regex ``\\w+`` and join ``", "`` turn the name above into
``a, man, in, suit``). Shuffling and dropping comma-separated tags are done per use, from a
``random.Random`` the trainer owns, so a resumed run makes the same choices as an uninterrupted one.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from sdrepl.core.errors import TrainingError

#: The numbering A1111's preprocessing puts in front of file names (``000001-1-``, also ``0001-``).
NUMBERING = re.compile(r"^\d+(?:-\d+)*-\s*")


def compile_filename_regex(pattern: str | None) -> re.Pattern[str] | None:
    """Compile ``--filename-regex``, or say where the pattern is wrong."""
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise TrainingError(
            f"--filename-regex {pattern!r} is not a valid regular expression ({exc}); e.g. --filename-regex '\\w+'"
        ) from None


def sidecar_path(image: Path) -> Path:
    """Where a picture's caption file would be: same name, ``.txt``."""
    return image.with_suffix(".txt")


def caption_from_name(name: str, regex: re.Pattern[str] | None = None, join: str = " ") -> str:
    """The caption a file name gives (no sidecar lookup): numbering stripped, then regex matches joined."""
    stem = Path(name).stem
    text = NUMBERING.sub("", stem)
    if regex is not None:
        matches = [m.group(0) for m in regex.finditer(text) if m.group(0)]
        text = join.join(matches)
    return text.strip()


def read_caption(image: Path, regex: re.Pattern[str] | None = None, join: str = " ") -> str:
    """The ``[filewords]`` of ``image``: its sidecar ``.txt`` when there is one, else its file name."""
    sidecar = sidecar_path(image)
    if sidecar.is_file():
        try:
            text = sidecar.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TrainingError(
                f"{sidecar}: cannot read this caption file ({exc}); save it as UTF-8 text or remove it"
            ) from None
        return " ".join(text.split())
    return caption_from_name(image.name, regex, join)


def augment_caption(text: str, rng: random.Random, *, shuffle: bool = False, dropout: float = 0.0) -> str:
    """Shuffle and/or drop comma-separated tags (A1111's ``--shuffle-tags`` and ``--tag-dropout``).

    Every tag is dropped with probability ``dropout``. The random draws come from ``rng`` only, and the
    number of draws depends only on the caption, so the caller's saved RNG state replays them exactly.
    """
    if not shuffle and dropout <= 0:
        return text
    tags = [tag.strip() for tag in text.split(",")]
    tags = [tag for tag in tags if tag]
    if shuffle:
        rng.shuffle(tags)
    if dropout > 0:
        tags = [tag for tag in tags if rng.random() >= dropout]
    return ", ".join(tags)
