"""The ``mix`` request (``!mix NEW = EXPR``): embedding arithmetic written as a new embedding file.

The expression is parsed and evaluated by :mod:`sdrepl.core.mix`; names resolve in the library, text terms
are the resident model's token rows (per encoder). The result is written atomically into the first
embeddings folder (never over an existing file or name unless ``overwrite``) and loaded before the reply,
so ``<NEW>`` works in the very next prompt.
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from sdrepl.core.budget import tokenize_text
from sdrepl.core.errors import EmbeddingError
from sdrepl.core.formats import write_embedding
from sdrepl.core.mix import Vectors, evaluate, names, parse
from sdrepl.core.training.options import check_name
from sdrepl.daemon.context import DaemonContext
from sdrepl.daemon.handlers import find_embedding
from sdrepl.daemon.inspect_handlers import encoders_of
from sdrepl.daemon.params import Params
from sdrepl.daemon.registry import Request, handler
from sdrepl.daemon.training_handlers import CREATE_FORMATS, embedding_at, first_folder


def text_vectors(model: Any, text: str) -> Vectors:
    """``text``'s token embeddings per encoder key (no BOS/EOS), ``[tokens, D]`` float32 on the CPU."""
    out: Vectors = {}
    for key, (tokenizer, encoder) in encoders_of(model).items():
        table = encoder.get_input_embeddings().weight
        ids = tokenize_text(text, tokenizer)
        with torch.no_grad():
            rows = table[torch.tensor(ids, dtype=torch.long, device=table.device)] if ids else table[:0]
        out[key] = rows.detach().to("cpu", torch.float32).clone()
    return out


@handler("mix")
async def mix(ctx: DaemonContext, params: dict, req: Request) -> dict:
    p = Params(params, "mix")
    name = check_name(p.text("name"), "!mix")
    source = p.text("expression")
    overwrite = p.flag("overwrite", False)
    fmt = p.text("format", "safetensors", choices=CREATE_FORMATS)
    p.finish()
    tree = parse(source)
    terms = {n: find_embedding(ctx, n, "mix").vectors for n in names(tree)}
    existing = ctx.library.get(name)
    path = first_folder(ctx) / f"{name}.{fmt}"
    if not overwrite and (existing is not None or path.exists()):
        where = existing.path if existing is not None else path
        raise EmbeddingError(where, f"an embedding named {name!r} already exists; pass --overwrite to replace it, "
                             "or choose another name")
    assert ctx.residency is not None
    async with ctx.residency.using() as model:
        if '"' in source:
            def work() -> Vectors:
                return evaluate(tree, source, terms.__getitem__, lambda text: text_vectors(model, text))

            data = await ctx.worker.run(work, label="mix")
        else:
            def no_text(text: str) -> Vectors:
                raise AssertionError("no text terms")

            data = await asyncio.to_thread(evaluate, tree, source, terms.__getitem__, no_text)
        model_hash = await asyncio.to_thread(lambda: model.model_hash)
        model_name = model.name
    written = await asyncio.to_thread(write_embedding, path, data, fmt, name=name, checkpoint_hash=model_hash,
                                      checkpoint_name=model_name, init_text=source, overwrite=overwrite)
    change = await asyncio.to_thread(ctx.library.update_path, written)
    ctx.apply_library_change(change)
    emb = embedding_at(ctx, written, name)
    if emb is None:
        raise EmbeddingError(written, "was written but the library did not load it (it may not fit this model); "
                             "see !embeddings for why")
    return {"embedding": {**emb.describe(), "name": emb.trigger, "path": str(written), "vectors": emb.data.num_vectors},
            "path": str(written), "expression": source}
