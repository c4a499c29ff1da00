"""``!preprocess SRC DST``: turn a folder of pictures into a training folder.

Each picture is made square at ``size``: ``center`` scales it to cover and crops the middle, ``split``
turns an oversized (clearly non-square) picture into two overlapping squares from its two ends (a square
one is center-cropped), ``none`` stretches it. ``flip`` adds a mirrored copy. Captions travel with the
pictures: outputs are named A1111-style ``00001-0-<caption>.png`` so ``[filewords]`` still works, a
sidecar ``.txt`` is copied beside every output made from its picture, and ``caption`` writes a sidecar for
every output even when the source had none. Unreadable files are skipped and reported, never fatal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from sdrepl.core.errors import TrainingError
from sdrepl.core.picture_files import PictureError, open_picture
from sdrepl.core.training.captions import NUMBERING, read_caption, sidecar_path
from sdrepl.core.training.dataset import IMAGE_SUFFIXES, fit

CROPS = ("center", "split", "none")
#: A picture whose long side is more than this times its short side is "oversized" for ``split``.
SPLIT_RATIO = 1.25
_UNSAFE = re.compile(r"[\\/:*?\"<>|\x00-\x1f]+")


@dataclass
class PreprocessReport:
    dst: Path
    written: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)

    def describe(self) -> dict[str, object]:
        return {"written": self.written, "skipped": self.skipped, "dst": str(self.dst)}


def preprocess(src: Path, dst: Path, size: int, *, crop: str = "center", flip: bool = False,
               caption: bool = False) -> PreprocessReport:
    """Write the prepared pictures of ``src`` into ``dst`` (created if needed)."""
    src, dst = Path(src).expanduser().absolute(), Path(dst).expanduser().absolute()
    if crop not in CROPS:
        raise TrainingError(f"!preprocess --crop {crop!r}: expected one of {', '.join(CROPS)}")
    if size < 8 or size % 8:
        raise TrainingError(f"!preprocess --size {size}: expected a multiple of 8 such as 512")
    if not src.is_dir():
        raise TrainingError(f"!preprocess: the source {src} is not a folder")
    if dst == src:
        raise TrainingError(f"!preprocess: the destination {dst} is the source folder; pick a new folder for DST")
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainingError(f"!preprocess: cannot create the destination {dst} ({exc.strerror})") from None
    report = PreprocessReport(dst)
    files = sorted(p for p in src.iterdir() if p.is_file())
    number = 0
    for path in files:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            if path.suffix.lower() != ".txt":
                report.skipped.append({"path": str(path), "reason": "not a picture"})
            continue
        try:
            image = open_picture(path)  # the header's size is checked before any pixel is decoded
        except PictureError as exc:
            report.skipped.append({"path": str(path), "reason": f"cannot read it ({exc.reason[:160]})"})
            continue
        text = read_caption(path)
        has_sidecar = sidecar_path(path).is_file()
        number += 1
        outputs = list(_squares(image, size, crop))
        if flip:
            outputs += [ImageOps.mirror(square) for square in outputs]
        for variant, square in enumerate(outputs):
            out = dst / _file_name(number, variant, NUMBERING.sub("", path.stem))
            square.save(out, format="PNG")
            if has_sidecar or caption:
                sidecar_path(out).write_text(text + "\n", encoding="utf-8")
            report.written += 1
    return report


def _squares(image: Image.Image, size: int, crop: str):
    """The square pictures one source gives (one, or two for ``split`` of an oversized picture)."""
    if crop == "none":
        yield fit(image, (size, size), center_crop=False)
        return
    long_side, short_side = max(image.size), min(image.size)
    if crop == "center" or long_side <= short_side * SPLIT_RATIO:
        yield fit(image, (size, size), center_crop=True)
        return
    scale = size / short_side
    scaled = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                          Image.Resampling.LANCZOS)
    end = (scaled.width - size, scaled.height - size)
    yield scaled.crop((0, 0, size, size))
    yield scaled.crop((end[0], end[1], end[0] + size, end[1] + size))


def _file_name(number: int, variant: int, caption: str) -> str:
    """``00001-0-a man in suit.png``: A1111's numbering, which [filewords] strips again."""
    slug = _UNSAFE.sub(" ", caption).strip()[:120].strip()
    return f"{number:05d}-{variant}-{slug}.png" if slug else f"{number:05d}-{variant}.png"
