"""A remote daemon's pictures, brought home: fetched over the protocol and written to the local outputs.

The daemon keeps its own copy (its ``--outputs``, which ``status`` names); the client asks for each file
of a ``generate`` reply with a ``picture`` request (base64 PNG bytes, the A1111 ``parameters`` chunk
inside) and writes it through ``core.outputs`` (atomic, never overwriting, the same
``<YYYY-MM-DD>/<00001>-<seed>.png`` naming as a local daemon). The result then names the local file as
``path`` and the daemon's as ``daemon_path``, so everything downstream (``!fetch`` of the picture, the
rendering) works on this machine's file.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

from sdrepl.core.errors import SdreplError
from sdrepl.core.outputs import output_folder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class PictureTransferError(SdreplError):
    """A picture the remote daemon sent is not a PNG (or could not be written here)."""


async def bring_home(client: Any, result: dict[str, Any], outputs: Path) -> dict[str, Any]:
    """``result`` with each image fetched from the daemon and written under ``outputs`` (this machine)."""
    images = []
    folder = output_folder(outputs)
    for image in result.get("images") or []:
        local = await fetch_picture(client, image["path"], folder, int(image.get("seed", result.get("seed", 0))), outputs)
        images.append({**image, "path": local, "daemon_path": image["path"]})
    return {**result, "images": images}


async def fetch_picture(client: Any, daemon_path: str, folder: Any, label: int | str, outputs: Path) -> str:
    """One picture of the daemon's (``daemon_path``) written into ``folder`` here as ``NNNNN-<label>.png``
    (a seed, or ``grid`` for a ``!grid`` picture); its local path."""
    reply = await client.request("picture", path=daemon_path)
    try:
        data = base64.b64decode(str(reply.get("data", "")), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PictureTransferError(f"the daemon sent picture {daemon_path!r} in a broken form ({exc})") from None
    if not data.startswith(PNG_MAGIC):
        raise PictureTransferError(f"the daemon sent {daemon_path!r} but it is not a PNG file")
    try:
        local = folder.save(lambda tmp, data=data: Path(tmp).write_bytes(data), label)
    except OSError as exc:
        from sdrepl.core.atomic import write_error_text

        raise PictureTransferError(f"cannot save the picture here: {write_error_text(exc, outputs / 'x')}") \
            from None
    return str(local)
