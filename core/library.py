"""The embedding library: every embedding file under the configured folders, by trigger, kept current.

The library owns one record per file (what the reader made of it, its size, mtime and sha256) and derives
everything else from those records, the model's encoder widths and fixed ordering rules:

- **Triggers** follow spec section 4 (:func:`decide_trigger`); lookups are case-insensitive and accept
  ``name``, ``<name>``, ``folder/name`` and ComfyUI's ``embedding:name``.
- **Collisions** (two files, one trigger) are deterministic: the winner is the file in the earliest
  listed folder, then the shallowest, then the first by path; listing order and creation order never
  matter. A warning names every file, and each loser stays reachable by its ``qualified`` name
  (``sub/name``; ``name.pt`` style when two claimants share a folder).
- **Compatibility** (spec section 3): an embedding whose widths do not fit the model is skipped with a
  reason and not offered for completion. SD 1.x embeddings on an SDXL model are skipped, as A1111 does.
- **Scanning** is recursive, follows symlinks and refuses loops (each real directory is walked once).
  Hidden folders, hidden temporaries of :mod:`sdrepl.core.atomic` and non-embedding files are ignored.
  Unchanged files (same size and mtime_ns) are never read again.

Thread-safety: mutations (scan, update_path, remove_path, set_encoder_widths) are serialised by one lock
and read files without holding the state lock; they build a new immutable state and swap it in. Reads
take the current state and return fresh lists, so the daemon never sees half an update.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from sdrepl.core.embedding import Embedding, EmbeddingData, Skipped
from sdrepl.core.errors import EmbeddingError
from sdrepl.core.formats import NotAnEmbedding, is_candidate, read_embedding_bytes
from sdrepl.core.formats import read_file_bytes as _read_file_bytes
from sdrepl.core.formats.common import EXTENSIONS
from sdrepl.core.hashing import HashCache, sha256_bytes
from sdrepl.core.library_state import (  # noqa: F401  (check_compatible, incompatibility: public API here too)
    LibraryChange,
    LibraryState,
    Record,
    build_state,
    check_compatible,
    diff,
    incompatibility,
)

log = logging.getLogger(__name__)


def _read_failure(path: Path, exc: Exception) -> str:
    """The skip reason for an exception no reader should raise (a bug), logged with its traceback."""
    log.error("reading %s failed unexpectedly", path, exc_info=exc)
    return (f"sdrepl could not read this file because of a bug ({type(exc).__name__}); please report it with the "
            "traceback from the daemon's log (the file may be fine in other tools)")


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _normalise(name: str) -> str:
    text = name.strip()
    if text.lower().startswith("embedding:"):
        text = text[len("embedding:"):].strip()
    text = text.removeprefix("<").removesuffix(">").strip()  # "<sty" while completing is fine too
    return text.replace("\\", "/").strip("/").lower()


class EmbeddingLibrary:
    """The embeddings under ``folders`` that fit a model with ``encoder_widths`` (see module docstring)."""

    def __init__(
        self,
        folders: Sequence[Path],
        encoder_widths: dict[str, int],
        *,
        model_label: str = "SD 1.x",
        hash_cache: HashCache | None = None,
    ) -> None:
        self.folders: list[Path] = [Path(os.path.abspath(Path(f).expanduser())) for f in folders]
        self.version = 0
        self.hash_cache = hash_cache if hash_cache is not None else HashCache()
        self._widths = dict(encoder_widths)
        self._label = model_label
        self._state = LibraryState()
        #: Embeddings bundled in LoRA files (see :meth:`set_bundled`), as records under pseudo paths.
        self._bundled: dict[Path, Record] = {}
        self._lock = threading.Lock()  # guards the swap of _state / version
        self._write_lock = threading.RLock()  # serialises mutations

    # ------------------------------------------------------------------ mutations

    def scan(self) -> LibraryChange:
        """Rescan every folder (the ``!reload`` command); unchanged files are not read again."""
        with self._write_lock:
            old = self._state
            dirs: dict[str, Path] = {}
            warnings: list[str] = []
            files: list[tuple[Path, int]] = []
            for index, root in enumerate(self.folders):
                if not root.is_dir():
                    warnings.append(f"embeddings folder {root} does not exist or is not a folder")
                    continue
                files += [(p, index) for p in self._walk(root, dirs, warnings)]
            records = {}
            for path, index in files:
                record = self._record(path, index, old.records.get(path))
                if record is not None:
                    records[path] = record
            return self._commit(old, records, dirs, tuple(warnings))

    def update_path(self, path: Path, *, force: bool = False) -> LibraryChange:
        """A file was created, modified or moved in (or a folder: its subtree is rescanned).

        A path that no longer exists is treated as removed (events can arrive after the fact). ``force``
        re-reads a file even when its size and mtime look unchanged: the watcher passes it for a
        closed-after-write event, since an overwrite of the same size within one clock tick keeps both.
        """
        path = Path(os.path.abspath(path))
        if not path.exists():
            return self.remove_path(path)
        with self._write_lock:
            old = self._state
            located = self._locate(path)
            if located is None:
                return LibraryChange()
            path, index = located
            records = dict(old.records)
            dirs = dict(old.dirs)
            warnings = list(old.walk_warnings)
            if path.is_dir():
                for real in [r for r, owner in dirs.items() if _within(owner, path)]:
                    del dirs[real]
                found = set(self._walk(path, dirs, warnings))
                for stale in [p for p in records if _within(p, path) and p not in found]:
                    del records[stale]
                candidates = sorted(found)
            else:
                if not is_candidate(path) or self._hidden(path, index):
                    return LibraryChange()
                candidates = [path]
            for file in candidates:
                record = self._record(file, index, records.get(file), force=force and not path.is_dir())
                if record is None:
                    records.pop(file, None)
                else:
                    records[file] = record
            return self._commit(old, records, dirs, tuple(dict.fromkeys(warnings)))

    def remove_path(self, path: Path) -> LibraryChange:
        """A file or a folder subtree was deleted or moved out."""
        path = Path(os.path.abspath(path))
        with self._write_lock:
            old = self._state
            located = self._locate(path)
            if located is None:
                return LibraryChange()
            path = located[0]
            records = {p: r for p, r in old.records.items() if not _within(p, path)}
            dirs = {real: owner for real, owner in old.dirs.items() if not _within(owner, path)}
            return self._commit(old, records, dirs, old.walk_warnings)

    def set_encoder_widths(self, widths: dict[str, int], model_label: str) -> LibraryChange:
        """The model changed: recheck every file's compatibility (no file is read again)."""
        with self._write_lock:
            self._widths, self._label = dict(widths), model_label
            old = self._state
            return self._commit(old, dict(old.records), dict(old.dirs), old.walk_warnings)

    # ------------------------------------------------------------------ reads (snapshots)

    def get(self, name: str) -> Embedding | None:
        """The embedding reached by ``name`` (trigger or qualified name, any case, ``<>``/``embedding:`` ok)."""
        state = self._snapshot()
        key = _normalise(name)
        found = state.by_trigger.get(key) or state.by_qualified.get(key)
        if found is None:
            stem, dot, ext = key.rpartition(".")
            if dot and f".{ext}" in EXTENSIONS:
                found = state.by_trigger.get(stem) or state.by_qualified.get(stem)
        return found

    def suggest(self, name: str, limit: int = 3) -> list[str]:
        """Close names for an unknown ``name`` (for "did you mean" in errors)."""
        names = {n.lower(): n for n in self.triggers()}
        return [names[m] for m in difflib.get_close_matches(_normalise(name), list(names), n=limit, cutoff=0.6)]

    def embeddings(self) -> list[Embedding]:
        """Every loaded embedding (collision losers included), sorted by trigger, case-insensitively."""
        return list(self._snapshot().loaded)

    def skipped(self) -> list[Skipped]:
        """Every file that is neither loaded nor silently ignored, with the reason."""
        return list(self._snapshot().skipped)

    def warnings(self) -> list[str]:
        """Collisions, folders that are missing or refused symlink loops."""
        return list(self._snapshot().warnings)

    def triggers(self) -> list[str]:
        """All names usable in prompts: each trigger once, plus the qualified names that differ from it."""
        state = self._snapshot()
        names = {emb.trigger: None for emb in state.by_trigger.values()}
        names.update({emb.qualified: None for emb in state.loaded if emb.qualified.lower() != emb.key})
        return sorted(names, key=str.lower)

    @property
    def encoder_widths(self) -> dict[str, int]:
        return dict(self._widths)

    @property
    def model_label(self) -> str:
        return self._label

    # ------------------------------------------------------------------ internals

    def _snapshot(self) -> LibraryState:
        with self._lock:
            return self._state

    def _locate(self, path: Path) -> tuple[Path, int] | None:
        """(path under its root, root index) for a path inside a folder, also when given its real path."""
        for index, root in enumerate(self.folders):
            if _within(path, root):
                return path, index
        real = Path(os.path.realpath(path))
        for index, root in enumerate(self.folders):
            real_root = Path(os.path.realpath(root))
            if _within(real, real_root):
                return root / real.relative_to(real_root), index
        return None

    def _hidden(self, path: Path, index: int) -> bool:
        rel = path.relative_to(self.folders[index])
        return any(part.startswith(".") for part in rel.parts[:-1])

    def _walk(self, top: Path, dirs: dict[str, Path], warnings: list[str]) -> list[Path]:
        """Candidate files under ``top``, visiting each real directory once (refusing loops).

        Real subfolders are walked before symlinked ones, so a folder reachable both ways is indexed under
        its own path; within each kind the order is by name, so the result never depends on listing order.
        """
        files: list[Path] = []
        stack, links = [top], []
        while stack or links:
            folder = stack.pop() if stack else links.pop(0)
            real = os.path.realpath(folder)
            if real in dirs:
                warnings.append(f"{folder} leads to {dirs[real]}, which is already scanned: not followed "
                                "(symlink loop or second link)")
                continue
            dirs[real] = folder
            try:
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                warnings.append(f"cannot list {folder}: {exc.strerror or exc}")
                continue
            subfolders = []
            for entry in entries:
                try:
                    if entry.is_dir():
                        if entry.name.startswith("."):
                            continue
                        if entry.is_symlink():
                            links.append(Path(entry.path))
                        else:
                            subfolders.append(Path(entry.path))
                    elif is_candidate(entry.name) and entry.is_file():
                        files.append(Path(entry.path))
                except OSError:  # a dangling or unreadable link: nothing to load
                    continue
            stack.extend(reversed(subfolders))
        return files

    def _record(self, path: Path, index: int, previous: Record | None, force: bool = False) -> Record | None:
        """Read ``path`` unless ``previous`` is still current (or ``force``); None when the file is gone."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        if not force and previous is not None and (previous.size, previous.mtime_ns, previous.root) == (st.st_size, st.st_mtime_ns, index):
            return previous
        root = str(self.folders[index])
        text = str(path)
        rel = PurePosixPath(text[len(root) + 1 :] if text.startswith(root + os.sep) else path.relative_to(root).as_posix())
        base = {"path": path, "root": index, "rel": rel, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        try:
            raw, st = _read_file_bytes(path, st)
        except NotAnEmbedding:
            return Record(**base, ignored=True)
        except EmbeddingError as exc:
            return Record(**base, error=exc.reason)
        sha = sha256_bytes(raw) if force else self.hash_cache.sha256(path, data=raw, stat=st)
        try:
            return Record(**base, data=read_embedding_bytes(path, raw), sha256=sha)
        except NotAnEmbedding:
            return Record(**base, ignored=True, sha256=sha)
        except EmbeddingError as exc:
            return Record(**base, error=exc.reason, sha256=sha)
        except Exception as exc:  # a reader bug: the daemon stays up, the file is skipped and the bug logged
            return Record(**base, error=_read_failure(path, exc), sha256=sha)

    def set_bundled(self, bundles: dict[Path, tuple[str, dict[str, EmbeddingData]]]) -> LibraryChange:
        """The embeddings LoRA files bundle: ``{lora path: (file hash, {name: data})}``, all of them.

        They are usable while their LoRA file is in its folder (A1111 1.7+), under the name stored in the
        file, and ``<lora-stem/name>`` when the name collides; a real embedding file wins a collision.
        """
        with self._write_lock:
            fresh: dict[Path, Record] = {}
            for lora, (digest, named) in sorted(bundles.items()):
                for name, data in sorted(named.items()):
                    path = Path(f"{lora}#{name}")
                    fresh[path] = Record(path, 0, PurePosixPath(lora.stem, name), 0, 0,
                                         data=dataclasses.replace(data, source=str(lora)), sha256=digest)
            self._bundled = fresh
            old = self._state
            return self._commit(old, dict(old.records), dict(old.dirs), old.walk_warnings)

    def _commit(self, old: LibraryState, records: dict[Path, Record], dirs: dict[str, Path], walk: tuple[str, ...]):
        records = {p: r for p, r in records.items() if r.data is None or not r.data.source}
        records.update(self._bundled)
        new = build_state(records, dirs, walk, self._widths, self._label, self.folders)
        change = diff(old, new)
        with self._lock:
            self._state = new
            if change:
                self.version += 1
        return change
