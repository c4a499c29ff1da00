"""What a client asked for that the running daemon does not do, in one line per option.

One daemon serves every client on its socket, with the options it was started with. A client started
with other ``--model``, ``--embeddings``, ``--device``, ``--dtype`` or ``--keep-alive`` values cannot
change them by connecting (``--outputs`` it can: each generation names the client's folder): it is told, with both values and how to switch, instead of
silently getting the daemon's (issue 11, item 4). ``!model`` switches the model without a restart.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _same_path(a: Any, b: Any) -> bool:
    try:
        return os.path.realpath(Path(str(a)).expanduser()) == os.path.realpath(Path(str(b)).expanduser())
    except (OSError, ValueError):
        return str(a) == str(b)


def _same_device(asked: str, serving: str) -> bool:
    return asked == serving or (asked == "cuda" and serving.startswith("cuda")) or serving == f"{asked}:0"


def option_notices(settings: Any, status: dict[str, Any]) -> list[str]:
    """One line per option of ``settings`` that the daemon's ``status`` reply contradicts."""
    socket = status.get("socket") or settings.socket
    switch = f"`sdrepl stop` and start again to switch (or use another --socket than {socket})"
    lines: list[str] = []

    def differ(option: str, serving: Any, asked: Any, extra: str = "") -> None:
        lines.append(f"the daemon on {socket} uses {option} {serving}, not {asked} as asked; {extra}{switch}")

    folders = (status.get("embeddings") or {}).get("folders")
    asked_folders = [str(p) for p in settings.embeddings]
    if folders is not None and (len(folders) != len(asked_folders)
                                or not all(_same_path(a, b) for a, b in zip(folders, asked_folders, strict=True))):
        differ("--embeddings", ", ".join(folders) or "none", ", ".join(asked_folders))
    model = status.get("model") or {}
    several = "," in settings.device or settings.device == "all"  # --device a,b: status names worker 0's
    if settings.device != "auto" and not several and model.get("device") and not _same_device(settings.device, str(model["device"])):
        differ("--device", model["device"], settings.device)
    if settings.dtype != "auto" and model.get("dtype") and settings.dtype != model["dtype"]:
        differ("--dtype", model["dtype"], settings.dtype)
    keep = status.get("keep_alive_s", "absent")
    if settings.keep_alive is not None and keep != "absent" and keep != settings.keep_alive:
        differ("--keep-alive", "forever" if keep is None else f"{keep:g}s", f"{settings.keep_alive:g}s")
    return lines
