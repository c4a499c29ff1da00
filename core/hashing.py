"""sha256 of files, cached by (path, size, mtime_ns).

A1111 writes ``TI hashes: name: <first 12 hex of the file's sha256>`` into picture metadata, which lets a
picture be traced to the exact embedding file. Hashing a small embedding is cheap, but the library rescans
whole folders on ``!reload`` and on every watcher event, so each file is hashed once per version: a file
whose size and modification time are unchanged keeps its hash. Callers that already hold the file's bytes
(the library reads them to parse the file) pass them in, so the file is read only once.
"""

from __future__ import annotations

import hashlib
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
