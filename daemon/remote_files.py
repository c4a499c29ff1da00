"""What a remote (TCP) client may do with files: get its pictures, and never name the daemon's own paths.

A remote client's pictures are written on the daemon (its own copies, in ``--outputs``, as for a local
client) and then fetched, one ``picture`` request per file, as base64 PNG bytes with their metadata inside
(the PNG's ``parameters`` chunk); the client writes them into its own outputs folder with the same naming
(``repl/remote_pictures.py``). ``picture`` serves only PNG files under the daemon's outputs folder, bounded
so one reply fits the protocol's line limit.

Request parameters that name a path on the daemon's machine (``train --data``/``--log-dir``,
``preprocess``) mean nothing to a client on another machine and would let it read the daemon's disk: they
are refused for remote connections (:func:`refuse_daemon_paths`, called by the server before dispatch).
"""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path
from typing import Any

from sdrepl.core.errors import SdreplError
from sdrepl.core.safe_open import UnsafeFile, read_regular_file
from sdrepl.daemon import protocol
from sdrepl.daemon.context import DaemonContext
from sdrepl.daemon.params import Params
from sdrepl.daemon.protocol import BadRequest
from sdrepl.daemon.registry import Request, handler
from sdrepl.daemon.uploads import folder_for

#: Largest picture sent back (base64 grows it by 4/3; the reply must fit in protocol.MAX_LINE).
MAX_PICTURE = (protocol.MAX_LINE - 64 * 1024) * 3 // 4
#: Request parameters naming a path on the daemon's machine, per request type.
DAEMON_PATHS = {"train": ("data", "log_dir", "template"), "preprocess": ("src", "dst"), "inspect": ("log",),
                "generate": ("init",), "grid": ("log", "init")}


class RemotePathRefused(SdreplError):
    """A remote client named a path on the daemon's machine (its files are not the client's)."""


def refuse_daemon_paths(type_name: str, params: dict[str, Any], owner: int = 0) -> None:
    """Raise :class:`RemotePathRefused` when a remote request names a daemon-side path; ``train``'s
    ``data`` may be an ``upload:<id>`` token of this connection (``owner``), replaced by its folder."""
    for name in DAEMON_PATHS.get(type_name, ()):
        value = params.get(name)
        if name == "data" and isinstance(value, str) and value.startswith("upload:"):
            params[name] = folder_for(value, owner)  # data the client sent (daemon/uploads.py)
            continue
        if name == "init" and isinstance(value, str) and value.startswith("upload:"):
            continue  # an init picture the client sent; generate reads it (daemon/generation.py)
        if value is None or (name == "template" and isinstance(value, str) and os.sep not in value
                             and not value.endswith(".txt")):
            continue  # a built-in template name is no path
        option = "--" + name.replace("_", "-")
        raise RemotePathRefused(
            f"{type_name}: {option} names a path on the daemon's machine, which a remote client may not use; "
            f"run this on the daemon's machine (over its Unix socket), or copy the files there first"
            + ("; the REPL's `!train NAME --data DIR` sends a local folder for you" if name == "data" else "")
            + ("; the REPL's `--init IMAGE` sends a local picture for you" if name == "init" else ""))


@handler("picture")
async def picture(ctx: DaemonContext, params: dict, req: Request) -> dict:
    """One picture of the daemon's outputs folder as base64 PNG bytes (protocol v2, for remote clients)."""
    p = Params(params, "picture")
    path_text = p.text("path", file_name=True)
    p.finish()
    root = Path(os.path.realpath(ctx.settings.outputs))
    path = Path(os.path.realpath(path_text))
    if path.suffix.lower() != ".png" or not path.is_relative_to(root):
        raise BadRequest(f"picture: {path_text!r} is not a picture in the daemon's outputs folder; ask for the "
                         "paths a generate reply names")
    try:
        data, _ = await asyncio.to_thread(read_regular_file, path, MAX_PICTURE)
    except UnsafeFile as exc:
        raise BadRequest(f"picture: {exc.reason}") from None
    except FileNotFoundError:
        raise BadRequest(f"picture: {path_text!r} is no longer in the daemon's outputs folder") from None
    return {"path": str(path), "name": path.name, "size": len(data), "data": base64.b64encode(data).decode("ascii")}
