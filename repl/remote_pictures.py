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
        reply = await client.request("picture", path=image["path"])
        try:
            data = base64.b64decode(str(reply.get("data", "")), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise PictureTransferError(f"the daemon sent picture {image['path']!r} in a broken form ({exc})") from None
        if not data.startswith(PNG_MAGIC):
            raise PictureTransferError(f"the daemon sent {image['path']!r} but it is not a PNG file")
        seed = int(image.get("seed", result.get("seed", 0)))
        try:
            local = folder.save(lambda tmp, data=data: Path(tmp).write_bytes(data), seed)
        except OSError as exc:
            from sdrepl.core.atomic import write_error_text

            raise PictureTransferError(f"cannot save the picture here: {write_error_text(exc, outputs / 'x')}") \
                from None
        images.append({**image, "path": str(local), "daemon_path": image["path"]})
    return {**result, "images": images}
