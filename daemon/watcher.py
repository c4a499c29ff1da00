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

**Bursts are batched.** Events are queued by the observer thread and applied by one processing thread
of this module: everything queued when it wakes is one batch, split into runs of the same kind (updates,
removals; order between runs is kept, so a late event never undoes a newer one), each run one library
call of about :data:`COMMIT_S` of reading (at most :data:`BATCH_MAX` paths) and one change for the clients. 2,000 files copied in at once are
a handful of library calls, not 2,000 rebuilds, and a file dropped while a big folder fills waits only
for the batch in progress.

The library this module serves is anything with the small interface of :class:`WatchedLibrary`
(``update_paths``, ``remove_paths``, returning change objects that are falsy when nothing changed and
have ``describe()``); the embedding library is one, and other libraries (LoRA) can be served the same
way. Changes reach the clients through ``on_change`` (``DaemonContext.apply_library_change``, which is
thread-safe).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

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
#: Most and fewest paths in one library call (bounds the work before the next change goes out, and its
#: event's size); between them, as many as take about COMMIT_S to read.
BATCH_MAX = 500
BATCH_MIN = 8
COMMIT_S = 0.025
#: What the watcher asks inotify for: no open/close-without-write events (the library's own reads).
EVENT_FILTER = [FileClosedEvent, FileCreatedEvent, DirCreatedEvent, FileModifiedEvent, FileDeletedEvent,
                DirDeletedEvent, FileMovedEvent, DirMovedEvent]


class WatchedLibrary(Protocol):
    """What the watcher needs from a library: apply a batch of changed or removed paths, say what changed.

    A library that offers only ``update_path(path, *, force)`` / ``remove_path(path)`` is served too, one
    call per path (no batching).
    """

    def update_paths(self, paths: Sequence[Path], *, force: bool = False) -> Any:
        """Files or folders created, modified or moved in (a path that no longer exists counts as removed)."""

    def remove_paths(self, paths: Sequence[Path]) -> Any:
        """Files or folder subtrees deleted or moved out."""


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: FolderWatcher) -> None:
        self.watcher = watcher

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self.watcher.on_event(event)
        except Exception:  # never let one odd event kill the observer thread
            log.exception("watcher: cannot handle %r", event)


class FolderWatcher:
    """Watches ``folders`` recursively and feeds ``library`` (see :class:`WatchedLibrary`)."""

    def __init__(self, folders: Sequence[Path], library: WatchedLibrary, on_change: Callable[[Any], None], *,
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
        #: Paths handed to the library, and library calls made (for tests and the benchmark).
        self.processed = 0
        self.calls = 0
        self._per_path = 0.001  # seconds per path of the last library calls (sizes the next one)

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
            self._hook_overflow(observer)
        except BaseException:
            try:
                observer.stop()
            except Exception:
                pass
            raise
        return observer

    def _hook_overflow(self, observer: Any) -> None:
        """When the kernel's inotify queue overflows (a burst faster than it can be read), events are lost
        for good and watchdog only rebuilds its watches: without a rescan, a file dropped in that moment
        would never be loaded. Each emitter's watch group gets its overflow callback wrapped to queue one."""
        for emitter in list(getattr(observer, "emitters", ())):
            group = getattr(emitter, "_inotify", None)
            original = getattr(group, "on_queue_overflow", None)
            if original is None:
                continue

            def on_overflow(original: Callable[[], None] = original) -> None:
                original()
                self.rescan("the inotify queue overflowed and events were lost")

            group.on_queue_overflow = on_overflow

    def rescan(self, why: str) -> None:
        """Queue a full rescan of the library (after lost events); the watcher thread runs it."""
        log.warning("watcher: %s; rescanning %s", why, ", ".join(map(str, self.folders)))
        with self._cond:
            self._debounce.clear()  # the scan reads every file as it is now
            self._now.append(("scan", "(all folders)"))
            self._cond.notify_all()

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
                    now = time.monotonic()
                    due = [p for p, (_, when) in self._debounce.items() if when <= now]
                    if self._now or due:  # both kinds each time: a stream of closes never starves the others
                        for path in due:
                            del self._debounce[path]
                        batch = [("update", p) for p in due] + list(self._now)
                        self._now.clear()
                        break
                    wait = min((when for _, when in self._debounce.values()), default=now + 60.0) - now
                    self._cond.wait(max(wait, 0.001))
            for op, paths in _runs(batch):
                start = 0
                while start < len(paths):
                    # About COMMIT_S of reading per library call: a file becomes visible soon after it was
                    # read, not after the whole backlog of a burst was (the cost per path is measured).
                    size = max(BATCH_MIN, min(BATCH_MAX, int(COMMIT_S / max(self._per_path, 1e-6))))
                    chunk = paths[start : start + size]
                    began = time.monotonic()
                    self._process(op, chunk)
                    self._per_path = 0.7 * self._per_path + 0.3 * (time.monotonic() - began) / len(chunk)
                    start += len(chunk)

    def _process(self, op: str, paths: list[str]) -> None:
        if op == "scan":
            self._call(op, ["(all folders)"], lambda _paths, **_: self.library.scan())
            return
        batch = getattr(self.library, "remove_paths" if op == "remove" else "update_paths", None)
        if batch is None:  # a library with only the one-path methods: one call (and change) per path
            for path in paths:
                self._call(op, [path], getattr(self.library, f"{op}_path"), single=True)
        else:
            self._call(op, paths, batch)

    def _call(self, op: str, paths: list[str], method: Callable[..., Any], single: bool = False) -> None:
        args = Path(paths[0]) if single else [Path(p) for p in paths]
        try:
            # An event means the file changed, even when its size and mtime say otherwise.
            change = method(args) if op == "remove" else method(args, force=True)
        except Exception:
            log.exception("watcher: the library failed on %s of %d path(s), first %s", op, len(paths), paths[0])
            return
        self.processed += len(paths)
        self.calls += 1
        if change:
            where = paths[0] if len(paths) == 1 else f"{len(paths)} paths"
            log.info("embeddings: %s %s -> %s", op, where, _summary(change))
            try:
                self.on_change(change)
            except Exception:
                log.exception("watcher: announcing a library change failed")


def _runs(batch: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """Consecutive events of one kind as one run, each path once (its latest event within the run)."""
    runs: list[tuple[str, list[str]]] = []
    for op, path in batch:
        if runs and runs[-1][0] == op:
            runs[-1][1].append(path)
        else:
            runs.append((op, [path]))
    return [(op, list(dict.fromkeys(paths))) for op, paths in runs]


def _summary(change: Any, most: int = 5) -> str:
    """One log line: up to ``most`` names per kind, then how many more (a burst changes thousands)."""
    parts = []
    for key, values in change.describe().items():
        if values:
            names = [v if isinstance(v, str) else v.get("path", str(v)) for v in values[:most]]
            more = f" (+{len(values) - most} more)" if len(values) > most else ""
            parts.append(f"{key} {', '.join(names)}{more}")
    return "; ".join(parts) or "no change"
