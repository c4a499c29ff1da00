"""The training pictures: checked before training starts, encoded to latents once, served in batches.

Everything that can be wrong with a dataset (no pictures, unreadable files, pictures too small for the
training size without ``--center-crop``) is found by :func:`load_dataset` before any device work, and
reported in one :class:`TrainingError` that lists the files. Latents are encoded once (each picture,
and its mirror image with ``--flip``) and kept on the CPU, so a step never runs the VAE:

- ``once`` (A1111's default): one sample of the VAE's latent distribution, drawn at encoding and reused;
- ``deterministic``: the distribution's mean;
- ``random``: mean and std are stored and a fresh sample is drawn every time the picture is used.

The order of pictures comes from :class:`EpochOrder`, whose state (epoch, position, permutation,
generator) goes into the checkpoint so a resumed run sees the pictures in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdrepl.core.errors import TrainingError
from sdrepl.core.picture_files import PictureError, open_picture
from sdrepl.core.training.captions import compile_filename_regex, read_caption

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
_LIST = 10  # how many files an error lists before "and N more"


@dataclass
class Picture:
    path: Path
    caption: str
    #: [3, H, W] in [-1, 1] until encoded; dropped afterwards to free memory.
    pixels: torch.Tensor | None
    #: The file's size (width, height) before fitting: SDXL's "original size" time ids.
    original: tuple[int, int] = (0, 0)
    #: Where the training crop starts (top, left) in the scaled picture, and in its mirror image
    #: (``--flip``): SDXL's crop time ids. (0, 0) for a stretched picture.
    crop: tuple[int, int] = (0, 0)
    crop_flipped: tuple[int, int] = (0, 0)

    def time_ids(self, size: tuple[int, int], flipped: bool = False) -> list[int]:
        """SDXL's six time ids for this picture trained at ``size`` (width, height), as SDXL training
        computes them: original (h, w), crop (top, left), target (h, w)."""
        crop = self.crop_flipped if flipped else self.crop
        return [self.original[1], self.original[0], crop[0], crop[1], size[1], size[0]]


@dataclass
class TrainingSet:
    """Pictures, their captions and (once :meth:`encode_some` has finished) their latents."""

    pictures: list[Picture]
    size: tuple[int, int]
    flip: bool
    mode: str
    #: [K, C, h, w] float32 (on the CPU until :meth:`to_device`): sample (once), mean (deterministic,
    #: random); K = pictures x (1 or 2).
    latents: list[torch.Tensor] = field(default_factory=list)
    #: [K, C, h, w] std of each latent distribution, ``random`` mode only.
    stds: list[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pictures)

    @property
    def variants(self) -> int:
        return 2 if self.flip else 1

    @property
    def encoded(self) -> bool:
        return len(self.latents) == len(self.pictures) * self.variants

    def encode_some(self, vae: Any, device: torch.device, generator: torch.Generator, limit: int = 8) -> bool:
        """Encode up to ``limit`` more pictures with ``vae``; True while some are left (so callers can
        interleave other device work with a long encoding)."""
        start = len(self.latents) // self.variants
        chunk = self.pictures[start : start + limit]
        if not chunk:
            return False
        pixels = torch.stack([p.pixels for p in chunk if p.pixels is not None])
        if self.flip:  # picture i at 2i, its mirror at 2i + 1
            pixels = torch.stack([pixels, pixels.flip(-1)], dim=1).flatten(0, 1)
        scale = float(getattr(vae.config, "scaling_factor", 0.18215))
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        dtype = next(vae.parameters()).dtype
        with torch.no_grad():
            dist = vae.encode(pixels.to(device, dtype)).latent_dist
        mean = (dist.mean.float().cpu() - shift) * scale
        std = dist.std.float().cpu() * scale
        if self.mode == "once":
            noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
            mean = mean + std * noise
        for i in range(mean.shape[0]):
            self.latents.append(mean[i].clone())
            if self.mode == "random":
                self.stds.append(std[i].clone())
        for picture in chunk:
            picture.pixels = None
        return not self.encoded

    def to_device(self, device: torch.device) -> None:
        """Move the encoded latents (and stds) to the training device once, so no step copies them."""
        self.latents = [t.to(device) for t in self.latents]
        self.stds = [t.to(device) for t in self.stds]

    def latent(self, index: int, flipped: bool, generator: torch.Generator) -> torch.Tensor:
        """The latent of picture ``index`` (its mirror when ``flipped``), resampled in ``random`` mode
        (``generator`` on the latents' device)."""
        k = index * self.variants + (1 if flipped and self.flip else 0)
        mean = self.latents[k]
        if self.mode != "random":
            return mean
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32, device=mean.device)
        return mean + self.stds[k] * noise


