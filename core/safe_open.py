"""Reading a file that a stranger may have swapped for something else: one helper for every reader.

A name in a watched folder can be replaced at any moment by a FIFO (``open`` would wait for a writer
forever), a device, a socket or a huge file. :func:`read_regular_file` never blocks and never reads more
than asked: it refuses non-regular files by ``stat`` before opening, opens with ``O_NONBLOCK`` (a FIFO
swapped in after the ``stat`` opens at once instead of waiting) and ``O_NOCTTY``, checks ``fstat`` on the
open descriptor (the object actually opened: regular, same file as stat'ed, within the size cap), and reads
at most ``max_bytes + 1`` bytes. :func:`open_regular_file` is the same checks for readers that read part of
a file (a safetensors header).

Symlinks are followed by default, since users link embeddings in from a shared collection; the checks
apply to what the link leads to. Pass ``follow_symlinks=False`` (``O_NOFOLLOW``) where a link itself is
the attack (lock, log and pid files).
"""

from __future__ import annotations

import contextlib
import os
import stat as stat_module
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


class UnsafeFile(Exception):
    """The path is not a regular file, or is larger than allowed: refused before (or instead of) reading.

    ``reason`` is a phrase for a message ("a FIFO (named pipe), not a regular file"); ``too_large`` tells a
    size refusal from a type refusal.
    """

    def __init__(self, path: Path | str, reason: str, *, too_large: bool = False, size: int = 0) -> None:
        self.path = str(path)
        self.reason = reason
        self.too_large = too_large
        self.size = size
        super().__init__(f"{self.path}: {reason}")


_KINDS = (
    (stat_module.S_ISFIFO, "a FIFO (named pipe)"),
    (stat_module.S_ISSOCK, "a socket"),
    (stat_module.S_ISCHR, "a character device"),
    (stat_module.S_ISBLK, "a block device"),
    (stat_module.S_ISDIR, "a folder"),
    (stat_module.S_ISLNK, "a symbolic link"),
)


def file_kind(mode: int) -> str:
    """``a FIFO (named pipe)``, ``a socket``... for a ``st_mode`` (``a regular file`` for regular files)."""
    if stat_module.S_ISREG(mode):
        return "a regular file"
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def _check(path: Path | str, st: os.stat_result, max_bytes: int) -> None:
    if not stat_module.S_ISREG(st.st_mode):
        raise UnsafeFile(path, f"{file_kind(st.st_mode)}, not a regular file")
    if st.st_size > max_bytes:
        raise UnsafeFile(path, f"{st.st_size} bytes, more than the {max_bytes} allowed", too_large=True,
                         size=st.st_size)


@contextlib.contextmanager
def open_regular_file(
    path: Path | str, max_bytes: int, *, follow_symlinks: bool = True, st: os.stat_result | None = None
) -> Iterator[tuple[BinaryIO, os.stat_result]]:
    """Open the regular file ``path`` for reading, after the checks of :func:`read_regular_file`.

    Yields ``(file, fstat)``; for readers that need only part of a file (a safetensors header). The
    caller must still read at most ``fstat.st_size`` bytes. Raises like :func:`read_regular_file`.
    """
    if st is None:
        st = os.stat(path, follow_symlinks=follow_symlinks)
    _check(path, st, max_bytes)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)
    try:
        opened = os.fstat(fd)
        _check(path, opened, max_bytes)  # what was opened, not what the name meant a moment ago
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb", buffering=0) as fh:
        yield fh, opened


def read_at_most(fh: BinaryIO, count: int) -> bytes:
    """Up to ``count`` bytes of ``fh`` (fewer only at its end), in chunks of at most 1 MiB: the unbuffered
    files :func:`open_regular_file` gives may return less than asked from one ``read``."""
    chunks, left = [], count
    while left > 0:
        chunk = fh.read(min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_regular_file(
    path: Path | str, max_bytes: int, *, follow_symlinks: bool = True, st: os.stat_result | None = None
) -> tuple[bytes, os.stat_result]:
    """The bytes of the regular file ``path`` (at most ``max_bytes``) and the ``fstat`` of what was read.

    ``st`` (a stat the caller already has) saves the first stat. Raises :class:`UnsafeFile` for a
    non-regular or oversized file, and ``OSError`` as ``open`` does (missing, permission, ``ELOOP`` for a
    link with ``follow_symlinks=False``).
    """
    with open_regular_file(path, max_bytes, follow_symlinks=follow_symlinks, st=st) as (fh, opened):
        data = read_at_most(fh, max_bytes + 1)
    if len(data) > max_bytes:  # grew while being read
        raise UnsafeFile(path, f"more than the {max_bytes} bytes allowed (it grew while being read)",
                         too_large=True, size=len(data))
    return data, opened
