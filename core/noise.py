"""All the noise one generation needs, drawn on the CPU before the first step and fed from the device.

Why: a seed must give the same picture on every device (A1111's "CPU" RNG source), so the noise comes
from CPU generators seeded per picture (picture ``i`` of a batch uses ``seeds[i]``). Drawing it step by
step, as diffusers' schedulers do, costs a host draw and a pageable copy per step; here a *probe* runs a
copy of the scheduler on the CPU over the whole schedule (with zero model outputs: the noise a scheduler
asks for depends on its schedule, never on the values), answering every request from the real
generators in the order the scheduler consumes them. The result goes to the device in one pinned,
non-blocking copy, and during the real run each request is answered with the next prepared tensor.

Two kinds of requests exist in diffusers' schedulers:

- ``randn_tensor(shape, ...)`` calls inside ``step`` (Euler a, DPM2 a, DPM++ 2M SDE, DDIM with eta): the
  module's ``randn_tensor`` is wrapped once (transparent unless this thread is replaying a plan).
- DPM++ SDE's Brownian tree (``scheduler.noise_sampler``): built on the CPU from the picture seeds (one
  tree per picture, as A1111 does), queried at the probe's points; the real run gets a replaying sampler.

Pictures are unchanged on the CPU: the same generators make the same draws in the same order.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

_LOCAL = threading.local()
_WRAPPED: set[str] = set()
_WRAP_LOCK = threading.Lock()


class NoisePlanError(RuntimeError):
    """The real run asked for noise the probe did not foresee (a scheduler with value-dependent draws)."""


def _wrap_randn(module_name: str) -> None:
    """Make ``module.randn_tensor`` answer from this thread's active plan (else call through)."""
    module = sys.modules.get(module_name)
    if module is None or not hasattr(module, "randn_tensor"):
        return
    with _WRAP_LOCK:
        if module_name in _WRAPPED:
            return
        original = module.randn_tensor

        def randn_tensor(shape: Any, generator: Any = None, device: Any = None, dtype: Any = None,
                         layout: Any = None, **kwargs: Any) -> torch.Tensor:
            source = getattr(_LOCAL, "source", None)
            if source is None:
                return original(shape, generator=generator, device=device, dtype=dtype, layout=layout, **kwargs)
            return source(tuple(shape), dtype)

        module.randn_tensor = randn_tensor
        _WRAPPED.add(module_name)


@contextmanager
def _answering(source: Any) -> Iterator[None]:
    previous = getattr(_LOCAL, "source", None)
    _LOCAL.source = source
    try:
        yield
    finally:
        _LOCAL.source = previous


