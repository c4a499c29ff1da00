"""img2img: an init picture read safely, fitted to the job ("Just resize"), VAE-encoded, noised to a step.

What A1111's img2img tab and InvokeAI's ``-I init.png -f 0.75`` do, on sdrepl's own loop
(``core.denoise``'s initial-latents hook): the picture is resized to the job's size with Lanczos (A1111's
"Just resize"; without a size, its own size rounded down to a multiple of 8), flattened onto white when it
has alpha (A1111's default background), turned upright by its EXIF orientation, encoded by the VAE (the
distribution's mode, so a seed gives one picture: A1111 samples it with an unseeded RNG), then noised to
the step ``strength`` selects. ``int(steps * strength)`` steps run (diffusers' and A1111's count without
"fix steps"): strength 0 runs none (the init latents decoded unchanged), strength 1 runs every step from
the init latents noised to the first timestep (not pure noise: ``add_noise`` keeps the init's trace; see
``tests/core/test_img2img.py`` for what holds).

Prompt editing (``[a:b:0.5]``) counts as A1111's img2img does: the steps the run takes, from 0, against
a schedule planned for all of ``steps``. An img2img run of 20 steps at strength 0.5 takes 10 steps, so
``[a:b:0.5]`` (switching at step 10) stays ``a`` throughout, and ``[a:b:0.25]`` switches after 5 of them.

The file is a stranger's: read by ``core.picture_files.open_picture`` (through ``core.safe_open``: no FIFO
blocks, bytes bounded; the declared size checked from the header against ``MAX_PICTURE_PIXELS`` before a
pixel is decoded). Every failure is an :class:`InitImageError` naming the file and the way out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdrepl.core.errors import SdreplError
from sdrepl.core.limits import LIMITS

#: A1111's ``img2img_background_color`` default: alpha is flattened onto white.
BACKGROUND = (255, 255, 255)


class InitImageError(SdreplError):
    """An init picture that cannot be used (missing, not a picture, too large, damaged)."""


@dataclass(frozen=True)
class InitPicture:
    """A decoded, upright RGB init picture and where it came from (the path as given, for the result)."""

    image: Any  # PIL.Image.Image, RGB
    path: str

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.width), int(self.image.height)


def _refuse(path: str, reason: str) -> InitImageError:
    advice = "" if "PNG" in reason else "; give a PNG, JPEG or WebP picture"
    return InitImageError(f"init picture {path}: {reason}{advice} (--init IMAGE)")


def load_init_picture(path: Path | str, shown: str | None = None) -> InitPicture:
    """Read, check and decode the init picture at ``path`` (``shown``: the path as the user wrote it) with
    ``core.picture_files.open_picture``, the one bounded picture reader (header size checked first)."""
    from sdrepl.core.picture_files import PictureError, open_picture

    name = shown or str(path)
    try:
        image = open_picture(path, background=BACKGROUND)
    except PictureError as exc:
        raise _refuse(name, exc.reason) from None
    return InitPicture(image, name)


def fitted_size(width: int, height: int) -> tuple[int, int]:
    """A job size from an init picture's size: each side rounded down to a multiple of 8, within
    ``core.limits`` (a side smaller than the lowest limit is raised to it; a larger one capped)."""
    out = []
    for key, side in (("width", width), ("height", height)):
        limit = LIMITS[key]
        step = limit.multiple or 8
        out.append(int(min(max(side - side % step, limit.lo), limit.hi)))
    return out[0], out[1]


def just_resize(image: Any, width: int, height: int) -> Any:
    """A1111's "Just resize": stretched to the size with Lanczos, no crop (unchanged if it fits already)."""
    from PIL import Image

    if (image.width, image.height) == (width, height):
        return image
    return image.resize((width, height), resample=Image.LANCZOS)


def steps_to_run(steps: int, strength: float) -> int:
    """How many of ``steps`` sampler steps an img2img run at ``strength`` takes: ``int(steps * strength)``
    (diffusers' ``get_timesteps`` and A1111 without "fix steps"); it starts at step ``steps - that``."""
    return min(int(steps * strength), steps)


def _scaled(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents to the UNet's space (the inverse of ``core.denoise.decode``'s unscaling)."""
    from sdrepl.core.denoise import latent_stats

    stats = latent_stats(vae, latents)
    if stats is not None:
        mean_t, std_t = stats
        return (latents - mean_t) * vae.config.scaling_factor / std_t
    return latents * vae.config.scaling_factor


def _encode_one(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    out = vae.encode(pixels.to(vae.device, vae.dtype))
    dist = getattr(out, "latent_dist", None)
    return dist.mode() if dist is not None else out.latents


@torch.no_grad()
def encode_pictures(components: Any, images: list[Any]) -> torch.Tensor:
    """PIL pictures (all the same size) -> scaled latents ``[N, C, h, w]``, one picture per VAE call (as
    ``core.denoise.decode``: a batch's latents equal their batch-of-one latents). An fp16 VAE that
    overflows is retried in fp32 for that picture (SDXL's VAE does), as decoding is."""
    vae = components.vae
    processor = components.image_processor
    parts = []
    for image in images:
        pixels = processor.preprocess(image)
        latents = _encode_one(vae, pixels)
        if vae.dtype == torch.float16 and not bool(torch.isfinite(latents).all()):
            vae.to(torch.float32)
            try:
                latents = _encode_one(vae, pixels)
            finally:
                vae.to(torch.float16)
        parts.append(_scaled(vae, latents.float()))
    return torch.cat(parts)


def init_latents(components: Any, picture: InitPicture, width: int, height: int) -> torch.Tensor:
    """The init picture resized to ``width`` x ``height`` and encoded: clean latents ``[1, C, h, w]``."""
    return encode_pictures(components, [just_resize(picture.image, width, height)])
