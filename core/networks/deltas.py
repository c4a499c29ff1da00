"""Each algorithm's formula: a group's tensors -> one term that adds to a module's output.

A term is either **low-rank** (``up(down(x))``, with LoCon's ``mid`` between, for linear and conv
layers: the factors are never multiplied out, so a rank-r term costs r/in of the layer) or **dense** (a
full weight delta ``dW`` and optional bias delta: LoHa, LoKr, full, IA3 and DoRA, whose delta only exists
as a whole matrix). Either way the module's output becomes ``base(x) + term(x) * scale * multiplier``,
which equals running the module with weight ``W + scale * multiplier * dW``: the merged-weight formulas
of the spec, applied without changing ``W``.

- LoRA / LoCon: ``dW = up @ (mid *) down``; scale ``alpha / rank`` (no alpha: 1).
- LoHa: ``dW = (w1_a @ w1_b) * (w2_a @ w2_b)`` (CP: each factor rebuilt from ``t``); scale alpha / rank.
- LoKr: ``dW = kron(w1, w2)``, each side full or ``a @ b`` (or CP); scale alpha / rank when a side is
  decomposed, else 1.
- full: ``dW = diff`` (+ ``diff_b``); IA3: ``dW = W * w`` along the output (or input, ``on_input``) axis.
- DoRA (``dora_scale`` / PEFT's ``lora_magnitude_vector``): ``W' = W + scale * dW``, then each output row
  (scale of shape [out]) or input column (shape [1, in]) of ``W'`` is rescaled to the stored magnitude;
  the term is ``W'_dora - W``, so the multiplier blends between the model and the DoRA result, as in
  ComfyUI.

Tensors with NaN or infinite values are refused here, naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sdrepl.core.errors import NetworkError
from sdrepl.core.networks.layouts import Group


@dataclass
class HostDelta:
    """One group's factors on the host, cached between uses (see :class:`sdrepl.core.networks.library`)."""

    algo: str
    tensors: dict[str, torch.Tensor]
    scale: float

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def group_scale(group: Group, tensors: dict[str, torch.Tensor]) -> float:
    if group.fixed_scale is not None:
        return group.fixed_scale
    alpha = group.alpha
    if "alpha" in group.keys:
        alpha = float(tensors[group.keys["alpha"]].float().reshape(-1)[0])
    if alpha is None or not group.rank:
        return 1.0
    if group.algo == "lokr" and not ({"k1a", "k2a"} & set(group.keys)):
        return 1.0
    return alpha / group.rank


def _finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite. numpy for the common dtypes: one pass on one thread, where torch's two
    ops per tensor wake the whole thread pool, which costs seconds over hundreds of tensors on a busy CPU."""
    if tensor.dtype in (torch.float32, torch.float16, torch.float64) and tensor.device.type == "cpu":
        return bool(np.isfinite(tensor.detach().numpy()).all())
    return bool(torch.isfinite(tensor).all())


def host_delta(path: object, group: Group, tensors: dict[str, torch.Tensor]) -> HostDelta:
    """The group's tensors by role, checked finite; the file's dtype is kept (cast at use)."""
    roles: dict[str, torch.Tensor] = {}
    for role, key in group.keys.items():
        if role == "alpha":
            continue
        tensor = tensors[key]
        if tensor.is_floating_point() and not _finite(tensor):
            raise NetworkError(path, f"tensor {key!r} holds NaN or infinite values: the file is broken (a training "
                                     "run that diverged); it was not applied")
        roles[role] = tensor
    return HostDelta(group.algo, roles, group_scale(group, tensors))


def _cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS' CP (Tucker) rebuild: ``t`` [r, r, kh, kw], ``wa`` [r, out], ``wb`` [r, in] -> [out, in, kh, kw]."""
    return torch.einsum("i j k l, j r, i p -> p r k l", t, wb, wa)


def dense_delta(delta: HostDelta, weight: torch.Tensor) -> torch.Tensor:
    """The full ``dW`` (float32, ``weight``'s shape) of a LoHa, LoKr, full or IA3 group, before scaling."""
    t = {k: v.float() for k, v in delta.tensors.items()}
    shape = weight.shape
    if delta.algo == "loha":
        if "t1" in t:
            left, right = _cp(t["t1"], t["w1a"], t["w1b"]), _cp(t["t2"], t["w2a"], t["w2b"])
        else:
            left, right = t["w1a"] @ t["w1b"], t["w2a"] @ t["w2b"]
        return (left * right).reshape(shape)
    if delta.algo == "lokr":
        w1 = t["k1"] if "k1" in t else t["k1a"] @ t["k1b"]
        if "k2" in t:
            w2 = t["k2"]
        elif "kt2" in t:
            w2 = _cp(t["kt2"], t["k2a"], t["k2b"])
        else:
            w2 = t["k2a"] @ t["k2b"]
        if w2.dim() == 4:
            w1 = w1.reshape(*w1.shape, 1, 1)
        return torch.kron(w1, w2).reshape(shape)
    if delta.algo == "full":
        return t["diff"].reshape(shape)
    if delta.algo == "ia3":
        w = t["ia3"].reshape(-1)
        on_input = bool(delta.tensors["on_input"].reshape(-1)[0]) if "on_input" in delta.tensors else False
        axis = [1] * len(shape)
        axis[1 if on_input else 0] = -1
        return weight.float() * w.reshape(axis)
    if delta.algo == "lora":
        down, up = t["down"], t["up"]
        if "mid" in t:
            return _cp(t["mid"], up.reshape(up.shape[0], -1).T, down.reshape(down.shape[0], -1)).reshape(shape)
        return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape)
    raise ValueError(f"unknown algorithm {delta.algo}")


