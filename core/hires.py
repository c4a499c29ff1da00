"""A1111's Hires. fix: the picture made at the job's size, upscaled, then refined by a second img2img pass.

The settings (``--hires SCALE [--hires-steps N] [--hires-denoise F] [--hires-upscaler latent|lanczos]``)
travel as :class:`HiresFix`. The upscale is one of A1111's two built-in kinds:

- ``latent``: the first pass's latents interpolated to the new size (A1111's "Latent" upscaler:
  ``torch.nn.functional.interpolate(mode="bilinear", antialias=False)``), no VAE round trip;
- ``lanczos``: the first pass decoded, resized with Pillow's LANCZOS, and encoded again (A1111's
  "Lanczos" upscaler runs on the decoded picture the same way).

The second pass runs ``int(steps2 * denoise)`` of ``steps2`` steps (``steps2`` = ``--hires-steps``, 0 meaning
the first pass's steps), with the same prompt, embeddings and LoRAs (the network plan stays active), and
noise from the same per-picture seeds at the new shape (A1111 builds a fresh seeded RNG for it too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sdrepl.core.errors import SdreplError
from sdrepl.core.limits import LIMITS

#: ``--hires-upscaler`` values and the names A1111 writes in ``Hires upscaler``.
UPSCALERS = {"latent": "Latent", "lanczos": "Lanczos"}
#: A1111's defaults: denoising strength 0.7 for the second pass, the Latent upscaler.
DEFAULT_DENOISE = 0.7
DEFAULT_UPSCALER = "latent"


class HiresError(SdreplError):
    """Hires. fix settings that cannot work (a result size outside the limits, an unknown upscaler)."""


@dataclass(frozen=True)
class HiresFix:
    """The hires settings of one job; ``steps`` 0 means the first pass's step count."""

    scale: float
    steps: int = 0
    denoise: float = DEFAULT_DENOISE
    upscaler: str = DEFAULT_UPSCALER

    def second_steps(self, first: int) -> int:
        return self.steps or first

    def parameters(self) -> dict[str, Any]:
        """A1111's fields for a hires picture (``Hires steps`` only when set, as A1111 writes it)."""
        fields: dict[str, Any] = {"Denoising strength": self.denoise, "Hires upscale": _number(self.scale)}
        if self.steps:
            fields["Hires steps"] = self.steps
        fields["Hires upscaler"] = UPSCALERS[self.upscaler]
        return fields


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def upscaler_name(text: str) -> str:
    """``latent`` or ``lanczos`` from any case (also A1111's ``Latent`` / ``Lanczos``)."""
    value = str(text).strip().lower()
    if value not in UPSCALERS:
        raise HiresError(f"unknown hires upscaler {text!r}; sdrepl has {', '.join(UPSCALERS)}")
    return value


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The second pass's size: each side times ``scale``, rounded down to a multiple of 8 (the latent grid),
    within ``core.limits``; :class:`HiresError` saying what would fit otherwise."""
    out = []
    for key, side in (("width", width), ("height", height)):
        limit = LIMITS[key]
        step = limit.multiple or 8
        target = int(side * scale)
        target -= target % step
        if not limit.check(target):
            largest = limit.hi / side
            raise HiresError(f"--hires {scale:g} makes the {key} {target} from {side}, outside {limit.lo:g}.."
                             f"{limit.hi:g}; use a scale up to {largest:.2f} or a smaller size")
        out.append(target)
    return out[0], out[1]


def upscale_latents(latents: torch.Tensor, width: int, height: int, factor: int = 8) -> torch.Tensor:
    """A1111's "Latent" upscaler: bilinear interpolation of the latents to ``width`` x ``height`` pixels."""
    size = (height // factor, width // factor)
    return torch.nn.functional.interpolate(latents, size=size, mode="bilinear", antialias=False)


def upscale_lanczos(components: Any, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Decode, Lanczos-resize each picture to ``width`` x ``height``, encode again (A1111's "Lanczos")."""
    from sdrepl.core.denoise import decode
    from sdrepl.core.img2img import encode_pictures, just_resize

    pictures = decode(components, latents)
    return encode_pictures(components, [just_resize(p, width, height) for p in pictures])


def upscale(components: Any, latents: torch.Tensor, hires: HiresFix, width: int, height: int) -> torch.Tensor:
    """The first pass's latents brought to the second pass's size by ``hires.upscaler``."""
    if hires.upscaler == "lanczos":
        return upscale_lanczos(components, latents, width, height)
    return upscale_latents(latents, width, height, components.vae_scale_factor)
