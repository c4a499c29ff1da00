"""``!push FILE``: an embedding or LoRA sent by a client lands in the daemon's watched folder.

The file arrives as a one-file upload (``daemon/uploads.py``, ``kind: "push"``), so a remote client needs
no shared folder. Before it is published it is read by the same readers the library uses (an embedding:
``core.formats.read_embedding``, limits and the pickle allow-list included; a LoRA: ``index_lora`` against
the resident model), its name must pass the one name rule, and it is copied into the first
``--embeddings`` / ``--loras`` folder through ``core.atomic`` (a hidden temporary the watcher ignores,
then one rename): the watcher sees the finished file or nothing. An existing file is never replaced
unless ``overwrite`` is given.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from sdrepl.core.atomic import atomic_writer, write_error_text
from sdrepl.core.names import name_problem
from sdrepl.daemon.context import DaemonContext
from sdrepl.daemon.params import Params
from sdrepl.daemon.protocol import BadRequest
from sdrepl.daemon.registry import Request, handler
from sdrepl.daemon.uploads import sealed


def _validate(kind: str, path: Path, ctx: DaemonContext) -> None:
    if kind == "embedding":
        from sdrepl.core.formats import read_embedding

        read_embedding(path)
        return
    from sdrepl.core.networks.container import read_header
    from sdrepl.core.networks.index import index_lora

    signature = ctx.loras.signature if ctx.loras is not None else None
    if signature is None:
        read_header(path)
    else:
        index_lora(path, signature)


@handler("push")
async def push(ctx: DaemonContext, params: dict, req: Request) -> dict:
    p = Params(params, "push")
    token = p.text("upload")
    kind = p.text("kind", "embedding", choices=("embedding", "lora"))
    overwrite = p.flag("overwrite", False)
    p.finish()
    upload = sealed(token, id(req.connection))
    if upload.kind != "push" or upload.files != 1:
        raise BadRequest(f"push: {token!r} is not a one-file !push upload")
    (name,) = upload.names
    source = upload.folder / name
    problem = name_problem(Path(name).stem)
    if problem:
        raise BadRequest(f"push: {name!r} cannot be a {kind} name: {problem}; rename the file")
    try:
        await asyncio.to_thread(_validate, kind, source, ctx)
    except Exception as exc:
        raise BadRequest(f"push: {name} is not a usable {kind} ({str(exc)[:300]}); nothing was written") from None
    folders = ctx.settings.embeddings if kind == "embedding" else ctx.settings.loras
    folder = Path(folders[0])
    target = folder / name

    def publish() -> None:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_writer(target, overwrite=overwrite) as tmp:
            shutil.copyfile(source, tmp)

    existed = target.exists()
    try:
        await asyncio.to_thread(publish)
    except FileExistsError:
        raise BadRequest(f"push: {target} already exists; `!push FILE --overwrite` replaces it") from None
    except OSError as exc:
        raise BadRequest(f"push: {write_error_text(exc, target)}") from None
    finally:
        shutil.rmtree(upload.folder, ignore_errors=True)
    return {"path": str(target), "kind": kind, "name": Path(name).stem, "overwritten": existed}
