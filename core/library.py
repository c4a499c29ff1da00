"""The embedding library: every embedding file under the configured folders, by trigger, kept current.

The library owns one record per file (what the reader made of it, its size, mtime and sha256) and derives
everything else from those records, the model's encoder widths and fixed ordering rules:

- **Triggers** follow spec section 4 (:func:`decide_trigger`); lookups are case-insensitive and accept
  ``name``, ``<name>``, ``folder/name`` and ComfyUI's ``embedding:name``.
- **Collisions** (two files, one trigger) are deterministic: the winner is the file in the earliest
  listed folder, then the shallowest, then the first by path; listing order and creation order never
  matter. A warning names every file, and each loser stays reachable by its ``qualified`` name
  (``sub/name``; ``name.pt`` style when two claimants share a folder). Files with identical vectors
  (names, shapes, dtypes, values) are no collision: they are one embedding with several ``files`` (a
  ``!convert`` copy), served from the oldest, so a copy never takes over.
- **Compatibility** (spec section 3): an embedding whose widths do not fit the model is skipped with a
  reason and not offered for completion. SD 1.x embeddings on an SDXL model are skipped, as A1111 does.
- **Scanning** is recursive, follows symlinks and refuses loops (each real directory is walked once).
  Hidden folders, hidden temporaries of :mod:`sdrepl.core.atomic` and non-embedding files are ignored.
  Unchanged files (same size and mtime_ns) are never read again.

Thread-safety and the lock: mutations (scan, update_paths, remove_paths, set_encoder_widths) may run on
several threads at once (the watcher's, a ``reload`` request's). **No lock is ever held across file
I/O**: a mutation walks folders and reads files first, with no lock, then takes the lock only to apply
what it read to the in-memory view (:class:`~sdrepl.core.library_state.LibraryView`, incremental) and
publish a new immutable snapshot. A file that is slow or never answers (a FIFO swapped in under an
embedding's name, a hung network mount) therefore never blocks other mutations, lookups or ``reload``.
Races between mutations are settled by read order: each mutation takes a sequence number when it starts
and stamps its records with it; when applying, a record read by a mutation that started later is never
replaced by an older read, and a file removed by a later mutation is not brought back by an older one.
A file whose stat changed while it was read (written again meanwhile) is read again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import os
import threading
from collections.abc import Iterator, Sequence
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
    LibraryView,
    Record,
    check_compatible,
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
        self._view = LibraryView(self.folders, dict(encoder_widths), model_label)
        self._state = LibraryState()
        self._lock = threading.Lock()  # guards the view, the snapshot, the version and the sequence numbers
        self._seq = 0
        self._running: set[int] = set()  # sequence numbers of mutations in flight
        self._gone: dict[Path, int] = {}  # path -> sequence of the mutation that removed it (while needed)

    # ------------------------------------------------------------------ mutations

    def scan(self) -> LibraryChange:
        """Rescan every folder (the ``!reload`` command); unchanged files are not read again."""
        with self._mutation() as seq:
            known, _ = self._known()
            dirs: dict[str, Path] = {}
            warnings: list[str] = []
            files: list[tuple[Path, int]] = []
            for index, root in enumerate(self.folders):
                if not root.is_dir():
                    warnings.append(f"embeddings folder {root} does not exist or is not a folder")
                    continue
                files += [(p, index) for p in self._walk(root, dirs, warnings)]
            reads = {path: self._read(path, index, known.get(path), seq) for path, index in files}
            return self._apply(seq, reads, everything=True, dirs=dirs, walk_warnings=tuple(warnings))

    def update_path(self, path: Path, *, force: bool = False) -> LibraryChange:
        """A file was created, modified or moved in (or a folder: its subtree is rescanned).

        A path that no longer exists is treated as removed (events can arrive after the fact). ``force``
        re-reads a file even when its size and mtime look unchanged: the watcher passes it for a
        closed-after-write event, since an overwrite of the same size within one clock tick keeps both.
        """
        return self.update_paths([path], force=force)

    def update_paths(self, paths: Sequence[Path], *, force: bool = False) -> LibraryChange:
        """:meth:`update_path` for many paths at once: one application, one change (a burst of events)."""
        with self._mutation() as seq:
            known, known_dirs = self._known()
            reads: dict[Path, Record | None] = {}
            rescanned: list[Path] = []
            gone: list[Path] = []
            found_dirs: dict[str, Path] = {}
            warnings: list[str] = []
            for given in dict.fromkeys(Path(os.path.abspath(p)) for p in paths):
                located = self._locate(given)
                if located is None:
                    continue
                path, index = located
                if not os.path.exists(path):
                    gone.append(path)
                elif path.is_dir():
                    rescanned.append(path)
                    dirs = {real: owner for real, owner in known_dirs.items() if not _within(owner, path)}
                    for file in self._walk(path, dirs, warnings):
                        reads[file] = self._read(file, index, known.get(file), seq)
                    found_dirs.update({real: owner for real, owner in dirs.items() if _within(owner, path)})
                elif is_candidate(path) and not self._hidden(path, index):
                    reads[path] = self._read(path, index, known.get(path), seq, force=force)
            return self._apply(seq, reads, rescanned=rescanned, removed=gone, dirs=found_dirs,
                               walk_warnings=tuple(warnings))

    def remove_path(self, path: Path) -> LibraryChange:
        """A file or a folder subtree was deleted or moved out."""
        return self.remove_paths([path])

    def remove_paths(self, paths: Sequence[Path]) -> LibraryChange:
        """:meth:`remove_path` for many paths at once (one application, one change)."""
        with self._mutation() as seq:
            located = [loc[0] for loc in (self._locate(Path(os.path.abspath(p))) for p in paths) if loc is not None]
            return self._apply(seq, {}, removed=located)

    def set_bundled(self, bundles: dict[Path, tuple[str, dict[str, EmbeddingData]]]) -> LibraryChange:
        """The embeddings LoRA files bundle: ``{lora path: (file hash, {name: data})}``, all of them.

        They are usable while their LoRA file is in its folder (A1111 1.7+), under the name stored in the
        file, and ``<lora-stem/name>`` when the name collides; a real embedding file wins a collision.
        Their records live under pseudo paths (``<lora>#<name>``) that scans and folder updates leave alone.
        """
        fresh: dict[Path, Record] = {}
        for lora, (digest, named) in sorted(bundles.items()):
            for name, data in sorted(named.items()):
                path = Path(f"{lora}#{name}")
                fresh[path] = Record(path, 0, PurePosixPath(lora.stem, name), 0, 0,
                                     data=dataclasses.replace(data, source=str(lora)), sha256=digest)
        with self._lock:
            records = self._view.records
            updates: dict[Path, Record | None] = {p: None for p, r in records.items() if _bundled(r) and p not in fresh}
            updates.update({p: r for p, r in fresh.items() if _bundle_key(records.get(p)) != _bundle_key(r)})
            return self._publish(self._view.apply(updates))

    def set_encoder_widths(self, widths: dict[str, int], model_label: str) -> LibraryChange:
        """The model changed: recheck every file's compatibility (no file is read again)."""
        with self._lock:
            self._view.widths, self._view.label = dict(widths), model_label
            return self._publish(self._view.rebuild())

    # ------------------------------------------------------------------ mutation internals

    @contextlib.contextmanager
    def _mutation(self) -> Iterator[int]:
        with self._lock:
            self._seq += 1
            seq = self._seq
            self._running.add(seq)
        try:
            yield seq
        finally:
            with self._lock:
                self._running.discard(seq)
                oldest = min(self._running, default=self._seq + 1)
                self._gone = {p: s for p, s in self._gone.items() if s > oldest}

    def _known(self) -> tuple[dict[Path, Record], dict[str, Path]]:
        """Copies of the records and walked folders, for a mutation's reads (taken under the lock)."""
        with self._lock:
            return dict(self._view.records), dict(self._view.dirs)

    def _removed_after(self, path: Path, seq: int) -> bool:
        """(Lock held.) Whether a mutation that started after ``seq`` removed ``path`` or a folder above it."""
        gone = self._gone
        return bool(gone) and any(gone.get(p, 0) > seq for p in (path, *path.parents))

    def _apply(self, seq: int, reads: dict[Path, Record | None], *, everything: bool = False,
               rescanned: Sequence[Path] = (), removed: Sequence[Path] = (), dirs: dict[str, Path] | None = None,
               walk_warnings: tuple[str, ...] = ()) -> LibraryChange:
        """Under the lock: fold what mutation ``seq`` read into the view; no I/O here.

        Records that this mutation did not read are dropped when they lie under a folder it scanned
        (``everything`` for a scan, ``rescanned``) or removed (``removed``), unless a mutation that
        started later read them. What ``removed`` names cannot be brought back by an older read.
        """
        with self._lock:
            view = self._view
            records = view.records
            updates: dict[Path, Record | None] = {}
            for top in removed:
                self._gone[top] = seq
            for path, rec in reads.items():
                current = records.get(path)
                if current is not None and current.seq > seq:
                    continue  # a mutation that started later read it: newer than ours
                if rec is None:
                    if current is not None:
                        updates[path] = None
                    continue
                if self._removed_after(path, seq):
                    continue  # removed by a mutation that started after this read began
                if rec is not current:
                    updates[path] = rec
            tops = [*rescanned, *removed]
            for top in tops:  # a file: one lookup
                current = records.get(top)
                if current is not None and top not in reads and current.seq < seq and not _bundled(current):
                    updates[top] = None
            prefixes = tuple(str(t) + os.sep for t in tops if t in rescanned or view.holds_folder(t))
            if everything or prefixes:  # a folder: every record under it
                for path, current in records.items():
                    if (path not in reads and current.seq < seq and not _bundled(current)
                            and (everything or str(path).startswith(prefixes))):
                        updates[path] = None
            if everything:
                view.dirs = dict(dirs or {})
                warnings = walk_warnings
            else:
                for real in [r for r, owner in view.dirs.items() if any(_within(owner, t) for t in tops)]:
                    del view.dirs[real]
                view.dirs.update(dirs or {})
                warnings = tuple(dict.fromkeys(view.walk_warnings + walk_warnings))
            return self._publish(view.apply(updates, warnings))

    def _publish(self, change: LibraryChange) -> LibraryChange:
        """(Lock held.) A new snapshot for readers; the version moves when something changed."""
        state = self._view.snapshot()
        if change:
            self.version += 1
        state.version = change.version = self.version
        self._state = state
        return change

    # ------------------------------------------------------------------ reads (snapshots)

    def get(self, name: str) -> Embedding | None:
        """The embedding reached by ``name`` (trigger or qualified name, any case, ``<>``/``embedding:`` ok)."""
        state = self._snapshot()
        key = _normalise(name)
        found = state.by_trigger.get(key) or state.by_qualified.get(key) or state.aliases.get(key)
        if found is None:
            stem, dot, ext = key.rpartition(".")
            if dot and f".{ext}" in EXTENSIONS:
                found = state.by_trigger.get(stem) or state.by_qualified.get(stem) or state.aliases.get(stem)
        return found

    def suggest(self, name: str, limit: int = 3) -> list[str]:
        """Close names for an unknown ``name`` (for "did you mean" in errors)."""
        names = {n.lower(): n for n in self.triggers()}
        return [names[m] for m in difflib.get_close_matches(_normalise(name), list(names), n=limit, cutoff=0.6)]

    def embeddings(self) -> list[Embedding]:
        """Every loaded embedding (collision losers included), sorted by trigger, case-insensitively."""
        return list(self._snapshot().loaded)

    def snapshot(self) -> LibraryState:
        """The current immutable view, with its ``version`` (lists and version that agree)."""
        return self._snapshot()

    def counts(self) -> tuple[int, int]:
        """(loaded, skipped) without building the sorted lists."""
        state = self._snapshot()
        return state.loaded_count, state.skipped_count

    def skipped(self) -> list[Skipped]:
        """Every file that is neither loaded nor silently ignored, with the reason."""
        return list(self._snapshot().skipped)

    def warnings(self) -> list[str]:
        """Collisions, folders that are missing or refused symlink loops."""
        return list(self._snapshot().warnings)

    def triggers(self) -> list[str]:
        """All names usable in prompts: each trigger once, plus the qualified names that differ from it."""
        return list(self._snapshot().triggers)

    @property
    def encoder_widths(self) -> dict[str, int]:
        return dict(self._view.widths)

    @property
    def model_label(self) -> str:
        return self._view.label

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

    def _read(self, path: Path, index: int, previous: Record | None, seq: int, force: bool = False) -> Record | None:
        """Read ``path`` (no lock held) unless ``previous`` is still current; None when the file is gone."""
        for _ in range(3):
            try:
                st = os.stat(path)
            except OSError:
                return None
            if not force and previous is not None and (previous.size, previous.mtime_ns, previous.root) == (st.st_size, st.st_mtime_ns, index):
                return previous
            record, read_stat = self._parse(path, index, st, seq, force)
            try:
                after = os.stat(path)
            except OSError:
                return None
            if read_stat is None or _same_file(read_stat, after):
                return record
            # Written again (or replaced) while we read it: read again, the result would be a mix of both.
        return record

    def _parse(self, path: Path, index: int, st: os.stat_result, seq: int,
               force: bool) -> tuple[Record, os.stat_result | None]:
        """The record of one file and the stat of what was read (None when nothing was read)."""
        root = str(self.folders[index])
        text = str(path)
        rel = PurePosixPath(text[len(root) + 1 :] if text.startswith(root + os.sep) else path.relative_to(root).as_posix())
        base = {"path": path, "root": index, "rel": rel, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "seq": seq}
        try:
            raw, st = _read_file_bytes(path, st)
        except NotAnEmbedding:
            return Record(**base, ignored=True), None
        except EmbeddingError as exc:
            return Record(**base, error=exc.reason), None
        base.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        sha = sha256_bytes(raw) if force else self.hash_cache.sha256(path, data=raw, stat=st)
        try:
            return Record(**base, data=read_embedding_bytes(path, raw), sha256=sha), st
        except NotAnEmbedding:
            return Record(**base, ignored=True, sha256=sha), st
        except EmbeddingError as exc:
            return Record(**base, error=exc.reason, sha256=sha), st
        except Exception as exc:  # a reader bug: the daemon stays up, the file is skipped and the bug logged
            return Record(**base, error=_read_failure(path, exc), sha256=sha), st



def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_ino, a.st_dev, a.st_size, a.st_mtime_ns) == (b.st_ino, b.st_dev, b.st_size, b.st_mtime_ns)


def _bundled(record: Record) -> bool:
    """Whether a record is an embedding bundled in a LoRA file (kept by :meth:`EmbeddingLibrary.set_bundled`)."""
    return record.data is not None and bool(record.data.source)


def _bundle_key(record: Record | None) -> tuple | None:
    """What makes a bundled record the same as before (its file's hash and its vectors' identity)."""
    if record is None:
        return None
    return (record.sha256, record.rel, tuple((k, v.shape) for k, v in sorted(record.data.vectors.items())))
