"""The LoRA (and hypernetwork) library: every file under the configured folders, by name, kept current.

It follows the embedding library's rules (``core/library.py``) so users meet one behaviour:

- **Names** are the file stem (A1111's ``<lora:stem:w>``); a generic stem (PEFT's ``adapter_model``,
  diffusers' ``pytorch_lora_weights``) takes its folder's name. Lookups are case-insensitive and accept
  ``folder/name``. Collisions are deterministic (earliest folder, then shallowest, then path) and each
  loser stays reachable by a qualified name, with a warning naming every file.
- **Skipped with a reason**: a file that cannot be read, has no known layout, or does not fit the model
  is listed with why; hidden folders, our own temporaries and other extensions are ignored silently.
- **Cheap index**: only headers are read (see :mod:`.index`); unchanged files (size, mtime_ns) are never
  read again; tensors are read when a LoRA is first applied and the converted factors are kept in a
  host-memory cache bounded in bytes (least recently used first out).

It implements what :class:`sdrepl.daemon.watcher.FolderWatcher` needs (``update_path`` / ``remove_path``
returning a :class:`~sdrepl.core.library_state.LibraryChange`), so a second watcher keeps it live.
Thread-safety: mutations are serialised and swap in a new immutable state; reads take a snapshot.
"""

from __future__ import annotations

import difflib
import os
import stat as stat_module
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from sdrepl.core.atomic import is_temp_name
from sdrepl.core.embedding import Skipped
from sdrepl.core.errors import NetworkError
from sdrepl.core.library_state import LibraryChange, _qualify
from sdrepl.core.networks.container import NETWORK_EXTENSIONS, read_header, read_tensors
from sdrepl.core.networks.deltas import HostDelta, host_delta
from sdrepl.core.networks.modules import ModelSignature
from sdrepl.core.safe_open import file_kind

GENERIC_STEMS = frozenset({"adapter_model", "pytorch_lora_weights", "lora", "model", "pytorch_model",
                           "diffusion_pytorch_model"})
#: Default bound of the host-memory cache of parsed deltas.
DEFAULT_CACHE_BYTES = 2 * 2**30


def network_name(rel: PurePosixPath) -> str:
    stem = rel.name.rsplit(".", 1)[0]
    if stem.lower() in GENERIC_STEMS and len(rel.parts) > 1:
        return rel.parts[-2]
    return stem


def is_network_candidate(name: str) -> bool:
    base = os.path.basename(name)
    if base.startswith(".") or is_temp_name(base):
        return False
    return os.path.splitext(base)[1].lower() in NETWORK_EXTENSIONS


@dataclass(frozen=True)
class NetRecord:
    path: Path
    root: int
    rel: PurePosixPath
    size: int
    mtime_ns: int
    info: Any = None  # what the indexer returned
    error: str | None = None

    def order(self) -> tuple:
        return (self.root, len(self.rel.parts), str(self.rel).casefold(), str(self.rel))


@dataclass(frozen=True)
class Network:
    """One loaded file as the library serves it."""

    name: str
    qualified: str
    path: Path
    info: Any
    size: int
    mtime_ns: int
    warnings: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """Identity of this version of the file (a replaced file is a new network)."""
        return f"{self.path}:{self.size}:{self.mtime_ns}"


@dataclass(frozen=True)
class _State:
    records: dict[Path, NetRecord] = field(default_factory=dict)
    loaded: tuple[Network, ...] = ()
    by_name: dict[str, Network] = field(default_factory=dict)
    by_qualified: dict[str, Network] = field(default_factory=dict)
    reach: dict[Path, str] = field(default_factory=dict)
    skipped: tuple[Skipped, ...] = ()
    warnings: tuple[str, ...] = ()


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


