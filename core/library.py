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

import difflib
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch

from sdrepl.core.embedding import CLIP_G, CLIP_L, SINGLE, Embedding, EmbeddingData, Skipped
from sdrepl.core.errors import EmbeddingError, IncompatibleEmbedding
from sdrepl.core.formats import NotAnEmbedding, decide_trigger, is_candidate, read_embedding_bytes
from sdrepl.core.formats import read_file_bytes as _read_file_bytes
from sdrepl.core.formats.common import EXTENSIONS
from sdrepl.core.hashing import HashCache, sha256_bytes


def incompatibility(data: EmbeddingData, widths: dict[str, int], model_label: str) -> str | None:
    """Why ``data`` does not fit a model with these encoder widths (spec section 3), or None if it fits."""
    have = data.widths
    if have == widths:
        return None
    if set(have) == {SINGLE}:
        width = have[SINGLE]
        if SINGLE in widths:
            return f"{width}-wide embedding, model expects {widths[SINGLE]} ({model_label})"
        if widths.get(CLIP_L) == width:
            return (f"{width}-wide single-encoder (SD 1.x) embedding on an {model_label} model: skipped, as A1111 "
                    f"does; {model_label} embeddings carry clip_l and clip_g vectors")
        return f"{width}-wide embedding, model expects " + " + ".join(f"{k} {w}" for k, w in widths.items())
    if set(have) == {CLIP_L, CLIP_G}:
        pair = f"clip_l {have[CLIP_L]} + clip_g {have[CLIP_G]}"
        if SINGLE in widths:
            return f"SDXL embedding ({pair}), model expects one {widths[SINGLE]}-wide encoder ({model_label})"
        return f"{pair} embedding, model expects " + " + ".join(f"{k} {w}" for k, w in widths.items())
    return f"embedding for encoders {have}, model has {widths} ({model_label})"


def check_compatible(path: Path, data: EmbeddingData, widths: dict[str, int], model_label: str) -> None:
    """Raise IncompatibleEmbedding (with the reason) when ``data`` does not fit the model."""
    reason = incompatibility(data, widths, model_label)
    if reason is not None:
        raise IncompatibleEmbedding(path, reason)


