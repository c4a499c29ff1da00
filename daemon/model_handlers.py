"""The ``model`` request (protocol v2): switch the daemon's model from a client (the REPL's ``!model``).

One model per daemon stays the rule; this changes which. The new model is validated as ``--model`` is
(``core.models.load_model``: a built-in name, a diffusers folder, a single-file checkpoint, a hub id), the
library is re-checked against its text encoders (an SD 2.x model skips the SD 1.x embeddings, and back),
and every client is told through ``model`` and ``embeddings`` events. Refused while a training job runs
on the current model. With ``--device a,b`` the further devices load the new model too
(``daemon/workers.py``), and a Ray fleet's replicas are replaced by ones holding it (``daemon/fleet.py``).
"""

from __future__ import annotations

import asyncio

from sdrepl.daemon.context import DaemonContext
from sdrepl.daemon.params import Params
from sdrepl.daemon.protocol import Busy
from sdrepl.daemon.registry import Request, handler


@handler("model")
async def switch_model(ctx: DaemonContext, params: dict, req: Request) -> dict:
    p = Params(params, "model")
    spec = p.text("model", file_name=True)
    p.finish()
    assert ctx.residency is not None
    job = ctx.training
    if job is not None and getattr(job, "active", False):
        raise Busy(f"model: training {getattr(job, 'name', '?')} runs on the current model; stop it first "
                   "(!train stop), then switch")
    client = getattr(req.connection, "client", "?")
    model = await ctx.residency.switch(spec, by=f"client {client}")
    if ctx.pool is not None:  # --device a,b: the further devices load it too, each after its current job
        ctx.pool.switched(ctx.residency.settings.model)
    if ctx.fleet is not None:  # serve --ray: Serve rolls the replicas over to the new model
        await asyncio.to_thread(ctx.fleet.switch, ctx.residency.settings.model, model.name)
    change = ctx.library.set_encoder_widths(model.encoder_widths, model.label)
    ctx.apply_library_change(change)
    from sdrepl.daemon.networks import model_switched

    await asyncio.to_thread(model_switched, ctx, model)
    return {"model": ctx.residency.description, "embeddings": {"loaded": len(ctx.library.embeddings()),
                                                               "skipped": len(ctx.library.skipped())}}
