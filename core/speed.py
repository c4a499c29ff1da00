"""The fast path's switches: ``--compile`` (torch.compile of the UNet and the VAE decoder), channels_last,
TF32 matmuls on Ampere and newer, and what the attention runs on (SDPA).

Why these and no more: they are the ones that keep pictures what they are (TF32 only touches fp32
matmuls, channels_last only the memory layout; the fp16 VAE's fp32 retry lives in ``core.denoise.decode``)
and need no extra package. ``--compile`` compiles each module in place (``nn.Module.compile``), so the
pipeline, the LoRA hooks and the embedding splicing see the same module objects; the weights never change
identity (embeddings are spliced into the text encoder's input, not the compiled modules), so a new prompt
or embedding never recompiles. LoRAs are forward hooks on UNet modules: with hook guards on (set here), a
new set of hooked modules compiles once, and the graph of the model without them is kept. Each picture shape (batch, height, width) compiles once (``dynamic=False``:
a static graph per shape is the fast one); the first generation at a shape pays it, and :class:`Speed`
records how long that took, for ``status``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

#: How many shapes one compiled module keeps (dynamo's default of 8 would recompile dynamically after).
SHAPES_KEPT = 64


@dataclass
class Speed:
    """What was switched on for one loaded model, and the compile counts and warm-ups so far."""

    compile: bool = False
    backend: str | None = None
    channels_last: bool = False
    tf32: bool = False
    attention: str = "default"
    #: Graphs compiled per module (``unet``, ``vae_decoder``): the recompile counter.
    graphs: dict[str, int] = field(default_factory=dict)
    #: ``"<batch>x<height>x<width>"`` -> seconds of the first generation at that shape (compile included).
    warmups: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles of a pipeline carry the record, not the lock (``copy.deepcopy(pipe)`` works)."""
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {"compile": self.compile, "backend": self.backend, "channels_last": self.channels_last,
                    "tf32": self.tf32, "attention": self.attention, "graphs": dict(self.graphs),
                    "warmups": [{"shape": k, "seconds": round(v, 3)} for k, v in self.warmups.items()],
                    "vae_upcast": "on overflow"}

    def count(self, name: str) -> None:
        with self._lock:
            self.graphs[name] = self.graphs.get(name, 0) + 1

    @contextmanager
    def first_use(self, batch: int, height: int, width: int, device: torch.device) -> Iterator[None]:
        """Time the block if it is the first generation at this shape with compiled modules."""
        key = f"{batch}x{height}x{width}"
        if not self.compile or key in self.warmups:
            yield
            return
        started = time.monotonic()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        with self._lock:
            self.warmups.setdefault(key, time.monotonic() - started)


def _counting(speed: Speed, name: str, backend: str | Callable) -> Callable:
    """A dynamo backend that counts the graphs it is asked to compile, then hands them to ``backend``."""
    def compile_graph(gm: Any, example_inputs: Any) -> Any:
        speed.count(name)
        inner = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend
        return inner(gm, example_inputs)

    return compile_graph


def _attention(unet: Any) -> str:
    processors = getattr(unet, "attn_processors", None) or {}
    names = sorted({type(p).__name__ for p in processors.values()})
    return ", ".join(names) if names else "default"


def apply_speed(pipe: Any, device: torch.device, *, compile: bool = False,
                backend: str | Callable = "inductor") -> Speed:
    """Switch on the fast path for ``pipe`` on ``device`` and return what was done (kept on the pipe as
    ``pipe.sdrepl_speed``, where ``core.denoise`` finds it). Off CUDA only ``compile`` applies: the CPU
    keeps its layout so its pictures stay bit-identical to before."""
    speed = Speed(compile=bool(compile), backend=(backend if isinstance(backend, str) else getattr(
        backend, "__name__", "custom")) if compile else None)
    unet, vae = pipe.unet, pipe.vae
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) >= (8, 0):
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            speed.tf32 = True
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
        speed.channels_last = True
    speed.attention = _attention(unet)
    if compile:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, SHAPES_KEPT)
        # LoRAs and hypernetworks are forward hooks (``core.networks.apply``); dynamo's default skips the
        # guards on module hooks, so a hook attached after compiling would be silently ignored. With the
        # guards, each set of hooked modules compiles once and the untouched model's graph is kept.
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        unet.compile(backend=_counting(speed, "unet", backend), dynamic=False)
        vae.decoder.compile(backend=_counting(speed, "vae_decoder", backend), dynamic=False)
    pipe.sdrepl_speed = speed
    return speed


def speed_of(pipe: Any) -> Speed | None:
    return getattr(pipe, "sdrepl_speed", None)
