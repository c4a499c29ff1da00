"""Resolving ``--model`` and loading a pipeline onto a device.

``--model`` takes ``tiny`` / ``tiny-sd2`` / ``tiny-sdxl`` (built in, offline), a diffusers model folder, a single-file
checkpoint (``.safetensors`` / ``.ckpt``), or a hub id (network or a warm cache). Every failure a user
can cause is a :class:`ModelError` naming what was given and what was expected.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdrepl.core import tiny
from sdrepl.core.devices import dtype_name, resolve_device, resolve_dtype
from sdrepl.core.embedding import CLIP_G, CLIP_L, SINGLE
from sdrepl.core.errors import ModelError
from sdrepl.core.model_hash import ModelHasher
from sdrepl.core.model_spec import looks_like_path, no_such_model

log = logging.getLogger(__name__)

#: Native picture sizes per family (what a user gets without ``--size``).
NATIVE_SIZE = {"sd1": 512, "sd2": 768, "sdxl": 1024}
FAMILY_LABEL = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass
class LoadedModel:
    """A pipeline on its device, with what the rest of the program needs to know about it."""

    name: str
    source: str  # "tiny", "folder", "single-file", "hub"
    family: str  # "sd1", "sd2", "sdxl"
    pipe: Any
    device: torch.device
    dtype: torch.dtype
    native_size: int
    path: Path | None = None
    _hasher: ModelHasher | None = field(default=None, repr=False)

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def text_encoder(self):
        return self.pipe.text_encoder

    @property
    def encoder_widths(self) -> dict[str, int]:
        """Width of each text encoder, keyed as embedding vectors are keyed (see ``core.embedding``)."""
        if self.family == "sdxl":
            return {CLIP_L: 768, CLIP_G: 1280}
        return {SINGLE: int(self.pipe.text_encoder.config.hidden_size)}

    @property
    def label(self) -> str:
        return FAMILY_LABEL[self.family]

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts (``epsilon`` / ``v_prediction``), as its scheduler is configured."""
        return str(self.pipe.scheduler.config.get("prediction_type") or "epsilon")

    @property
    def model_hash(self) -> str:
        """A1111's ``Model hash``: the first 10 hex digits of the sha256 of the weights file, or "" while it
        is still being computed in the background (see ``core/model_hash.py``).

        For a folder (and the tiny models) the UNet's weights file stands in for the checkpoint.
        """
        return self.hasher.short

    @property
    def hasher(self) -> ModelHasher:
        """The model's hash job (created on first use; a big file is hashed in the background)."""
        if self._hasher is None:
            self._hasher = ModelHasher(self.path)
            self._hasher.start()
        return self._hasher

    def describe(self) -> dict[str, object]:
        return {
            "model": self.name,
            "source": self.source,
            "family": self.family,
            "device": str(self.device),
            "dtype": dtype_name(self.dtype),
            "native_size": self.native_size,
            "encoders": self.encoder_widths,
            "prediction_type": self.prediction_type,
            "speed": self.speed_description(),
        }

    def speed_description(self) -> dict[str, Any] | None:
        """``core.speed.Speed.describe()``: the fast path's switches, compile counts and warm-ups (live)."""
        speed = getattr(self.pipe, "sdrepl_speed", None)
        return speed.describe() if speed is not None else None


def family_of(pipe: Any) -> str:
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    width = int(pipe.text_encoder.config.hidden_size)
    return {768: "sd1", 1024: "sd2"}.get(width, "sd1")


