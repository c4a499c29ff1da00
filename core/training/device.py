"""Device-side switches of a training run: precision (autocast, fp16 grad scaling) and gradient checkpointing.

The model is the daemon's resident one, shared with generation, so everything switched on here is switched
off again when the run ends (:func:`set_gradient_checkpointing` with ``on=False``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from sdrepl.core.devices import dtype_name
from sdrepl.core.errors import TrainingError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(requested: str | None, device: torch.device, weights: torch.dtype) -> str:
    """``--precision`` checked against the device and the resident weights; by default the weights' own."""
    if requested is None:
        requested = dtype_name(weights) if weights in (torch.float16, torch.bfloat16) else "fp32"
    if requested == "fp16" and device.type == "cpu":
        raise TrainingError("--precision fp16 is not supported on the CPU; use fp32 or bf16")
    if requested == "fp32" and weights != torch.float32:
        raise TrainingError(f"--precision fp32: the resident model is {dtype_name(weights)}; start the daemon with "
                            "--dtype fp32 to train in full precision, or use --precision fp16/bf16")
    return requested


def autocast(precision: str, device: torch.device):
    """Autocast to the training precision (nothing for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> Any:
    """A loss scaler for fp16 on CUDA (fp16 gradients of small vectors underflow without one), else None."""
    if precision == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def set_gradient_checkpointing(pipe: Any, on: bool) -> bool:
    """Toggle gradient checkpointing on the UNet and text encoder where supported; True if any is on.

    Memory for compute: activations are recomputed in the backward pass. diffusers checks it whenever
    grad is enabled; transformers only in training mode, which the trainer sets around each step.
    """
    active = False
    unet = pipe.unet
    if getattr(unet, "_supports_gradient_checkpointing", False):
        (unet.enable_gradient_checkpointing if on else unet.disable_gradient_checkpointing)()
        active = on
    for text_encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):  # SDXL has two
        if text_encoder is not None:
            active = _text_checkpointing(text_encoder, on) or active
    return active


def _text_checkpointing(text_encoder: Any, on: bool) -> bool:
    active = False
    enable = getattr(text_encoder, "activation_checkpointing_enable", None) or getattr(
        text_encoder, "gradient_checkpointing_enable", None)
    disable = getattr(text_encoder, "activation_checkpointing_disable", None) or getattr(
        text_encoder, "gradient_checkpointing_disable", None)
    if getattr(text_encoder, "supports_gradient_checkpointing", False) and enable is not None and disable is not None:
        enable() if on else disable()
        if on and hasattr(text_encoder, "disable_input_require_grads"):
            # transformers hooks the token embedding to make its output require grad (for PEFT); our
            # spliced vectors already carry the grad, and that hook makes the splice an in-place error.
            try:
                text_encoder.disable_input_require_grads()
            except AttributeError:  # no hook was registered
                pass
        text_encoder.eval()
        active = active or on
    return active
