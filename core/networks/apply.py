"""Applying a set of LoRAs to a loaded model without ever changing its weights.

Mechanism (chosen by measurement, see ``docs/benchmarks.md``): each affected ``Linear`` / ``Conv2d`` gets
one forward hook holding a list of :class:`~sdrepl.core.networks.deltas.Term`; the hook adds
``term(x) * scale * multiplier`` to the module's output. So:

- **Reversal is exact by construction**: the resident weights are never written; when the last term of a
  module goes, its hook is removed and the module is the untouched original again (bit for bit).
- **Reuse costs nothing** (the same set: no work), a **weight change** is a float per term (written into a
  0-dim tensor, so a compiled UNet does not recompile for it), a **switch**
  removes the old terms and attaches the new ones; only a LoRA's first use reads and converts tensors.
- **Gradients stay right**: terms hold plain tensors (no ``requires_grad``), and the hook is ordinary
  autograd, so training a textual-inversion embedding with LoRAs active trains only the embedding, with
  the LoRA's effect in the chain rule.
- It works on modules, not on a pipeline object, so any denoising loop that calls the UNet sees it.

A set is built completely before anything is attached, so a broken file (NaN, a vanished file) leaves
the previous set in place.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sdrepl.core.networks.deltas import HostDelta, Term
from sdrepl.core.networks.modules import UNET, resolve_module


@dataclass(frozen=True)
class Wanted:
    """One LoRA of a set: its identity (path and version), name, multipliers, and its host deltas."""

    key: str
    name: str
    te: float
    unet: float
    #: ``() -> {(component, path): HostDelta}``, called only on first use (reads the file).
    deltas: Callable[[], dict[tuple[str, str], HostDelta]] = field(compare=False)


class _Hooked:
    """One module's hook and the terms it adds."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.terms: list[Term] = []
        terms = self.terms

        def hook(_module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            for term in terms:
                if term.active:
                    output = output + term.forward(x) * term.factor_tensor
            return output

        self.handle = module.register_forward_hook(hook)


class Patcher:
    """The networks active on one pipeline (use :func:`patcher_for`)."""

    def __init__(self, pipe: Any) -> None:
        self._pipe = weakref.ref(pipe)
        self._hooked: dict[int, _Hooked] = {}
        #: key -> (name, te, unet, [(component, module id, term)])
        self._active: dict[str, tuple[str, float, float, list[tuple[str, int, Term]]]] = {}
        self._lock = threading.Lock()

    @property
    def active(self) -> list[dict[str, Any]]:
        """``[{"name", "te", "unet"}]`` of the set now applied, in the order it was asked for."""
        return [{"name": name, "te": te, "unet": unet} for name, te, unet, _ in self._active.values()]

    def activate(self, wanted: Sequence[Wanted]) -> None:
        """Make exactly ``wanted`` active (see module docstring); raises before changing anything."""
        with self._lock:
            pipe = self._pipe()
            if pipe is None:
                return
            keys = [w.key for w in wanted]
            built: dict[str, list[tuple[str, int, Term, torch.nn.Module]]] = {}
            for w in wanted:
                if w.key in self._active or w.key in built:
                    continue
                entries = []
                for (component, path), delta in w.deltas().items():
                    module = resolve_module(pipe, component, path)
                    entries.append((component, id(module), Term(module, delta), module))
                built[w.key] = entries
            for key in [k for k in self._active if k not in keys]:
                self._detach(key)
            for key, entries in built.items():
                attached = []
                for component, mid, term, module in entries:
                    hooked = self._hooked.get(mid)
                    if hooked is None:
                        hooked = self._hooked[mid] = _Hooked(module)
                    hooked.terms.append(term)
                    attached.append((component, mid, term))
                w = next(x for x in wanted if x.key == key)
                self._active[key] = (w.name, w.te, w.unet, attached)
            ordered = {}
            for w in wanted:
                _, _, _, attached = self._active[w.key]
                for component, _, term in attached:
                    term.multiplier = w.unet if component == UNET else w.te
                ordered[w.key] = (w.name, w.te, w.unet, attached)
            self._active = ordered

    def clear(self) -> None:
        self.activate([])

    def _detach(self, key: str) -> None:
        _, _, _, attached = self._active.pop(key)
        for _, mid, term in attached:
            hooked = self._hooked.get(mid)
            if hooked is None:
                continue
            hooked.terms.remove(term)
            if not hooked.terms:
                hooked.handle.remove()
                del self._hooked[mid]

    @property
    def hooked_modules(self) -> int:
        return len(self._hooked)


_PATCHERS: weakref.WeakKeyDictionary[Any, Patcher] = weakref.WeakKeyDictionary()
_PATCHERS_LOCK = threading.Lock()


def patcher_for(pipe: Any) -> Patcher:
    """The one :class:`Patcher` of ``pipe`` (keyed by its UNet, so it lives exactly as long as the model)."""
    with _PATCHERS_LOCK:
        found = _PATCHERS.get(pipe.unet)
        if found is None:
            found = _PATCHERS[pipe.unet] = Patcher(pipe)
        return found