@dataclass
class LibraryChange:
    """What one mutation changed: names by which embeddings are reachable, new skips, new warnings."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    unskipped: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {
            "added": list(self.added),
            "updated": list(self.updated),
            "removed": list(self.removed),
            "skipped": [s.describe() for s in self.skipped],
            "unskipped": [str(p) for p in self.unskipped],
            "warnings": list(self.warnings),
        }

    def __bool__(self) -> bool:
        return any((self.added, self.updated, self.removed, self.skipped, self.unskipped, self.warnings))


@dataclass(frozen=True)
class _Record:
    """One file as last read. ``ignored`` files (previews, empty files) are kept so they are not re-read."""

    path: Path
    root: int
    rel: PurePosixPath
    size: int
    mtime_ns: int
    data: EmbeddingData | None = None
    error: str | None = None
    ignored: bool = False
    sha256: str = ""

    def order(self) -> tuple:
        """Collision precedence: earlier folder, then shallower, then path (case-insensitive, then exact)."""
        return (self.root, len(self.rel.parts), str(self.rel).casefold(), str(self.rel))


@dataclass(frozen=True)
class _State:
    records: dict[Path, _Record] = field(default_factory=dict)
    dirs: dict[str, Path] = field(default_factory=dict)  # real dir -> the path it was walked as
    walk_warnings: tuple[str, ...] = ()
    loaded: tuple[Embedding, ...] = ()
    by_trigger: dict[str, Embedding] = field(default_factory=dict)
    by_qualified: dict[str, Embedding] = field(default_factory=dict)
    reach: dict[Path, str] = field(default_factory=dict)  # path -> the name that reaches it
    skipped: tuple[Skipped, ...] = ()
    warnings: tuple[str, ...] = ()


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _normalise(name: str) -> str:
    text = name.strip()
    if text.lower().startswith("embedding:"):
        text = text[len("embedding:"):].strip()
    text = text.removeprefix("<").removesuffix(">").strip()  # "<sty" while completing is fine too
    return text.replace("\\", "/").strip("/").lower()


def _subsequence_span(query: str, name: str) -> int | None:
    """Length of the shortest-start greedy window of ``name`` containing ``query`` in order, or None."""
    pos, start = 0, None
    for char in query:
        pos = name.find(char, pos)
        if pos < 0:
            return None
        start = pos if start is None else start
        pos += 1
    return pos - (start or 0)


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
        self._state = _State()
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

    def search(self, text: str, limit: int = 50) -> list[Embedding]:
        """Completion: prefix matches first, then substring matches, then subsequence (fuzzy) matches."""
        state = self._snapshot()
        query = _normalise(text)
        ranked: list[tuple[tuple, Embedding]] = []
        for emb in state.loaded:
            name = state.reach[emb.path].lower()
            if name.startswith(query):
                rank: tuple = (0, 0, name)
            elif query in name:
                rank = (1, name.index(query), name)
            else:
                span = _subsequence_span(query, name)
                if span is None:
                    continue
                rank = (2, span, name)
            ranked.append((rank, emb))
        ranked.sort(key=lambda item: item[0])
        return [emb for _, emb in ranked[:limit]]

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

    def _snapshot(self) -> _State:
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

    def _record(self, path: Path, index: int, previous: _Record | None, force: bool = False) -> _Record | None:
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
            return _Record(**base, ignored=True)
        except EmbeddingError as exc:
            return _Record(**base, error=exc.reason)
        sha = sha256_bytes(raw) if force else self.hash_cache.sha256(path, data=raw, stat=st)
        try:
            return _Record(**base, data=read_embedding_bytes(path, raw), sha256=sha)
        except NotAnEmbedding:
            return _Record(**base, ignored=True, sha256=sha)
        except EmbeddingError as exc:
            return _Record(**base, error=exc.reason, sha256=sha)

    def _commit(self, old: _State, records: dict[Path, _Record], dirs: dict[str, Path], walk: tuple[str, ...]):
        new = _build_state(records, dirs, walk, self._widths, self._label, self.folders)
        change = _diff(old, new)
        with self._lock:
            self._state = new
            if change:
                self.version += 1
        return change


# ---------------------------------------------------------------------- deriving the state from records


def _name_options(rec: _Record, trigger: str, roots: list[Path]) -> list[str]:
    """Qualified names from least to most specific; a collision moves the later claimant down this list."""
    parent = str(rec.rel.parent)
    first = trigger if parent == "." else f"{parent}/{trigger}"
    return [first, str(rec.rel), f"{roots[rec.root].name}/{rec.rel}", str(rec.path)]


def _qualify(claims: list[tuple[_Record, str]], roots: list[Path]) -> dict[Path, str]:
    """A unique (case-insensitive) qualified name per record; earlier records keep the simpler names."""
    options = {rec.path: _name_options(rec, trigger, roots) for rec, trigger in claims}
    level = dict.fromkeys(options, 0)
    while True:
        taken: dict[str, list[Path]] = {}
        for rec, _ in claims:
            taken.setdefault(options[rec.path][level[rec.path]].lower(), []).append(rec.path)
        moved = False
        for paths in taken.values():
            for path in paths[1:]:
                if level[path] < len(options[path]) - 1:
                    level[path] += 1
                    moved = True
        if not moved:
            return {path: options[path][level[path]] for path in options}


def _same_vectors(records: list[_Record]) -> bool:
    first = records[0].data.vectors
    return all(
        rec.data.vectors.keys() == first.keys() and all(torch.equal(rec.data.vectors[k], first[k]) for k in first)
        for rec in records[1:]
    )


def _build_state(records, dirs, walk_warnings, widths, label, roots) -> _State:
    skipped: list[Skipped] = []
    claims: list[tuple[_Record, str]] = []
    for rec in sorted(records.values(), key=_Record.order):
        if rec.ignored:
            continue
        reason = rec.error if rec.error is not None else incompatibility(rec.data, widths, label)
        if reason is not None:
            skipped.append(Skipped(rec.path, reason))
        else:
            claims.append((rec, decide_trigger(rec.path, rec.data)))
    qualified = _qualify(claims, roots)
    groups: dict[str, list[tuple[_Record, str]]] = {}
    for rec, trigger in claims:
        groups.setdefault(trigger.lower(), []).append((rec, trigger))
    by_trigger, by_qualified, reach, loaded, warnings = {}, {}, {}, [], []
    for key in sorted(groups):
        group = groups[key]
        note = ()
        if len(group) > 1:
            same = " (identical vectors)" if _same_vectors([rec for rec, _ in group]) else ""
            others = "; ".join(f"{rec.path} is reachable as <{qualified[rec.path]}>" for rec, _ in group[1:])
            note = (f"{len(group)} files claim the trigger '{group[0][1]}'{same}: using {group[0][0].path}; {others}",)
            warnings.extend(note)
        for position, (rec, trigger) in enumerate(group):
            emb = Embedding(trigger, qualified[rec.path], rec.path, rec.data, rec.sha256, rec.size, rec.mtime_ns, note)
            if position == 0:
                by_trigger[key] = emb
            by_qualified[emb.qualified.lower()] = emb
            reach[rec.path] = trigger if position == 0 else emb.qualified
            loaded.append(emb)
    loaded.sort(key=lambda e: (e.key, e.qualified.lower(), str(e.path)))
    return _State(records, dirs, tuple(walk_warnings), tuple(loaded), by_trigger, by_qualified, reach,
                  tuple(skipped), tuple(walk_warnings) + tuple(warnings))


def _diff(old: _State, new: _State) -> LibraryChange:
    before = {e.path: e for e in old.loaded}
    after = {e.path: e for e in new.loaded}

    def changed(path: Path) -> bool:
        a, b = before[path], after[path]
        content = a.sha256 != b.sha256 if a.sha256 and b.sha256 else a.data is not b.data
        return content or old.reach[path] != new.reach[path] or a.qualified != b.qualified

    old_skips, new_skips = set(old.skipped), {s.path for s in new.skipped}
    return LibraryChange(
        added=sorted((new.reach[p] for p in after if p not in before), key=str.lower),
        updated=sorted((new.reach[p] for p in after if p in before and changed(p)), key=str.lower),
        removed=sorted((old.reach[p] for p in before if p not in after), key=str.lower),
        skipped=[s for s in new.skipped if s not in old_skips],
        unskipped=sorted({s.path for s in old.skipped} - new_skips),
        warnings=[w for w in new.warnings if w not in set(old.warnings)],
    )
