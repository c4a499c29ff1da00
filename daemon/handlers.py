"""Thin handlers for the small requests: unpack the parameters, call the real work, return the result.

``hello``, ``ping``, ``status``, ``tokens``, ``embeddings``, ``show``, ``reload``, ``convert``, ``cancel``
and ``shutdown`` (``generate`` is in ``generation.py``, training in ``training_handlers.py``). Library
calls that read files run in a worker thread (never on the event loop, never on the device thread).
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
from typing import Any

from sdrepl import __version__
from sdrepl.core.embedding import Embedding
from sdrepl.core.errors import PromptError
from sdrepl.core.limits import int_range
from sdrepl.core.plan_budget import scheduled_prompt_budget
from sdrepl.core.prompt import PromptOptions
from sdrepl.daemon.context import DaemonContext
from sdrepl.daemon.generation import prompt_settings
from sdrepl.daemon.params import Params
from sdrepl.daemon.protocol import OLDEST_PROTOCOL, PROTOCOL_VERSION, BadRequest, ProtocolMismatch, valid_id
from sdrepl.daemon.registry import Request, handler


def memory_info(device: Any = None) -> dict[str, float | None]:
    """Resident memory of the daemon, and CUDA memory when CUDA is in use (MiB)."""
    rss = None
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
                    break
    except (OSError, ValueError, IndexError):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak, Linux KiB
    allocated = peak = None
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            index = getattr(device, "index", None)
            index = torch.cuda.current_device() if index is None else index
            allocated = torch.cuda.memory_allocated(index) / 2**20
            peak = torch.cuda.max_memory_allocated(index) / 2**20
    except Exception:  # memory figures are informative only
        pass
    return {"rss_mb": _round(rss), "cuda_allocated_mb": _round(allocated), "cuda_peak_mb": _round(peak)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def training_summary(ctx: DaemonContext) -> dict[str, Any] | None:
    """The ``<job>`` object of the training job in ``ctx.training``, or None."""
    return None if ctx.training is None else ctx.training.describe()


def _live_description(residency: Any) -> dict[str, Any] | None:
    """The model's description with its ``speed`` as of now (``--compile`` warm-ups happen after load)."""
    if residency is None:
        return None
    model = residency.model
    if model is None or not residency.description:
        return residency.description
    return {**residency.description, "speed": model.speed_description()}


def status_result(ctx: DaemonContext) -> dict[str, Any]:
    residency = ctx.residency
    model = residency.model if residency is not None else None
    return {
        "pid": os.getpid(),
        "version": __version__,
        "protocol": PROTOCOL_VERSION,
        "socket": str(ctx.settings.socket),
        "uptime_s": round(time.time() - ctx.started, 3),
        "state": ctx.model_state,
        "model": _live_description(residency),
        "memory": memory_info(model.device if model is not None else None),
        "model_hash": model.hasher.describe() if model is not None else None,
        "embeddings": {"loaded": ctx.library.counts()[0], "skipped": ctx.library.counts()[1],
                       "folders": [str(f) for f in ctx.library.folders]},
        "loras": ({"loaded": len(ctx.loras.networks()), "skipped": len(ctx.loras.skipped()),
                   "folders": [str(f) for f in ctx.loras.folders]} if ctx.loras is not None else None),
        "queue": {"pending": ctx.worker.pending, "running": ctx.worker.running},
        "training": training_summary(ctx),
        "clients": ctx.clients,
        "keep_alive_s": ctx.settings.keep_alive,
        "outputs": str(ctx.settings.outputs),  # the daemon's own copies (remote clients get theirs sent)
        "listen": list(ctx.listening),
        # --device a,b: one entry per worker; training always runs on worker 0
        "workers": ctx.pool.describe() if ctx.pool is not None else ctx.fleet.describe() if ctx.fleet is not None
        else None,
        "ray": ctx.fleet.summary() if ctx.fleet is not None else None,  # serve --ray (daemon/fleet.py)
    }


def find_embedding(ctx: DaemonContext, name: str, request_type: str) -> Embedding:
    """The embedding called ``name``, or a PromptError with close names."""
    emb = ctx.library.get(name)
    if emb is None:
        close = ctx.library.suggest(name)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `!embeddings` lists the loaded ones"
        raise PromptError(f"{request_type}: no loaded embedding is called {name!r}{hint}")
    return emb


@handler("hello")
async def hello(ctx: DaemonContext, params: dict, req: Request) -> dict:
    p = Params(params, "hello")
    protocol = p.integer("protocol")
    client = p.text("client", "")
    events = p.flag("events", True)
    p.finish()
    if not OLDEST_PROTOCOL <= protocol <= PROTOCOL_VERSION:
        raise ProtocolMismatch(
            f"the client speaks protocol {protocol} but this daemon (sdrepl {__version__}, pid {os.getpid()}) "
            f"speaks {OLDEST_PROTOCOL} to {PROTOCOL_VERSION}; restart the daemon with the same sdrepl as the client (`sdrepl stop`)")
    conn = req.connection
    conn.client = client or "?"  # type: ignore[attr-defined]
    conn.subscribed = events  # type: ignore[attr-defined]
    return {"protocol": PROTOCOL_VERSION, "version": __version__, "pid": os.getpid(), "state": ctx.model_state,
            "model": ctx.residency.description if ctx.residency is not None else None}


