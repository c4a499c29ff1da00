"""PNG encoding, metadata and fsync on a writer thread, off the device thread.

Why: encoding a 1024 px PNG takes tens of milliseconds and an fsync can take longer on a slow disk; on
the device thread both would idle the accelerator between batches. The writer is one thread, so pictures
are numbered in the order they were handed over (``core.outputs.OutputFolder``'s rule is unchanged);
whoever replies waits for the files (:meth:`PendingWrites.wait`), so a reply never names a file that is
not on disk yet.
"""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path
from typing import Any

from sdrepl.core.errors import WriteError
from sdrepl.core.outputs import OutputFolder
from sdrepl.core.pnginfo import png_text_chunks

_EXECUTOR: concurrent.futures.ThreadPoolExecutor | None = None
_LOCK = threading.Lock()


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    global _EXECUTOR
    with _LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdrepl-png")
        return _EXECUTOR


def _write(outputs: OutputFolder, image: Any, parameters: str, seed: int) -> Path:
    info = png_text_chunks(parameters)
    return outputs.save(lambda tmp: image.save(tmp, format="PNG", pnginfo=info), seed)


class PendingWrites:
    """The pictures of one request on their way to disk, in order."""

    def __init__(self) -> None:
        self._futures: list[tuple[int, concurrent.futures.Future[Path]]] = []

    def add(self, outputs: OutputFolder, image: Any, parameters: str, seed: int) -> None:
        """Queue one picture (a PIL image) with its A1111 ``parameters`` text."""
        self._futures.append((seed, _executor().submit(_write, outputs, image, parameters, seed)))

    def wait(self) -> list[dict[str, Any]]:
        """``[{"path", "seed"}]`` once every file is written (fsync'd, renamed into place). A write error is
        raised after all writes finished (none is left running); a :class:`WriteError` (disk full) then
        lists every picture that was written and the seeds that were not."""
        concurrent.futures.wait([f for _, f in self._futures])
        written = [{"path": str(f.result()), "seed": seed} for seed, f in self._futures if f.exception() is None]
        failed = [(seed, f.exception()) for seed, f in self._futures if f.exception() is not None]
        if not failed:
            return written
        seed, exc = failed[0]
        if not isinstance(exc, WriteError):
            raise exc
        # Every picture that did reach the disk is named, so none is left there unreported.
        total = len(self._futures)
        saved = f": {', '.join(item['path'] for item in written)}" if written else ""
        missing = ", ".join(str(s) for s, _ in failed)
        raise WriteError(f"{exc}; {len(written)} of {total} picture(s) written{saved}; not written: seed(s) "
                         f"{missing}") from exc
