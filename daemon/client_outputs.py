"""A client's own outputs folder (protocol v2 ``generate`` parameter ``outputs``).

A daemon serves every REPL on its socket, started from any folder; each REPL's ``--outputs`` (default
``./outputs`` where it was started) is where its user looks for pictures. A local client may name its
folder and the daemon writes there, after checking that it may: an absolute path, not inside an
embeddings, LoRA or hypernetwork folder (a PNG there would be read as an embedding card, and the watcher
would see every picture), and a folder the daemon can create and write. Remote clients get their
pictures sent as bytes and may not name a folder on the daemon's machine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sdrepl.daemon.protocol import BadRequest


def client_outputs(ctx: Any, value: Any, *, remote: bool = False) -> Path:
    """The folder a ``generate`` writes into: the daemon's ``--outputs``, or the client's, validated."""
    if value is None:
        return Path(ctx.settings.outputs)
    if remote:
        raise BadRequest("generate: parameter 'outputs' is for local clients; a remote client gets its pictures "
                         "sent and writes them into its own --outputs")
    if not isinstance(value, str) or not value or "\x00" in value:
        raise BadRequest(f"generate: parameter 'outputs' must be a folder path, got {value!r}"[:300])
    path = Path(value)
    if not path.is_absolute():
        raise BadRequest(f"generate: parameter 'outputs' must be an absolute path (the daemon's working folder "
                         f"is not the client's), got {value!r}"[:300])
    real = Path(os.path.realpath(path))
    watched = [*ctx.settings.embeddings, *getattr(ctx.settings, "loras", []),
               *getattr(ctx.settings, "hypernetworks", [])]
    for folder in watched:
        inner = Path(os.path.realpath(folder))
        if real == inner or inner in real.parents:
            raise BadRequest(f"generate: --outputs {value} is inside the watched folder {folder}; pictures there "
                             "would be read as embedding cards: choose another folder")
    try:
        real.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadRequest(f"generate: cannot create --outputs {value} ({exc.strerror or exc}); choose a folder "
                         "you can write") from None
    if not real.is_dir() or not os.access(real, os.W_OK | os.X_OK):
        raise BadRequest(f"generate: cannot write pictures into --outputs {value} (not a writable folder); "
                         "choose a folder you can write")
    return real
