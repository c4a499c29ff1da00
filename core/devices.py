"""Choosing the device and dtype from the user's ``--device`` / ``--dtype`` words.

``auto`` follows what users of the webui expect: CUDA with half precision when there is an NVIDIA GPU,
Apple's MPS next, else the CPU in float32 (half precision on the CPU is slow or unsupported).
"""

from __future__ import annotations

import torch

from sdrepl.core.errors import DeviceError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn ``auto|cuda|cuda:N|mps|cpu`` into a device that exists here, or say why it does not."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {spec}: this machine has no CUDA device (torch {torch.__version__}"
                f"{'' if torch.version.cuda else ', a CPU-only build'}); use --device cpu or auto"
            )
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
        return device
    if spec == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise DeviceError("--device mps: Apple's MPS backend is not available here; use --device cpu or auto")
        return torch.device("mps")
    raise DeviceError(f"--device {spec!r} is not a device; expected auto, cuda, cuda:N, mps or cpu")


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """Turn ``auto|fp16|bf16|fp32`` into a dtype that works on ``device``."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if spec not in DTYPES:
        raise DeviceError(f"--dtype {spec!r} is not a dtype; expected auto, fp16, bf16 or fp32")
    dtype = DTYPES[spec]
    if device.type == "cpu" and dtype is torch.float16:
        raise DeviceError("--dtype fp16 on the CPU is not supported (too slow, some ops missing); use fp32 or bf16")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
