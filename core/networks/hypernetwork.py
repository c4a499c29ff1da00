"""A1111 hypernetworks (spec section 3): small MLPs on the attention context before the k and v projections.

A file is a ``.pt`` dict: integer keys (the context width: 768 / 1024 for cross-attention, 320 / 640 /
1280 for self-attention) each holding two module state dicts (k, v) of ``linear.N.weight`` / ``.bias``,
plus ``layer_structure``, ``activation_func``, ``is_layer_norm``, ``activate_output``, ``use_dropout``,
``name``. The network is rebuilt from the state dicts themselves (2-D weights are linears, 1-D weights
layer norms, in index order; dropout has no weights and does nothing at inference), with A1111's
activation placement: after every linear but the last unless ``activate_output``. Applied as forward
pre-hooks on every attention's ``to_k`` / ``to_v`` whose input width has a network:
``context + hn(context) * strength``, exactly A1111's ``x + linear(x) * multiplier``; removing the hooks
restores the model bit for bit.
"""

from __future__ import annotations

import re
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sdrepl.core.errors import NetworkError
from sdrepl.core.networks.container import read_header

#: A1111's activation names (``swish`` is Hardswish there).
ACTIVATIONS = {"linear": None, "relu": torch.nn.ReLU, "leakyrelu": torch.nn.LeakyReLU, "elu": torch.nn.ELU,
               "swish": torch.nn.Hardswish, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid,
               "softsign": torch.nn.Softsign, "mish": torch.nn.Mish, "gelu": torch.nn.GELU, "silu": torch.nn.SiLU}
_KEY = re.compile(r"^linear\.(\d+)\.(weight|bias)$")


@dataclass
class HyperMLP:
    """One of the k/v networks: layers in order, each ("linear"|"norm", weight, bias) or ("act", module)."""

    layers: list[tuple[str, Any, Any]]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for kind, a, b in self.layers:
            if kind == "linear":
                x = F.linear(x, a.to(x.device, x.dtype), b.to(x.device, x.dtype) if b is not None else None)
            elif kind == "norm":
                x = F.layer_norm(x, (a.shape[0],), a.to(x.device, x.dtype), b.to(x.device, x.dtype))
            else:
                x = a(x)
        return x


@dataclass
class HypernetInfo:
    path: Path
    name: str
    widths: dict[int, tuple[HyperMLP, HyperMLP]]
    layer_structure: list[float] = field(default_factory=list)
    activation: str = "linear"
    step: int | None = None
    checkpoint: str | None = None
    warnings: tuple[str, ...] = ()
    hash: str = ""

    @property
    def short_hash(self) -> str:
        return self.hash[:12]


def _mlp(path: Path, state: Any, activation: str, activate_output: bool) -> HyperMLP:
    if not isinstance(state, dict):
        raise NetworkError(path, f"a hypernetwork module is a {type(state).__name__}, expected a state dict")
    by_index: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = _KEY.match(str(key))
        if m is None or not isinstance(value, torch.Tensor):
            raise NetworkError(path, f"unexpected hypernetwork key {str(key)[:60]!r}")
        if not bool(torch.isfinite(value.float()).all()):
            raise NetworkError(path, f"hypernetwork tensor {key!r} holds NaN or infinite values")
        by_index.setdefault(int(m.group(1)), {})[m.group(2)] = value.float()
    linears = [i for i in sorted(by_index) if by_index[i]["weight"].dim() == 2]
    if not linears:
        raise NetworkError(path, "a hypernetwork module has no linear layers")
    act_cls = ACTIVATIONS.get(activation)
    layers: list[tuple[str, Any, Any]] = []
    for i in sorted(by_index):
        w, b = by_index[i].get("weight"), by_index[i].get("bias")
        if w is None:
            raise NetworkError(path, f"hypernetwork layer {i} has no weight")
        if w.dim() == 2:
            layers.append(("linear", w, b))
            last = i == linears[-1]
            if act_cls is not None and (not last or activate_output):
                layers.append(("act", act_cls(), None))
        else:
            layers.append(("norm", w, b))
    return HyperMLP(layers)


