"""LoRA and hypernetwork folders in the daemon: libraries, live reload, events and the requests about them.

Start-up (:func:`start_networks`) builds the LoRA and hypernetwork libraries against the model's
signature and watches their folders with a second and third :class:`~sdrepl.daemon.watcher.FolderWatcher`
(the same debounce rules and latency as embeddings). Every change is broadcast as a ``loras`` /
``hypernetworks`` event, and the embeddings bundled in LoRA files are handed to the embedding library,
whose own ``embeddings`` event then announces them.

Requests: ``loras``, ``hypernetworks`` (lists with skipped files), ``show_lora`` (one file in detail).
A generation's networks are planned by :func:`plan_for` on the loop (unknown names, negative-prompt tags)
and applied on the device thread by ``core.generation.run_generation``.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from sdrepl.core.errors import NetworkError, PromptError
from sdrepl.core.networks import describe_lora, lora_library, signature_of
from sdrepl.core.networks.hypernetwork import read_hypernetwork
from sdrepl.core.networks.library import NetworkLibrary
from sdrepl.core.networks.use import NetworkPlan, plan_networks
from sdrepl.daemon.context import DaemonContext
from sdrepl.daemon.params import Params
from sdrepl.daemon.registry import Request, handler

log = logging.getLogger(__name__)


def _hyper_indexer(path: Path, _sig: Any):
    return read_hypernetwork(path)


def start_networks(ctx: DaemonContext, model: Any) -> list[Any]:
    """Build both libraries, scan them, sync bundled embeddings, start their watchers; returns the watchers."""
    from sdrepl.daemon.watcher import FolderWatcher

    settings = ctx.settings
    ctx.loras = lora_library(settings.loras, signature_of(model.pipe, model.family))
    ctx.hypernetworks = NetworkLibrary(settings.hypernetworks, None, _hyper_indexer, kind="hypernetwork")
    ctx.loras.listeners.append(lambda lib: _sync_bundled(ctx))
    watchers = []
    for lib, event in ((ctx.loras, "loras"), (ctx.hypernetworks, "hypernetworks")):
        watcher = FolderWatcher(lib.folders, lib, lambda change, event=event, lib=lib: _announce(ctx, event, lib, change))
        watcher.start()
        watchers.append(watcher)
        change = lib.scan()
        log.info("%s: %d loaded, %d skipped in %s", event, len(lib.networks()), len(lib.skipped()),
                 ", ".join(map(str, lib.folders)))
        for warning in change.warnings:
            log.warning("%s: %s", event, warning)
    _sync_bundled(ctx)
    return watchers


def model_switched(ctx: DaemonContext, model: Any) -> None:
    """``!model``: index the LoRA files again against the new model (an SD 1.x LoRA is skipped on SDXL and
    back); the hooks of the old model went with it. Runs in a thread (headers only, hashes cached)."""
    if ctx.loras is not None:
        _announce(ctx, "loras", ctx.loras, ctx.loras.set_signature(signature_of(model.pipe, model.family)))


def _announce(ctx: DaemonContext, event: str, lib: NetworkLibrary, change: Any) -> None:
    if change:
        ctx.broadcast(event, change=change.describe(), version=lib.version)


def _sync_bundled(ctx: DaemonContext) -> None:
    """Hand the LoRA files' bundled embeddings to the embedding library (and announce what changed)."""
    if ctx.loras is None:
        return
    bundles = {net.path: (net.info.hash, net.info.embeddings) for net in ctx.loras.networks() if net.info.embeddings}
    change = ctx.library.set_bundled(bundles)
    ctx.apply_library_change(change)


def plan_for(ctx: DaemonContext, prompt: str, negative: str) -> NetworkPlan:
    """The networks a prompt asks for (PromptError for unknown names or tags in the negative prompt)."""
    return plan_networks(prompt, negative, ctx.loras, ctx.hypernetworks)


def mark_broken(ctx: DaemonContext, plan: NetworkPlan, exc: NetworkError) -> None:
    """A file failed on first use (NaN, changed): list it as skipped from now on and tell the clients."""
    for lib, event, nets in ((ctx.loras, "loras", [n for n, _, _ in plan.loras]),
                             (ctx.hypernetworks, "hypernetworks", [n for n, _ in plan.hypernets])):
        for net in nets:
            if lib is not None and str(net.path) == exc.path:
                _announce(ctx, event, lib, lib.mark_broken(net, exc.reason))


def _listing(lib: NetworkLibrary | None, describe) -> dict[str, Any]:
    if lib is None:
        return {"skipped": [], "warnings": [], "folders": [], "version": 0}
    return {"skipped": [s.describe() for s in lib.skipped()], "warnings": lib.warnings(),
            "folders": [str(f) for f in lib.folders], "version": lib.version,
            "items": [describe(n) for n in lib.networks()]}


def lora_summary(net: Any) -> dict[str, Any]:
    return describe_lora(net.info, net.name, net.qualified)


def hypernet_summary(net: Any) -> dict[str, Any]:
    info = net.info
    return {"name": net.name, "qualified": net.qualified, "path": str(net.path), "widths": sorted(info.widths),
            "layer_structure": info.layer_structure, "activation": info.activation, "step": info.step,
            "checkpoint": info.checkpoint, "hash": info.hash[:10]}


@handler("loras")
async def loras(ctx: DaemonContext, params: dict, req: Request) -> dict:
    Params(params, "loras").finish()
    out = _listing(ctx.loras, lora_summary)
    out["loras"] = out.pop("items", [])
    return out


@handler("hypernetworks")
async def hypernetworks(ctx: DaemonContext, params: dict, req: Request) -> dict:
    Params(params, "hypernetworks").finish()
    out = _listing(ctx.hypernetworks, hypernet_summary)
    out["hypernetworks"] = out.pop("items", [])
    return out


def find_lora(ctx: DaemonContext, name: str, request_type: str) -> Any:
    net = ctx.loras.get(name) if ctx.loras is not None else None
    if net is None:
        close = ctx.loras.suggest(name) if ctx.loras is not None else []
        hint = f"; did you mean {', '.join(close)}?" if close else "; `!loras` lists the loaded ones"
        raise PromptError(f"{request_type}: no loaded LoRA is called {name!r}{hint}")
    return net


@handler("show_lora")
async def show_lora(ctx: DaemonContext, params: dict, req: Request) -> dict:
    p = Params(params, "show_lora")
    name = p.text("name", file_name=True)
    p.finish()
    net = find_lora(ctx, name, "show lora")
    info = net.info
    result = lora_summary(net)
    result.update({
        "sha256_addnet": info.hash,
        "groups": info.matched.per_group(),
        "unmatched": info.matched.unmatched[:20],
        "metadata": {k: v for k, v in info.metadata.items() if k != "ss_tag_frequency"},
        "tags": [{"tag": tag, "count": count} for tag, count in info.tag_summary],
        "size": net.size,
        "cached": ctx.loras.cached(net),
    })
    return result


async def reload_networks(ctx: DaemonContext) -> dict[str, Any]:
    """``!reload`` rescans the LoRA and hypernetwork folders too."""
    out = {}
    for lib, event in ((ctx.loras, "loras"), (ctx.hypernetworks, "hypernetworks")):
        if lib is None:
            continue
        change = await asyncio.to_thread(lib.scan)
        _announce(ctx, event, lib, change)
        out[event] = change.describe()
    return out
