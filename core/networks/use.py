"""One prompt's extra networks: from the raw text to the active set on the model and the picture's metadata.

:func:`plan_networks` runs where a prompt enters (validation on the daemon's loop, before any queueing):
it cuts the tags out (:mod:`sdrepl.core.extra_networks`), refuses tags in the negative prompt and unknown
names, and records which file version each name meant, so the picture's ``Lora hashes`` name exactly the
files applied even if the watcher swaps one a moment later. :func:`activate` runs on the device thread
just before conditioning; a plan with no LoRA restores the untouched model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sdrepl.core.extra_networks import check_negative, resolve_tags, split_networks
from sdrepl.core.networks.apply import patcher_for
from sdrepl.core.networks.hypernetwork import hypernet_patcher_for
from sdrepl.core.networks.library import Network, NetworkLibrary


@dataclass
class NetworkPlan:
    """The prompt text without tags, and the networks it asked for (file versions fixed at planning)."""

    text: str
    loras: list[tuple[Network, float, float]] = field(default_factory=list)
    hypernets: list[tuple[Network, float]] = field(default_factory=list)
    library: NetworkLibrary | None = None
    names: dict[str, str] = field(default_factory=dict)  # network key -> the name that reached it

    def describe(self) -> list[dict[str, Any]]:
        """``[{"name", "te", "unet"}]`` for a generation result."""
        return [{"name": self.names[n.key], "te": te, "unet": unet} for n, te, unet in self.loras]

    def parameters(self) -> dict[str, str]:
        """A1111's PNG fields: ``Lora hashes`` and the hypernetwork's name, hash and strength."""
        out: dict[str, str] = {}
        if self.loras:
            out["Lora hashes"] = ", ".join(f"{self.names[n.key]}: {n.info.short_hash}" for n, _, _ in self.loras)
        if self.hypernets:
            net, strength = self.hypernets[0]
            out["Hypernet"] = self.names[net.key]
            out["Hypernet hash"] = net.info.hash[:10]
            out["Hypernet strength"] = f"{strength:g}"
        return out


def plan_networks(prompt: str, negative: str, loras: NetworkLibrary | None,
                  hypernets: NetworkLibrary | None = None) -> NetworkPlan:
    """Cut and resolve the tags of ``prompt`` (see module docstring); raises PromptError."""
    check_negative(negative or "")
    text, tags = split_networks(prompt)
    plan = NetworkPlan(text, library=loras)
    if not tags:
        return plan
    if any(t.kind == "lora" for t in tags):
        if loras is None:
            from sdrepl.core.errors import PromptError

            raise PromptError("this prompt uses <lora:...> tags but no LoRA folder is configured (--loras DIR)")
        plan.loras = resolve_tags(tags, "lora", loras.get, loras.suggest, "!loras")
        plan.names.update({n.key: loras.reach_name(n) for n, _, _ in plan.loras})
    if any(t.kind == "hypernet" for t in tags):
        if hypernets is None:
            from sdrepl.core.errors import PromptError

            raise PromptError("this prompt uses <hypernet:...> but no hypernetwork folder is configured")
        found = resolve_tags(tags, "hypernet", hypernets.get, hypernets.suggest, "!hypernetworks")
        plan.hypernets = [(net, te) for net, te, _ in found]
        plan.names.update({n.key: hypernets.reach_name(n) for n, _ in plan.hypernets})
    return plan


def activate(pipe: Any, plan: NetworkPlan | None) -> None:
    """Make the model carry exactly ``plan``'s networks (none: the untouched model). Device thread."""
    from sdrepl.core.networks import wanted

    loras = plan.loras if plan is not None else []
    lib = plan.library if plan is not None else None
    sets = [wanted(lib, net, te, unet) for net, te, unet in loras] if lib is not None else []
    patcher_for(pipe).activate(sets)
    hypers = plan.hypernets if plan is not None else []
    hypernet_patcher_for(pipe).activate([(n.info, w) for n, w in hypers],
                                        [plan.names[n.key] for n, _ in hypers] if plan is not None else [])
