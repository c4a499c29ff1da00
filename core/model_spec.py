"""What a ``--model`` value that names a path must satisfy, decided from the text and the disk alone.

Kept free of torch (importing it takes seconds) so that ``sdrepl serve --model /missing.safetensors``
says "no such file" at once, before anything heavy is imported; :func:`sdrepl.core.models.load_model`
applies the same rule, so the fast check and the loader cannot disagree.
"""

from __future__ import annotations

from pathlib import Path

from sdrepl.core.errors import ModelError

#: File suffixes that make a ``--model`` value a path even without a ``/`` (checkpoints, weights).
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


def looks_like_path(spec: str) -> bool:
    """A value the user meant as a file or folder: a checkpoint suffix, or starting with ``.``, ``/``, ``~``."""
    return Path(spec).suffix.lower() in MODEL_SUFFIXES or spec.startswith((".", "/", "~"))


def no_such_model(spec: str) -> ModelError:
    return ModelError(
        f"--model {spec}: no such file or folder; expected tiny, tiny-sd2, tiny-sdxl, a diffusers model folder, "
        "a .safetensors/.ckpt checkpoint, or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5"
    )


def check_model_path(spec: str) -> None:
    """Raise :class:`ModelError` when ``spec`` names a path and nothing is there (no torch needed)."""
    spec = (spec or "tiny").strip()
    if looks_like_path(spec) and not Path(spec).expanduser().exists():
        raise no_such_model(spec)
