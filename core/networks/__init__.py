"""LoRA, LyCORIS and hypernetworks (spec ``extra-networks.md``): files -> canonical deltas -> a model.

Modules, one job each: ``container`` (opening files safely, header first), ``modules`` (the model's
patchable modules by canonical name, kohya/LDM aliases), ``layouts`` (key layouts -> groups),
``matching`` (base model, groups -> modules), ``deltas`` (each algorithm's formula), ``index`` (one file
indexed), ``library`` (folders, names, collisions, skipped, delta cache), ``apply`` (reversible hooks),
``hypernetwork`` (A1111 hypernetworks).
"""

from __future__ import annotations

from pathlib import Path

from sdrepl.core.networks.apply import Patcher, Wanted, patcher_for
from sdrepl.core.networks.index import LoraInfo, describe_lora, index_lora
from sdrepl.core.networks.library import Network, NetworkLibrary
from sdrepl.core.networks.modules import ModelSignature, signature_of

__all__ = ["LoraInfo", "ModelSignature", "Network", "NetworkLibrary", "Patcher", "Wanted", "describe_lora",
           "index_lora", "lora_library", "patcher_for", "signature_of", "wanted"]


def lora_library(folders: list[Path], signature: ModelSignature | None, **kwargs) -> NetworkLibrary:
    """The LoRA library over ``folders`` for a model with ``signature``."""

    def indexer(path: Path, sig: ModelSignature | None) -> LoraInfo:
        from sdrepl.core.errors import NetworkError

        if sig is None:
            raise NetworkError(path, "no model is loaded to match it against")
        return index_lora(path, sig)

    return NetworkLibrary(folders, signature, indexer, kind="LoRA", **kwargs)


def wanted(library: NetworkLibrary, net: Network, te: float, unet: float) -> Wanted:
    """A :class:`Wanted` for ``net`` whose deltas come from ``library``'s bounded cache."""
    return Wanted(net.key, library.reach_name(net), te, unet, lambda: library.deltas(net))