def dora_delta(delta: HostDelta, weight: torch.Tensor) -> torch.Tensor:
    """``W'_dora - W`` (float32), the DoRA term before the multiplier (see module docstring)."""
    w0 = weight.float()
    merged = w0 + dense_delta(delta, weight) * delta.scale
    m = delta.tensors["dora"].float()
    out = w0.shape[0]
    if m.numel() == out and not (m.dim() >= 2 and m.shape[0] == 1 and out != 1):
        norm = merged.reshape(out, -1).norm(dim=1).reshape(out, *[1] * (w0.dim() - 1))
        scaled = merged * (m.reshape(out, *[1] * (w0.dim() - 1)) / norm)
    else:
        cols = merged.shape[1]
        norm = merged.transpose(0, 1).reshape(cols, -1).norm(dim=1).reshape(1, cols, *[1] * (w0.dim() - 2))
        scaled = merged * (m.reshape(1, cols, *[1] * (w0.dim() - 2)) / norm)
    return scaled - w0


class Term:
    """One network's contribution to one module: ``forward(x) * scale * multiplier`` is added to its output."""

    def __init__(self, module: torch.nn.Module, delta: HostDelta) -> None:
        weight = module.weight
        device, dtype = weight.device, weight.dtype
        self.conv = isinstance(module, torch.nn.Conv2d)
        self.module_args = ((module.stride, module.padding, module.dilation, module.groups) if self.conv else ())
        #: ``scale * multiplier`` as a 0-dim tensor on the module's device, changed in place: a compiled UNet
        #: (``--compile``) reads it as an input, where a Python float is a constant it guards on and
        #: recompiles for at every new weight (``<lora:x:0.5>`` then ``<lora:x:0.7>``).
        self.factor_tensor = torch.zeros((), device=device, dtype=torch.float32)
        self._multiplier = 1.0
        self.bias: torch.Tensor | None = None
        self.dense: torch.Tensor | None = None
        if "dora" in delta.tensors:
            self.scale = 1.0
            with torch.no_grad():
                self.dense = dora_delta(delta, weight).to(device, dtype)
        elif delta.algo == "lora":
            self.scale = delta.scale
            t = delta.tensors
            down, up, mid = t["down"], t["up"], t.get("mid")
            if self.conv:
                down = down.reshape(*down.shape[:2], *(down.shape[2:] or (1, 1)))
                up = up.reshape(*up.shape[:2], 1, 1)
            else:
                down, up = down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)
            self.down, self.up = down.to(device, dtype), up.to(device, dtype)
            self.mid = mid.to(device, dtype) if mid is not None else None
        else:
            self.scale = delta.scale
            with torch.no_grad():
                self.dense = dense_delta(delta, weight).to(device, dtype)
            if "diff_b" in delta.tensors:
                self.bias = delta.tensors["diff_b"].reshape(-1).to(device, dtype)
        self.multiplier = 1.0

    @property
    def multiplier(self) -> float:
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        self._multiplier = float(value)
        self.factor_tensor.fill_(self.factor)
        #: Whether the term adds anything (a weight of 0 skips its work). A stored bool: the compiled
        #: hook guards on it (two values) instead of on the float it comes from.
        self.active = self.factor != 0.0

    @property
    def factor(self) -> float:
        return self.scale * self._multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            if self.conv:
                return F.conv2d(x, self.dense, self.bias, *self.module_args)
            return F.linear(x, self.dense, self.bias)
        if not self.conv:
            return F.linear(F.linear(x, self.down), self.up)
        stride, padding, dilation, _ = self.module_args
        if self.mid is not None:
            h = F.conv2d(F.conv2d(x, self.down), self.mid, None, stride, padding, dilation)
        else:
            h = F.conv2d(x, self.down, None, stride, padding, dilation)
        return F.conv2d(h, self.up)


__all__ = ["HostDelta", "Term", "dense_delta", "dora_delta", "host_delta"]