def _draw(generators: Sequence[torch.Generator], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """What ``randn_tensor`` draws for a batch from one CPU generator per picture (batch 1: the same)."""
    if len(generators) == 1:
        return torch.randn(shape, generator=generators[0], dtype=dtype)
    one = (1, *shape[1:])
    return torch.cat([torch.randn(one, generator=g, dtype=dtype) for g in generators])


class _Replay:
    """Hands out prepared tensors in order, checking each request is the one foreseen."""

    def __init__(self, tensors: list[torch.Tensor], kind: str) -> None:
        self._tensors = tensors
        self._next = 0
        self._kind = kind

    def take(self, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self._next >= len(self._tensors):
            raise NoisePlanError(f"the scheduler asked for more {self._kind} noise than its probe did "
                                 f"({len(self._tensors)} draws planned)")
        tensor = self._tensors[self._next]
        if (shape is not None and tuple(tensor.shape) != shape) or (dtype is not None and tensor.dtype != dtype):
            raise NoisePlanError(f"{self._kind} noise request {self._next + 1} is {shape} {dtype}, the probe "
                                 f"foresaw {tuple(tensor.shape)} {tensor.dtype}")
        self._next += 1
        return tensor

    @property
    def left(self) -> int:
        return len(self._tensors) - self._next


class _ReplaySampler:
    """Stands in for DPM++ SDE's ``BrownianTreeNoiseSampler`` during the real run."""

    def __init__(self, replay: _Replay) -> None:
        self._replay = replay

    def __call__(self, sigma: Any, sigma_next: Any) -> torch.Tensor:
        return self._replay.take()


class _RecordingSampler:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.outputs: list[torch.Tensor] = []

    def __call__(self, sigma: Any, sigma_next: Any) -> torch.Tensor:
        out = self.inner(sigma, sigma_next)
        self.outputs.append(out)
        return out


def _uses_brownian_tree(scheduler: Any) -> bool:
    return hasattr(scheduler, "noise_sampler") and "noise_sampler_seed" in scheduler.config


def _brownian_sampler(scheduler: Any, like: torch.Tensor, seeds: Sequence[int]) -> Any:
    """The tree diffusers would build, on the CPU, one per picture seeded with the picture's seed."""
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    sigmas = scheduler.sigmas
    min_sigma, max_sigma = sigmas[sigmas > 0].min(), sigmas.max()
    seed: int | list[int] = seeds[0] if len(seeds) == 1 else list(seeds)
    return BrownianTreeNoiseSampler(like, min_sigma.item(), max_sigma.item(), seed)


@dataclass
class NoisePlan:
    """A run's noise on its device: the initial latents' noise and every step's, in consumption order."""

    latents: torch.Tensor
    step_noise: list[torch.Tensor] = field(default_factory=list)
    tree_noise: list[torch.Tensor] = field(default_factory=list)

    @contextmanager
    def feeding(self, scheduler: Any) -> Iterator[None]:
        """Answer ``scheduler``'s noise requests from this plan for the duration of the block."""
        _wrap_randn(type(scheduler).__module__)
        steps = _Replay(self.step_noise, "step")
        if _uses_brownian_tree(scheduler):
            scheduler.noise_sampler = _ReplaySampler(_Replay(self.tree_noise, "Brownian tree"))
        with _answering(lambda shape, dtype: steps.take(shape, dtype)):
            yield


def _pinned(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """``tensors`` on ``device``: one pinned buffer and one non-blocking copy per dtype."""
    if device.type == "cpu" or not tensors:
        return tensors
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for dtype in {t.dtype for t in tensors}:
        indices = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        flat = torch.cat([tensors[i].reshape(-1) for i in indices])
        if device.type == "cuda":
            flat = flat.pin_memory()
        on_device = flat.to(device, non_blocking=True)
        offset = 0
        for i in indices:
            size = tensors[i].numel()
            out[i] = on_device[offset:offset + size].view(tensors[i].shape)
            offset += size
    return out  # type: ignore[return-value]


def plan_noise(scheduler: Any, *, steps: int, shape: tuple[int, ...], dtype: torch.dtype, seeds: Sequence[int],
               device: torch.device, begin_index: int | None = None) -> NoisePlan:
    """Draw on the CPU, in the order ``scheduler`` will ask for them, all the noise of a run of ``steps``
    steps on latents of ``shape`` (batch = ``len(seeds)``), and put it on ``device`` in one copy.

    ``scheduler`` itself is not touched: the probe runs a fresh copy with the same config.
    """
    if shape[0] != len(seeds):
        raise ValueError(f"batch of {shape[0]} latents for {len(seeds)} seeds")
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    latents = _draw(generators, shape, dtype)

    probe = type(scheduler).from_config(scheduler.config)
    probe.set_timesteps(steps, device="cpu")
    timesteps = probe.timesteps
    if begin_index:
        timesteps = timesteps[begin_index:]
        if hasattr(probe, "set_begin_index"):
            probe.set_begin_index(begin_index)
    sample = torch.zeros(shape, dtype=dtype)
    recorder = None
    if _uses_brownian_tree(probe):
        recorder = _RecordingSampler(_brownian_sampler(probe, sample, seeds))
        probe.noise_sampler = recorder
    drawn: list[torch.Tensor] = []

    def answer(request_shape: tuple[int, ...], request_dtype: torch.dtype | None) -> torch.Tensor:
        noise = _draw(generators, request_shape, request_dtype or torch.float32)
        drawn.append(noise)
        return noise

    _wrap_randn(type(probe).__module__)
    zeros = torch.zeros(shape, dtype=dtype)
    with _answering(answer):
        for t in timesteps:
            model_input = probe.scale_model_input(sample, t) if hasattr(probe, "scale_model_input") else sample
            del model_input
            sample = probe.step(zeros, t, sample, return_dict=False)[0]
    tree = recorder.outputs if recorder is not None else []
    moved = _pinned([latents, *drawn, *tree], device)
    return NoisePlan(moved[0], moved[1:1 + len(drawn)], moved[1 + len(drawn):])
