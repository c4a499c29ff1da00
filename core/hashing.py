"""sha256 of files, cached by (path, size, mtime_ns).

A1111 writes ``TI hashes: name: <first 12 hex of the file's sha256>`` into picture metadata, which lets a
picture be traced to the exact embedding file. Hashing a small embedding is cheap, but the library rescans
whole folders on ``!reload`` and on every watcher event, so each file is hashed once per version: a file
whose size and modification time are unchanged keeps its hash. Callers that already hold the file's bytes
(the library reads them to parse the file) pass them in, so the file is read only once.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

_CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_stream(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


class HashCache:
    """A thread-safe cache of file hashes keyed by ``(absolute path, size, mtime_ns)``.

    ``hits`` and ``misses`` count lookups, so tests and benchmarks can see that unchanged files are not
    hashed again. The cache is bounded (oldest entries are dropped first).
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self._entries: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()
        self._max = max_entries
        self.hits = 0
        self.misses = 0

    def sha256(
        self,
        path: Path | str,
        *,
        data: bytes | None = None,
        stat: os.stat_result | None = None,
    ) -> str:
        """The hex sha256 of ``path``; ``data`` (its bytes) and ``stat`` save a read and a stat when given.

        Raises ``OSError`` when the file cannot be read (callers wrap it in their own error).
        """
        st = stat if stat is not None else os.stat(path)
        key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self.hits += 1
                return found
            self.misses += 1
        digest = sha256_bytes(data) if data is not None else _sha256_stream(Path(path))
        with self._lock:
            if len(self._entries) >= self._max:
                for old in list(self._entries)[: max(1, self._max // 10)]:
                    del self._entries[old]
            self._entries[key] = digest
        return digest

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


#: The process-wide cache used by :func:`sha256_file`.
DEFAULT_CACHE = HashCache()


def sha256_file(path: Path | str) -> str:
    """The hex sha256 of a file, from :data:`DEFAULT_CACHE` when the file is unchanged since last time."""
    return DEFAULT_CACHE.sha256(path)


class PersistentHashes:
    """sha256 of big files (model checkpoints) remembered across runs, by ``(path, size, mtime_ns)``.

    Hashing a 2-7 GB checkpoint takes seconds, so a daemon start must not pay it again for a file that has
    not changed. The table is a small JSON file in the user cache folder (``hashes.json``), read once,
    rewritten atomically after each new hash, bounded to :attr:`MAX_ENTRIES` (oldest dropped). A missing
    or damaged table is an empty one: the worst case is hashing again.
    """

    MAX_ENTRIES = 2000

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._entries: dict[str, list] | None = None

    def _load(self) -> dict[str, list]:
        if self._entries is None:
            try:
                raw = json.loads(self.path.read_text(encoding="utf-8"))
                self._entries = {k: v for k, v in raw.items() if isinstance(v, list) and len(v) == 3} if isinstance(
                    raw, dict) else {}
            except (OSError, ValueError):
                self._entries = {}
        return self._entries

    def get(self, path: Path | str, st: os.stat_result) -> str | None:
        with self._lock:
            found = self._load().get(os.path.abspath(path))
        if found and found[0] == st.st_size and found[1] == st.st_mtime_ns and isinstance(found[2], str):
            return found[2]
        return None

    def put(self, path: Path | str, st: os.stat_result, digest: str) -> None:
        from sdrepl.core.atomic import atomic_write_bytes

        with self._lock:
            entries = self._load()
            entries.pop(os.path.abspath(path), None)
            entries[os.path.abspath(path)] = [st.st_size, st.st_mtime_ns, digest]
            while len(entries) > self.MAX_ENTRIES:
                del entries[next(iter(entries))]
            data = json.dumps(entries).encode("utf-8")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path, data)
        except OSError:  # a cache: failing to remember only costs a hash next time
            pass


def default_persistent_hashes() -> PersistentHashes:
    """The table in the user cache folder (``SDREPL_CACHE_DIR`` or the platform's)."""
    from sdrepl.core.tiny import cache_root

    return PersistentHashes(cache_root() / "hashes.json")
