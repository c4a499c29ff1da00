"""A1111's ``Model hash`` of a loaded model, computed without making the first picture wait for it.

The hash is the sha256 of the checkpoint (for a diffusers folder and the tiny models: the UNet's weights
file). Reading a 2-7 GB file takes seconds, and the first generation after a daemon start used to wait
for it on the device thread. Now:

- a hash already in the persistent table (:class:`~sdrepl.core.hashing.PersistentHashes`, by path, size
  and mtime) is known at once; a small file (under :data:`SYNC_BYTES`) is hashed at once;
- otherwise a background thread hashes the file in chunks (``status`` shows its progress) and records the
  result in the table for the next start.

**A picture made before the hash is known** records no ``Model hash`` field (its ``Model`` name is there),
which is what A1111 writes when it does not know the hash; pictures made after it record the hash.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Any

from sdrepl.core.hashing import PersistentHashes, default_persistent_hashes

log = logging.getLogger(__name__)

#: Files smaller than this are hashed on the spot (milliseconds), so short runs never see "unknown".
SYNC_BYTES = 64 * 2**20
_CHUNK = 4 * 2**20


def hash_target(path: Path | None) -> Path | None:
    """The file whose sha256 is the model's hash: the checkpoint, or a folder's UNet weights."""
    if path is not None and path.is_dir():
        unet = path / "unet"
        candidates = sorted(unet.glob("diffusion_pytorch_model*.safetensors")) or sorted(unet.glob("*.bin"))
        path = candidates[0] if candidates else None
    return path if path is not None and path.is_file() else None


class ModelHasher:
    """The sha256 of one model file: known, being computed in the background, or not available."""

    def __init__(self, path: Path | None, table: PersistentHashes | None = None) -> None:
        self.target = hash_target(path)
        self.table = table if table is not None else default_persistent_hashes()
        self.sha256: str | None = None
        self.error: str | None = None
        self.total = 0
        self.done = 0
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        if self.target is None:
            self.sha256 = "0" * 64  # no weights file (a hub model): A1111 writes zeros too
            return
        try:
            self._stat = os.stat(self.target)
        except OSError as exc:
            self.error = exc.strerror or str(exc)
            return
        self.total = self._stat.st_size
        self.sha256 = self.table.get(self.target, self._stat)
        if self.sha256 is None and self.total < SYNC_BYTES:
            self._run()

    @property
    def short(self) -> str:
        """The first 10 hex digits, or "" while unknown."""
        return self.sha256[:10] if self.sha256 else ""

    def start(self) -> None:
        """Hash in a background thread when the hash is not known yet (once)."""
        with self._lock:
            if self.sha256 is not None or self.error is not None or self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="sdrepl-model-hash", daemon=True)
            self._thread.start()

    def wait(self, timeout: float | None = None) -> str:
        """The hash, waiting for the background thread (tests, tools); "" if it is not available."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.short

    def _run(self) -> None:
        assert self.target is not None
        digest = hashlib.sha256()
        try:
            with open(self.target, "rb") as fh:
                while block := fh.read(_CHUNK):
                    digest.update(block)
                    self.done += len(block)
        except OSError as exc:
            self.error = exc.strerror or str(exc)
            log.warning("cannot hash the model file %s: %s", self.target, self.error)
            return
        self.sha256 = digest.hexdigest()
        self.table.put(self.target, self._stat, self.sha256)
        log.info("model hash of %s: %s", self.target, self.short)

    def describe(self) -> dict[str, Any]:
        """For ``status``: ``state`` known/hashing/unavailable, the hash, and progress in MiB."""
        if self.sha256 is not None:
            state = "known"
        elif self.error is not None:
            state = "unavailable"
        else:
            state = "hashing"
        return {"state": state, "hash": self.short or None, "done_mb": round(self.done / 2**20, 1),
                "total_mb": round(self.total / 2**20, 1), "error": self.error}
