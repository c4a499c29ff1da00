"""``!train NAME --data DIR`` against a remote daemon: the local folder is sent, then trained on.

The daemon cannot read this machine's folders, so the pictures and their caption ``.txt`` files (the
top level of the folder, as training reads it) are sent file by file in chunks (``upload_begin``,
``upload_chunk``, ``upload_end``; see ``daemon/uploads.py``), each chunk waiting for its reply, so memory
stays at one chunk. Limits are checked here first (a clear error before anything is sent) and again on
the daemon; the pictures themselves are checked by ``train`` there, as for local data.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from sdrepl.core.errors import UsageError
from sdrepl.core.safe_open import UnsafeFile, open_regular_file
from sdrepl.core.training.dataset import IMAGE_SUFFIXES

ALLOWED = IMAGE_SUFFIXES | {".txt"}


def files_to_send(folder: Path, limits: dict[str, int]) -> list[Path]:
    """The folder's pictures and captions (top level, regular, not hidden), within the daemon's limits."""
    if not folder.is_dir():
        raise UsageError(f"!train --data {folder}: no such folder here")
    files = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.suffix.lower() in ALLOWED
                   and p.is_file())
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in files):
        raise UsageError(f"!train --data {folder}: no pictures in this folder (looked for "
                         f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    if len(files) > limits["files"]:
        raise UsageError(f"!train --data {folder}: {len(files)} files, more than the {limits['files']} one upload "
                         "may hold")
    total = sum(p.stat().st_size for p in files)
    if total > limits["bytes"]:
        raise UsageError(f"!train --data {folder}: {total} bytes, more than the {limits['bytes']} one upload may "
                         "hold")
    return files


async def upload_folder(client: Any, folder: Path) -> str:
    """Send ``folder`` to the daemon; the ``upload:<id>`` token ``train``'s ``data`` takes."""
    begun = await client.request("upload_begin")
    return await _send(client, begun, files_to_send(folder, begun["limits"]))


async def push_file(client: Any, path: Path, kind: str, overwrite: bool) -> dict[str, Any]:
    """``!push``: send one file as a push upload, then ask the daemon to check and publish it."""
    if not path.is_file():
        raise UsageError(f"!push {path}: no such file here; give an embedding or LoRA file")
    begun = await client.request("upload_begin", kind="push")
    token = await _send(client, begun, [path])
    return await client.request("push", upload=token, kind=kind, overwrite=overwrite)


async def _send(client: Any, begun: dict[str, Any], files: list[Path]) -> str:
    token, limits = begun["upload"], begun["limits"]
    chunk = int(limits["chunk_bytes"])
    for path in files:
        try:
            with open_regular_file(path, int(limits["file_bytes"])) as (fh, st):
                left = st.st_size
                while True:
                    data = fh.read(min(chunk, left))
                    left -= len(data)
                    final = left <= 0 or not data
                    await client.request("upload_chunk", upload=token, name=path.name,
                                         data=base64.b64encode(data).decode("ascii"), final=final)
                    if final:
                        break
        except UnsafeFile as exc:
            raise UsageError(f"{path}: {exc.reason}") from None
    done = await client.request("upload_end", upload=token)
    return str(done["data"])


async def upload_init(client: Any, path: Path) -> str:
    """``--init IMAGE`` against a remote daemon: send the picture; the ``upload:<id>`` token ``generate``'s
    ``init`` takes (the daemon reads, checks and then removes it)."""
    if not path.is_file():
        raise UsageError(f"--init {path}: no such file here; give a PNG, JPEG or WebP picture")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(f"--init {path}: not a picture name ({', '.join(sorted(IMAGE_SUFFIXES))})")
    begun = await client.request("upload_begin", kind="init")
    return await _send(client, begun, [path])