def read_hypernetwork(path: Path) -> HypernetInfo:
    """Read and check an A1111 hypernetwork file (safe pickle or safetensors-free ``.pt``)."""
    header = read_header(Path(path))
    obj = {**(header.tensors or {}), **header.extra}
    activation = str(obj.get("activation_func") or "linear").lower()
    if activation not in ACTIVATIONS:
        raise NetworkError(path, f"unknown hypernetwork activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
    activate_output = bool(obj.get("activate_output", False))
    widths: dict[int, tuple[HyperMLP, HyperMLP]] = {}
    for key, value in obj.items():
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
            if not (isinstance(value, (list, tuple)) and len(value) == 2):
                raise NetworkError(path, f"hypernetwork entry {key} must hold two modules (k, v)")
            widths[int(key)] = (_mlp(path, value[0], activation, activate_output),
                                _mlp(path, value[1], activation, activate_output))
    if not widths:
        raise NetworkError(path, "not a hypernetwork: no integer context-width keys (768, 1024, 320, ...)")
    for width, (k, _) in widths.items():
        first = next(a for kind, a, _ in k.layers if kind == "linear")
        if first.shape[1] != width:
            raise NetworkError(path, f"hypernetwork entry {width} takes {first.shape[1]}-wide input")
    structure = obj.get("layer_structure")
    import hashlib

    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return HypernetInfo(Path(path), str(obj.get("name") or Path(path).stem)[:120], widths,
                        list(structure) if isinstance(structure, (list, tuple)) else [], activation,
                        obj.get("step") if isinstance(obj.get("step"), int) else None,
                        str(obj.get("sd_checkpoint_name") or obj.get("sd_checkpoint") or "")[:120] or None,
                        hash=digest)


class HypernetPatcher:
    """The hypernetworks active on one pipeline's UNet (pre-hooks on attention k/v projections)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self._unet = weakref.ref(unet)
        self._handles: list[Any] = []
        self._active: list[tuple[str, float]] = []
        self._nets: list[tuple[HypernetInfo, float]] = []
        self._lock = threading.Lock()

    @property
    def active(self) -> list[tuple[str, float]]:
        return list(self._active)

    def activate(self, nets: list[tuple[HypernetInfo, float]], names: list[str]) -> None:
        with self._lock:
            key = [(str(n.path), n.hash, w) for n, w in nets]
            if key == [(str(n.path), n.hash, w) for n, w in self._nets]:
                return
            for handle in self._handles:
                handle.remove()
            self._handles, self._nets, self._active = [], list(nets), list(zip(names, [w for _, w in nets], strict=True))
            unet = self._unet()
            if unet is None or not nets:
                return
            for name, mod in unet.named_modules():
                if not name.endswith((".to_k", ".to_v")) or not isinstance(mod, torch.nn.Linear):
                    continue
                which = 0 if name.endswith(".to_k") else 1
                chain = [(n.widths[mod.in_features][which], w) for n, w in nets if mod.in_features in n.widths]
                if not chain:
                    continue

                def pre(_m: torch.nn.Module, args: tuple, chain: list = chain) -> tuple:
                    x = args[0]
                    for mlp, strength in chain:
                        if strength:
                            x = x + mlp(x) * strength
                    return (x, *args[1:])

                self._handles.append(mod.register_forward_pre_hook(pre))


_PATCHERS: weakref.WeakKeyDictionary[Any, HypernetPatcher] = weakref.WeakKeyDictionary()


def hypernet_patcher_for(pipe: Any) -> HypernetPatcher:
    found = _PATCHERS.get(pipe.unet)
    if found is None:
        found = _PATCHERS[pipe.unet] = HypernetPatcher(pipe.unet)
    return found