@handler("ping")
async def ping(ctx: DaemonContext, params: dict, req: Request) -> dict:
    Params(params, "ping").finish()
    return {}


@handler("status")
async def status(ctx: DaemonContext, params: dict, req: Request) -> dict:
    Params(params, "status").finish()
    return {**status_result(ctx), "remote_client": bool(getattr(req.connection, "remote", False))}


@handler("tokens")
async def tokens(ctx: DaemonContext, params: dict, req: Request) -> dict:
    """The token budget; uses the resident tokenizer, so it neither wakes nor keeps the model loaded."""
    p = Params(params, "tokens")
    prompt = p.text("prompt")
    negative = p.text("negative", "")
    clip_skip = p.integer("clip_skip", 1, lo=int_range("clip_skip")[0], hi=int_range("clip_skip")[1])
    steps = p.integer("steps", 20, lo=int_range("steps")[0], hi=int_range("steps")[1])
    emphasis, window = prompt_settings(p, ctx.settings, "tokens")
    p.finish()
    assert ctx.residency is not None
    options = PromptOptions(clip_skip=clip_skip, emphasis=emphasis, comma_window=window)
    from sdrepl.daemon.networks import plan_for

    networks = plan_for(ctx, prompt, negative)  # tags cost no tokens: cut before the budget
    result = await asyncio.to_thread(scheduled_prompt_budget, networks.text, negative, ctx.residency.tokenizer,
                                     ctx.library, options, steps=steps)
    if networks.loras or networks.hypernets:
        result["loras"] = networks.describe()
        result["hypernetworks"] = [{"name": networks.names[n.key], "strength": w} for n, w in networks.hypernets]
    return result


@handler("embeddings")
async def embeddings(ctx: DaemonContext, params: dict, req: Request) -> dict:
    Params(params, "embeddings").finish()
    state = ctx.library.snapshot()  # one snapshot: the lists and the version agree

    def listing() -> dict:  # a thread: sorting and describing 10,000 entries takes a while
        return {"embeddings": [e.describe() for e in state.loaded], "skipped": [s.describe() for s in state.skipped],
                "warnings": list(state.warnings), "version": state.version}

    return await asyncio.to_thread(listing)


@handler("show")
async def show(ctx: DaemonContext, params: dict, req: Request) -> dict:
    p = Params(params, "show")
    name = p.text("name", file_name=True)
    p.finish()
    emb = find_embedding(ctx, name, "show")
    norms: dict[str, list[float]] = {key: [round(float(v), 6) for v in t.float().norm(dim=1)]
                                     for key, t in emb.vectors.items()}
    result = emb.describe()
    result.update({
        "sha256": emb.sha256,
        "norms": next(iter(norms.values())) if len(norms) == 1 else norms,
        "size": emb.size,
        "mtime": emb.mtime_ns / 1e9 if emb.mtime_ns else None,
        "warnings": list(emb.warnings),
    })
    return result


@handler("reload")
async def reload(ctx: DaemonContext, params: dict, req: Request) -> dict:
    Params(params, "reload").finish()
    change = await asyncio.to_thread(ctx.library.scan)
    ctx.apply_library_change(change)
    from sdrepl.daemon.networks import reload_networks

    return {"change": change.describe(), "version": change.version, **(await reload_networks(ctx))}


@handler("convert")
async def convert(ctx: DaemonContext, params: dict, req: Request) -> dict:
    from sdrepl.core.convert import TARGETS, convert_embedding

    p = Params(params, "convert")
    name = p.text("name", file_name=True)
    to = p.text("to", choices=TARGETS)
    overwrite = p.flag("overwrite", False)
    p.finish()

    emb = find_embedding(ctx, name, "convert")
    path = await asyncio.to_thread(convert_embedding, emb, to, overwrite=overwrite)
    return {"path": str(path)}


@handler("cancel")
async def cancel(ctx: DaemonContext, params: dict, req: Request) -> dict:
    p = Params(params, "cancel")
    target = p.raw("request")
    p.finish()
    if not valid_id(target):
        raise BadRequest(f"cancel: parameter 'request' must be the id (integer or string) of a request in flight "
                         f"on this connection, got {target!r}")
    if target == req.id:
        return {"cancelled": False}
    return {"cancelled": bool(req.connection.cancel_request(target))}  # type: ignore[attr-defined]


@handler("shutdown")
async def shutdown(ctx: DaemonContext, params: dict, req: Request) -> dict:
    Params(params, "shutdown").finish()
    client = getattr(req.connection, "client", "?")
    ctx.loop.call_soon(ctx.request_shutdown, f"shutdown requested by client {client}")
    return {"stopping": True}