def load_model(spec: str, device: str = "auto", dtype: str = "auto", config: Path | None = None,
               prediction_type: str | None = None, compile: bool = False) -> LoadedModel:
    """Load ``spec`` (see module docstring) onto the chosen device; raise ModelError/DeviceError on failure.

    ``config`` is a diffusers config folder describing a single-file checkpoint of an architecture sdrepl
    does not recognise by itself (see :mod:`sdrepl.core.checkpoints`); it is ignored for other kinds.
    ``prediction_type`` (``epsilon`` / ``v_prediction``, ``--prediction-type``) overrides what the model's
    scheduler predicts; without it a single-file SD 2.x checkpoint's is guessed (see ``core.checkpoints``)
    and other models keep their own config's. The fast path (``core.speed``: channels_last and TF32 on
    CUDA, ``compile`` = ``--compile``) is set up last.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    spec = (spec or "tiny").strip()
    if spec in tiny.TINY_MODELS:
        folder = tiny.ensure_tiny_folder(spec)
        pipe = _load_folder(folder, spec, dt)
        model = LoadedModel(spec, "tiny", tiny.TINY_MODELS[spec].family, pipe, dev, dt, tiny.TINY_SIZE, folder)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            pipe = _load_folder(path, spec, dt)
            source = "folder"
        elif path.is_file():
            pipe = _load_single_file(path, config, dt, prediction_type)
            source = "single-file"
        elif looks_like_path(spec):
            raise no_such_model(spec)
        elif _HUB_ID.match(spec):
            pipe = _load_hub(spec, dt)
            source = "hub"
        else:
            raise ModelError(
                f"--model {spec!r} is neither a built-in model (tiny, tiny-sd2, tiny-sdxl), an existing path, nor a hub id "
                "(owner/name)"
            )
        family = family_of(pipe)
        native = NATIVE_SIZE[family]
        sample = getattr(pipe.unet.config, "sample_size", None)
        if isinstance(sample, int) and sample > 0:
            native = sample * getattr(pipe, "vae_scale_factor", 8)
        model = LoadedModel(spec, source, family, pipe, dev, dt, native, path if source != "hub" else None)
    model.pipe.set_progress_bar_config(disable=True)
    scheduler = model.pipe.scheduler
    if prediction_type and scheduler.config.get("prediction_type") != prediction_type:
        model.pipe.scheduler = type(scheduler).from_config(scheduler.config, prediction_type=prediction_type)
    if getattr(model.pipe, "safety_checker", None) is not None:
        model.pipe.safety_checker = None
    # Loaded in ``dt`` already: diffusers warns on every ``.to(dtype)``, and converting at load halves the
    # peak memory of half-precision loads.
    model.pipe.to(dev)
    for name in ("text_encoder", "text_encoder_2", "unet", "vae"):
        module = getattr(model.pipe, name, None)
        if module is None:
            continue
        if module.dtype != dt:  # a component the loader left in its stored dtype
            torch.nn.Module.to(module, dtype=dt)
        module.requires_grad_(False)
    from sdrepl.core.speed import apply_speed

    apply_speed(model.pipe, dev, compile=compile)
    model.hasher  # noqa: B018 - start hashing a big checkpoint now, in the background, not at the first picture
    return model


def _load_folder(folder: Path, spec: str, dtype: torch.dtype):
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelError(
            f"--model {spec}: {folder} is a folder but not a diffusers model (no model_index.json); expected "
            "a folder made by save_pretrained, or a single .safetensors/.ckpt checkpoint file"
        )
    try:
        class_name = json.loads(index.read_text()).get("_class_name", "")
    except (OSError, ValueError) as exc:
        raise ModelError(f"--model {spec}: {index} is not valid JSON ({exc})") from exc
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    xl = "XL" in class_name
    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    extra: dict[str, Any] = {"add_watermarker": False} if xl else {"safety_checker": None,
                                                                     "requires_safety_checker": False}
    try:
        with _torch_dtype_accepted():
            return cls.from_pretrained(folder, local_files_only=True, torch_dtype=dtype, **extra)
    except Exception as exc:  # diffusers raises many types for a broken folder
        raise ModelError(f"--model {spec}: cannot load the diffusers folder {folder}: {_short(exc)}") from exc


def _load_single_file(path: Path, config: Path | None, dtype: torch.dtype, prediction_type: str | None):
    from sdrepl.core.checkpoints import load_single_file

    return load_single_file(path, config=config, dtype=dtype, prediction_type=prediction_type)


def _load_hub(spec: str, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    try:
        with _torch_dtype_accepted():
            return DiffusionPipeline.from_pretrained(spec, safety_checker=None, torch_dtype=dtype)
    except Exception as exc:
        raise ModelError(
            f"--model {spec}: cannot load this hub id ({_short(exc)}); without network it must already be in "
            "the Hugging Face cache, or give a local folder or checkpoint file instead"
        ) from exc


@contextmanager
def _torch_dtype_accepted() -> Iterator[None]:
    """Newer diffusers renamed ``torch_dtype`` to ``dtype`` (with a FutureWarning); older ones know only the former."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
        yield


def _short(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception, cut short: errors are one line, never a dump."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