def scan_images(folder: Path) -> list[Path]:
    """Picture files directly in ``folder``, sorted by name (captions and other files are not pictures)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_dataset(
    folder: Path,
    size: tuple[int, int],
    *,
    center_crop: bool = False,
    flip: bool = False,
    latents: str = "once",
    filename_regex: str | None = None,
    join: str = " ",
) -> TrainingSet:
    """Read, check and resize every picture of ``folder``; raise one TrainingError naming every bad file."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise TrainingError(f"--data {folder}: no such folder; give the folder that holds the training pictures")
    paths = scan_images(folder)
    if not paths:
        raise TrainingError(
            f"--data {folder}: no pictures in this folder (looked for {', '.join(sorted(IMAGE_SUFFIXES))}); "
            "put the training pictures directly in it"
        )
    regex = compile_filename_regex(filename_regex)
    width, height = size
    pictures: list[Picture] = []
    unreadable: list[str] = []
    too_small: list[str] = []
    for path in paths:
        try:
            image = open_picture(path)  # the header's size is checked before any pixel is decoded
        except PictureError as exc:
            unreadable.append(f"{path.name} ({exc.reason[:160]})")
            continue
        if not center_crop and (image.width < width or image.height < height):
            too_small.append(f"{path.name} ({image.width}x{image.height})")
            continue
        fitted, crop, crop_flipped = fit_with_crop(image, size, center_crop)
        pictures.append(Picture(path, read_caption(path, regex, join), to_pixels(fitted), image.size, crop,
                                crop_flipped))
    problems = []
    if unreadable:
        problems.append(f"{len(unreadable)} picture(s) cannot be read: {_listing(unreadable)}; fix or remove them")
    if too_small:
        problems.append(
            f"{len(too_small)} picture(s) are smaller than the training size {width}x{height}: {_listing(too_small)}; "
            "use larger pictures, a smaller --size, --center-crop (scales up), or !preprocess"
        )
    if problems:
        raise TrainingError(f"--data {folder}: " + "; ".join(problems) + ". Nothing was trained.")
    return TrainingSet(pictures, size, flip, latents)


def fit(image: Image.Image, size: tuple[int, int], center_crop: bool) -> Image.Image:
    """Resize to ``size``: stretched as A1111 does, or (``center_crop``) scaled to cover then cropped."""
    return fit_with_crop(image, size, center_crop)[0]


def fit_with_crop(image: Image.Image, size: tuple[int, int], center_crop: bool,
                  ) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
    """:func:`fit`, plus where the crop starts (top, left) in the scaled picture and in its mirror image."""
    width, height = size
    if not center_crop:
        if image.size == (width, height):
            return image, (0, 0), (0, 0)
        return image.resize((width, height), Image.Resampling.LANCZOS), (0, 0), (0, 0)
    scale = max(width / image.width, height / image.height)
    scaled = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if scaled != image.size:
        image = image.resize(scaled, Image.Resampling.LANCZOS)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height)), (top, left), (top, image.width - width - left)


def to_pixels(image: Image.Image) -> torch.Tensor:
    """RGB picture -> [3, H, W] float32 in [-1, 1], as the VAE expects."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class EpochOrder:
    """The order pictures are used in: every epoch a fresh permutation of ``count`` x ``repeats`` items.

    It owns its generator, so its state (saved in checkpoints) replays the exact order after a resume.
    """

    def __init__(self, count: int, repeats: int, seed: int) -> None:
        self.count = count
        self.repeats = repeats
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.position = 0
        self.order = self._permutation()

    def _permutation(self) -> list[int]:
        items = self.count * self.repeats
        return [i % self.count for i in torch.randperm(items, generator=self.generator).tolist()]

    def take(self, n: int) -> list[int]:
        """The next ``n`` picture indices, starting a new epoch when one runs out."""
        out: list[int] = []
        while len(out) < n:
            if self.position >= len(self.order):
                self.epoch += 1
                self.position = 0
                self.order = self._permutation()
            out.append(self.order[self.position])
            self.position += 1
        return out

    @property
    def epoch_progress(self) -> float:
        """Epochs done, with the current one as a fraction (for ``loss.csv``)."""
        return self.epoch + self.position / max(1, len(self.order))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "order": list(self.order),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.order = [int(i) for i in state["order"]]
        self.generator.set_state(state["generator"])


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_LIST])
    return shown if len(items) <= _LIST else f"{shown} and {len(items) - _LIST} more"
