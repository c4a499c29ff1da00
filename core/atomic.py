"""Atomic file writes: a reader (or the folder watcher) sees the old file or the new one, never half of one.

Every file the project writes goes through :func:`atomic_writer`: the data is written to a hidden temporary
file in the *same* folder (so the final rename stays on one filesystem and is atomic), flushed to disk with
``fsync``, and then renamed over the target. A crash or an exception mid-write leaves the previous file
intact and removes the temporary. Temporary names start with ``.`` and end with ``.tmp``
(:func:`is_temp_name`), so the embeddings watcher and library ignore them while they are being written.

With ``overwrite=False`` the final step is ``os.link`` (which fails if the target exists) instead of
``os.replace``, so two writers racing for one name cannot clobber each other; on filesystems without hard
links it falls back to an existence check and a rename (a tiny race window, documented here).
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

TEMP_PREFIX = "."
TEMP_SUFFIX = ".tmp"
#: Marks the temporaries this module creates: ``.<name>.sdrepl-<random>.tmp``.
TEMP_MARK = ".sdrepl-"


def is_temp_name(path: Path | str) -> bool:
    """True for a temporary file of an atomic write in progress (hidden, ``.tmp``): never load or index it."""
    name = os.path.basename(path)
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


def _current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` would briefly race other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; best effort (not possible on every OS/filesystem)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished temporary into place; refuse to clobber an existing file unless ``overwrite``."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic "create if absent"
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if path.exists():  # no hard links here: check then rename (small race, see module docstring)
            raise FileExistsError(errno.EEXIST, "file exists", str(path)) from exc
        os.replace(tmp, path)
        return
    tmp.unlink()


@contextlib.contextmanager
def atomic_writer(path: Path | str, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on clean exit fsync it and move it to ``path`` atomically.

    Write the whole file to the yielded path inside the ``with`` block (any writer that takes a file name
    works: ``torch.save``, ``Image.save``, ``Path.write_bytes``). If the block raises, the temporary is
    removed and ``path`` is untouched. Raises ``FileExistsError`` when ``path`` exists and
    ``overwrite`` is false (checked before writing and again, atomically, when publishing).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not overwrite and path.exists():
        raise FileExistsError(errno.EEXIST, "file exists", str(path))
    fd, tmp_name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}{TEMP_MARK}", suffix=TEMP_SUFFIX, dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes the file 0600; give the result the mode a plain open() would have.
        os.chmod(tmp, 0o666 & ~_current_umask())
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        _publish(tmp, path, overwrite)
        _fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_error_text(exc: OSError, path: Path | str) -> str:
    """What a failed write of ``path`` tells the user: "no space left" (naming the folder) for a full disk
    or quota, else the system's words. A user's condition, not a program error."""
    folder = Path(path).parent
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        what = "no space left" if exc.errno == errno.ENOSPC else "no space left within your disk quota"
        return f"{what} on the disk holding {folder}; free some space there (or write elsewhere) and try again"
    if exc.errno == errno.EROFS:
        return f"{folder} is on a read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to write in {folder}"
    return f"cannot write in {folder} ({exc.strerror or exc})"


def atomic_write_bytes(path: Path | str, data: bytes, *, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path, overwrite=overwrite) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
