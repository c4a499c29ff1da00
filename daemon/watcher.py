"""Live reload: watch the embeddings folders and keep the library current as files come and go.

Which filesystem events mean "this file is complete now" decides both speed and correctness:

- **closed after writing** (inotify ``IN_CLOSE_WRITE``, watchdog's :class:`FileClosedEvent`) and **moved
  into place** (a rename inside the folders, as atomic writers do): complete; act at once.
- **created**: from ``cp`` the file is still empty (its close follows), from ``mv`` in from outside the
  folders it is complete; act after a short settle time unless a modify or close arrives first.
- **modified without a close** (a writer that keeps the file open, or the polling observer): act after a
  quiet period, or at the latest after a maximum wait while writes keep coming.
- **deleted / moved away**: remove at once. A **folder** created or moved in is scanned (files copied in
  before its watch existed are found); a folder deleted or moved away is removed with its contents.

A file read while incomplete becomes skipped-with-reason in the library and is read again on its next
event, so the close after the last piece always leaves it loaded. Hidden files and folders and the
temporaries of :mod:`sdrepl.core.atomic` are ignored.

All library calls run in order on one thread of this module (the library is thread-safe, but serial
processing means a late event can never overwrite the effect of a newer one); changes reach the clients
through ``on_change`` (``DaemonContext.apply_library_change``, which is thread-safe).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from sdrepl.core.atomic import is_temp_name

log = logging.getLogger(__name__)

#: Quiet time after the last modification (no close seen) before a file is read.
QUIET_S = 0.2
#: Longest a file that keeps changing waits before it is read anyway.
MAX_WAIT_S = 2.0
#: Settle time for a created file (complete when moved in from outside; else a close follows soon).
CREATED_SETTLE_S = 0.05
#: What the watcher asks inotify for: no open/close-without-write events (the library's own reads).
EVENT_FILTER = [FileClosedEvent, FileCreatedEvent, DirCreatedEvent, FileModifiedEvent, FileDeletedEvent,
                DirDeletedEvent, FileMovedEvent, DirMovedEvent]


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: FolderWatcher) -> None:
        self.watcher = watcher

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self.watcher.on_event(event)
        except Exception:  # never let one odd event kill the observer thread
            log.exception("watcher: cannot handle %r", event)


class FolderWatcher:
    """Watches ``folders`` recursively and feeds ``library`` (``update_path`` / ``remove_path``)."""

    def __init__(self, folders: Sequence[Path], library: Any, on_change: Callable[[Any], None], *,
                 polling: bool = False) -> None:
        self.folders = [Path(os.path.abspath(f)) for f in folders]
        self.library = library
        self.on_change = on_change
        self.mode = "not started"
        self._force_polling = polling
        self._observer: Any = None
        self._cond = threading.Condition()
        self._now: deque[tuple[str, str]] = deque()
        self._debounce: dict[str, tuple[float, float]] = {}  # path -> (first seen, due)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="sdrepl-watcher", daemon=True)
        #: Library calls made (op, path), for tests and the benchmark.
        self.processed = 0

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Create missing folders, start the observer (inotify, else polling) and the processing thread."""
        for folder in self.folders:
            folder.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        if not self._force_polling:
            try:
                self._observer = self._start_observer(Observer())
                self.mode = "inotify" if "Inotify" in type(self._observer).__name__ else type(self._observer).__name__
                return
            except OSError as exc:
                log.warning("watcher: the native file watcher cannot start (%s); falling back to polling every "
                            "second (raise fs.inotify.max_user_watches / max_user_instances to fix)", exc)
        self._observer = self._start_observer(PollingObserver(timeout=1.0))
        self.mode = "polling"

    def _start_observer(self, observer: Any) -> Any:
        handler = _Handler(self)
        try:
            for folder in self.folders:
                observer.schedule(handler, str(folder), recursive=True, event_filter=EVENT_FILTER)
            observer.start()
        except BaseException:
            try:
                observer.stop()
            except Exception:
                pass
            raise
        return observer

    def stop(self) -> None:
        if self._observer is not None:
            try:
                self._observer.stop()
                self._observer.join(5.0)
            except Exception:
                log.debug("watcher: stopping the observer failed", exc_info=True)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(5.0)

    # --- events (observer thread) -------------------------------------------------------------------

    def _ignored(self, path: str) -> bool:
        if not path:
            return True
        p = Path(path)
        if is_temp_name(p):
            return True
        for root in self.folders:
            try:
                rel = p.relative_to(root)
            except ValueError:
                continue
            return any(part.startswith(".") for part in rel.parts)
        return True  # outside every folder

    def on_event(self, event: FileSystemEvent) -> None:
        src = os.fsdecode(event.src_path)
        dest = os.fsdecode(getattr(event, "dest_path", "") or "")
        if isinstance(event, (FileMovedEvent, DirMovedEvent)):
            if not self._ignored(src):
                self._act("remove", src)
            if not self._ignored(dest):
                self._act("update", dest)
        elif isinstance(event, (FileDeletedEvent, DirDeletedEvent)):
            if not self._ignored(src):
                self._act("remove", src)
        elif self._ignored(src):
            return
        elif isinstance(event, (FileClosedEvent, DirCreatedEvent)):
            self._act("update", src)
        elif isinstance(event, FileCreatedEvent):
            self._later(src, CREATED_SETTLE_S)
        elif isinstance(event, FileModifiedEvent):
            self._later(src, QUIET_S)

    def _act(self, op: str, path: str) -> None:
        """Queue a library call to run now; it supersedes a debounced read of the same path."""
        with self._cond:
            if op == "remove":
                prefix = path.rstrip(os.sep) + os.sep
                for pending in [p for p in self._debounce if p == path or p.startswith(prefix)]:
                    del self._debounce[pending]
            else:
                self._debounce.pop(path, None)
            self._now.append((op, path))
            self._cond.notify_all()

    def _later(self, path: str, delay: float) -> None:
        now = time.monotonic()
        with self._cond:
            first, _ = self._debounce.get(path, (now, 0.0))
            self._debounce[path] = (first, min(now + delay, first + MAX_WAIT_S))
            self._cond.notify_all()

    # --- processing (watcher thread) -----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    if self._now:
                        batch = list(self._now)
                        self._now.clear()
                        break
                    now = time.monotonic()
                    due = [p for p, (_, when) in self._debounce.items() if when <= now]
                    if due:
                        for path in due:
                            del self._debounce[path]
                        batch = [("update", p) for p in due]
                        break
                    wait = min((when for _, when in self._debounce.values()), default=now + 60.0) - now
                    self._cond.wait(max(wait, 0.001))
            for op, path in batch:
                self._process(op, path)

    def _process(self, op: str, path: str) -> None:
        try:
            if op == "remove":
                change = self.library.remove_path(Path(path))
            else:
                # An event means the file changed, even when its size and mtime say otherwise.
                change = self.library.update_path(Path(path), force=True)
        except Exception:
            log.exception("watcher: the library failed on %s %s", op, path)
            return
        self.processed += 1
        if change:
            log.info("embeddings: %s %s -> %s", op, path, _summary(change))
            try:
                self.on_change(change)
            except Exception:
                log.exception("watcher: announcing a library change failed")


def _summary(change: Any) -> str:
    described = change.describe()
    parts = [f"{key} {', '.join(v if isinstance(v, str) else v.get('path', str(v)) for v in values)}"
             for key, values in described.items() if values]
    return "; ".join(parts) or "no change"