class NetworkLibrary:
    """Files under ``folders`` indexed by ``indexer(path, signature) -> info`` (raises NetworkError)."""

    def __init__(self, folders: Sequence[Path], signature: ModelSignature | None,
                 indexer: Callable[[Path, ModelSignature | None], Any], *, kind: str = "LoRA",
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.folders = [Path(os.path.abspath(Path(f).expanduser())) for f in folders]
        self.kind = kind
        self.version = 0
        self._sig = signature
        self._indexer = indexer
        self._state = _State()
        self._lock = threading.Lock()
        self._write_lock = threading.RLock()
        self._cache: OrderedDict[str, tuple[int, dict]] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cache_lock = threading.Lock()
        #: Called with the library after every change (the daemon re-syncs bundled embeddings here).
        self.listeners: list[Callable[[NetworkLibrary], None]] = []

    # --- mutations --------------------------------------------------------------------------------

    def scan(self) -> LibraryChange:
        with self._write_lock:
            old = self._state
            records: dict[Path, NetRecord] = {}
            warnings = []
            for index, root in enumerate(self.folders):
                if not root.is_dir():
                    warnings.append(f"{self.kind} folder {root} does not exist or is not a folder")
                    continue
                for path in self._walk(root):
                    rec = self._record(path, index, old.records.get(path))
                    if rec is not None:
                        records[path] = rec
            return self._commit(old, records, warnings)

    def update_path(self, path: Path, *, force: bool = False) -> LibraryChange:
        path = Path(os.path.abspath(path))
        if not path.exists():
            return self.remove_path(path)
        with self._write_lock:
            old = self._state
            index = self._root_of(path)
            if index is None:
                return LibraryChange()
            records = dict(old.records)
            if path.is_dir():
                found = set(self._walk(path))
                for stale in [p for p in records if _within(p, path) and p not in found]:
                    del records[stale]
                files = sorted(found)
            else:
                if not is_network_candidate(path.name) or self._hidden(path, index):
                    return LibraryChange()
                files = [path]
            for file in files:
                rec = self._record(file, index, records.get(file), force=force and not path.is_dir())
                if rec is None:
                    records.pop(file, None)
                else:
                    records[file] = rec
            return self._commit(old, records, list(old.warnings))

    def remove_path(self, path: Path) -> LibraryChange:
        path = Path(os.path.abspath(path))
        with self._write_lock:
            old = self._state
            records = {p: r for p, r in old.records.items() if not _within(p, path)}
            if len(records) == len(old.records):
                return LibraryChange()
            return self._commit(old, records, list(old.warnings))

    def set_signature(self, signature: ModelSignature) -> LibraryChange:
        """The model changed: index every file again against it (headers only)."""
        with self._write_lock:
            self._sig = signature
            old = self._state
            records = {}
            for path, rec in old.records.items():
                fresh = self._record(path, rec.root, None)
                if fresh is not None:
                    records[path] = fresh
            return self._commit(old, records, list(old.warnings))

    def mark_broken(self, net: Network, reason: str) -> LibraryChange:
        """A file failed when first applied (NaN tensors, changed on disk): skip it from now on."""
        with self._write_lock:
            old = self._state
            rec = old.records.get(net.path)
            if rec is None or (rec.size, rec.mtime_ns) != (net.size, net.mtime_ns):
                return LibraryChange()
            records = dict(old.records)
            records[net.path] = NetRecord(rec.path, rec.root, rec.rel, rec.size, rec.mtime_ns, error=reason)
            return self._commit(old, records, list(old.warnings))

    # --- reads ------------------------------------------------------------------------------------

    def _snapshot(self) -> _State:
        with self._lock:
            return self._state

    def get(self, name: str) -> Network | None:
        state = self._snapshot()
        key = name.strip().replace("\\", "/").strip("/").lower()
        found = state.by_name.get(key) or state.by_qualified.get(key)
        if found is None and "." in key:
            stem = key.rsplit(".", 1)[0]
            found = state.by_name.get(stem) or state.by_qualified.get(stem)
        return found

    def suggest(self, name: str, limit: int = 3) -> list[str]:
        names = {net.name.lower(): net.name for net in self._snapshot().by_name.values()}
        return [names[m] for m in difflib.get_close_matches(name.strip().lower(), list(names), n=limit, cutoff=0.5)]

    def names(self) -> list[str]:
        state = self._snapshot()
        out = {net.name: None for net in state.by_name.values()}
        out.update({net.qualified: None for net in state.loaded if net.qualified.lower() != net.name.lower()})
        return sorted(out, key=str.lower)

    def search(self, text: str, limit: int = 50) -> list[Network]:
        state = self._snapshot()
        query = text.strip().lower()
        ranked = []
        for net in state.loaded:
            name = state.reach[net.path].lower()
            if name.startswith(query):
                ranked.append(((0, name), net))
            elif query in name:
                ranked.append(((1, name.index(query), name), net))
        ranked.sort(key=lambda item: item[0])
        return [net for _, net in ranked[:limit]]

    def networks(self) -> list[Network]:
        return list(self._snapshot().loaded)

    def skipped(self) -> list[Skipped]:
        return list(self._snapshot().skipped)

    def warnings(self) -> list[str]:
        return list(self._snapshot().warnings)

    def reach_name(self, net: Network) -> str:
        return self._snapshot().reach.get(net.path, net.qualified)

    @property
    def signature(self) -> ModelSignature | None:
        return self._sig

    # --- tensors (first use) ----------------------------------------------------------------------

    def deltas(self, net: Network) -> dict[tuple[str, str], HostDelta]:
        """The host deltas of a LoRA's matched groups, from the bounded cache or read now."""
        with self._cache_lock:
            hit = self._cache.get(net.key)
            if hit is not None:
                self._cache.move_to_end(net.key)
                return hit[1]
        info = net.info
        try:
            header = read_header(net.path)
            st = os.stat(net.path)
        except OSError as exc:
            raise NetworkError(net.path, f"cannot read the file ({exc.strerror or exc})") from None
        if (st.st_size, st.st_mtime_ns) != (net.size, net.mtime_ns):
            raise NetworkError(net.path, "the file changed since it was indexed; it is being read again, retry")
        wanted = [key for group, _ in info.matched.targets for key in group.keys.values()]
        tensors = read_tensors(net.path, header, wanted)
        deltas = {target: host_delta(net.path, group, tensors) for group, target in info.matched.targets}
        size = sum(d.nbytes for d in deltas.values())
        with self._cache_lock:
            self._cache[net.key] = (size, deltas)
            total = sum(s for s, _ in self._cache.values())
            while total > self._cache_bytes and len(self._cache) > 1:
                _, (dropped, _) = self._cache.popitem(last=False)
                total -= dropped
        return deltas

    @property
    def cache_bytes(self) -> int:
        with self._cache_lock:
            return sum(s for s, _ in self._cache.values())

    def cached(self, net: Network) -> bool:
        with self._cache_lock:
            return net.key in self._cache

    # --- internals --------------------------------------------------------------------------------

    def _root_of(self, path: Path) -> int | None:
        for index, root in enumerate(self.folders):
            if _within(path, root):
                return index
        return None

    def _hidden(self, path: Path, index: int) -> bool:
        rel = path.relative_to(self.folders[index])
        return any(part.startswith(".") for part in rel.parts[:-1])

    def _walk(self, top: Path) -> list[Path]:
        files, seen = [], set()
        for folder, dirs, names in os.walk(top, followlinks=True):
            real = os.path.realpath(folder)
            if real in seen:
                dirs[:] = []
                continue
            seen.add(real)
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            # Not only regular files: a FIFO or device named like a LoRA is listed so that it is skipped
            # with a reason (never opened), instead of vanishing without a word.
            files += [Path(folder) / n for n in sorted(names) if is_network_candidate(n)
                      and not os.path.isdir(os.path.join(folder, n))]
        return files

    def _record(self, path: Path, index: int, previous: NetRecord | None, force: bool = False) -> NetRecord | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        if not stat_module.S_ISREG(st.st_mode):
            rel = PurePosixPath(path.relative_to(self.folders[index]).as_posix())
            return NetRecord(path, index, rel, 0, st.st_mtime_ns,
                             error=f"{file_kind(st.st_mode)}, not a regular file: not opened")
        if st.st_size == 0:
            return None  # still being written: its close event follows
        if not force and previous is not None and (previous.size, previous.mtime_ns, previous.root) == (
                st.st_size, st.st_mtime_ns, index):
            return previous
        rel = PurePosixPath(path.relative_to(self.folders[index]).as_posix())
        try:
            info = self._indexer(path, self._sig)
            return NetRecord(path, index, rel, st.st_size, st.st_mtime_ns, info=info)
        except NetworkError as exc:
            return NetRecord(path, index, rel, st.st_size, st.st_mtime_ns, error=exc.reason)
        except Exception as exc:  # an indexer bug must not take the daemon down: still the file's skip reason
            return NetRecord(path, index, rel, st.st_size, st.st_mtime_ns,
                             error=f"cannot read the file ({type(exc).__name__}: {exc})")

    def _commit(self, old: _State, records: dict[Path, NetRecord], walk_warnings: list[str]) -> LibraryChange:
        walk_warnings = [w for w in walk_warnings if w.endswith("is not a folder")]
        new = self._build(records, walk_warnings)
        before = {n.path: n for n in old.loaded}
        after = {n.path: n for n in new.loaded}
        old_skips = set(old.skipped)
        change = LibraryChange(
            added=sorted((new.reach[p] for p in after if p not in before), key=str.lower),
            updated=sorted((new.reach[p] for p in after if p in before and (
                before[p].key != after[p].key or old.reach[p] != new.reach[p])), key=str.lower),
            removed=sorted((old.reach[p] for p in before if p not in after), key=str.lower),
            skipped=[s for s in new.skipped if s not in old_skips],
            unskipped=sorted({s.path for s in old.skipped} - {s.path for s in new.skipped}),
            warnings=[w for w in new.warnings if w not in set(old.warnings)],
        )
        with self._lock:
            self._state = new
            if change:
                self.version += 1
        if change:
            with self._cache_lock:
                live = {n.key for n in new.loaded}
                for key in [k for k in self._cache if k not in live]:
                    del self._cache[key]
            for listener in list(self.listeners):
                listener(self)
        return change

    def _build(self, records: dict[Path, NetRecord], walk_warnings: list[str]) -> _State:
        skipped, claims = [], []
        for rec in sorted(records.values(), key=NetRecord.order):
            if rec.error is not None:
                skipped.append(Skipped(rec.path, rec.error))
            else:
                claims.append((rec, network_name(rec.rel)))
        qualified = _qualify(claims, self.folders)
        groups: dict[str, list[tuple[NetRecord, str]]] = {}
        for rec, name in claims:
            groups.setdefault(name.lower(), []).append((rec, name))
        by_name, by_qualified, reach, loaded, warnings = {}, {}, {}, [], list(walk_warnings)
        for key in sorted(groups):
            group = groups[key]
            note: tuple[str, ...] = ()
            if len(group) > 1:
                others = "; ".join(f"{r.path} is reachable as {qualified[r.path]}" for r, _ in group[1:])
                note = (f"{len(group)} {self.kind} files are called '{group[0][1]}': using {group[0][0].path}; {others}",)
                warnings.extend(note)
            for position, (rec, name) in enumerate(group):
                own = tuple(getattr(rec.info, "warnings", ()) or ())
                net = Network(name, qualified[rec.path], rec.path, rec.info, rec.size, rec.mtime_ns, note + own)
                if position == 0:
                    by_name[key] = net
                by_qualified[net.qualified.lower()] = net
                reach[rec.path] = name if position == 0 else net.qualified
                loaded.append(net)
        loaded.sort(key=lambda n: (n.name.lower(), n.qualified.lower(), str(n.path)))
        return _State(records, tuple(loaded), by_name, by_qualified, reach, tuple(skipped), tuple(warnings))
