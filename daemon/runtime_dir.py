"""The runtime folder (socket, lock, connection file, log) made safe against other local users.

Without ``XDG_RUNTIME_DIR`` the default socket lives in ``/tmp/sdrepl-<uid>/``, a name anyone can take
first: another user could pre-create it world-writable, plant symlinks named like our lock and log files
(so a daemon start overwrites a victim file with its pid and appends its log to another), or put their
own socket there for our clients to talk to. The rules, as tmux and ssh-agent apply them:

- the default folder must be a real directory (no symlink) owned by the user with no group or other
  permissions (mode 0700); sdrepl creates it so and refuses one that is not, saying why and what to do;
- a folder given with ``--socket`` must belong to the user (or root) and, when others may write to it,
  carry the sticky bit (as ``/tmp`` does), so nobody else can swap the files in it;
- the lock, connection and log files are opened with ``O_NOFOLLOW`` (a symlink is refused, never
  followed) and checked on the open descriptor: a regular file owned by the user;
- a client talks to a socket only when the socket file belongs to the user and, on Linux, the process
  listening on it runs as the user (``SO_PEERCRED``).
"""

from __future__ import annotations

import os
import socket as socket_mod
import stat
import struct
from pathlib import Path

from sdrepl.config import default_socket
from sdrepl.core.errors import SdreplError

HOW = "remove it, or set XDG_RUNTIME_DIR, or give --socket a path in a folder of your own"


class UnsafeRuntime(SdreplError):
    """A runtime folder, file or socket that another user could control; nothing was read or written."""


def _me() -> int:
    return os.geteuid()


def is_default_folder(folder: Path) -> bool:
    """Whether ``folder`` is the per-user default one (strict rules) rather than one the user chose."""
    return Path(folder) == default_socket().parent


def ensure_folder(folder: Path, *, private: bool | None = None) -> None:
    """Create the socket's folder owner-only when it is missing; refuse one that is not safe.

    ``private`` (default: whether it is the default folder) asks for the strict rules: owned by the user,
    mode 0700, not a symlink.
    """
    folder = Path(folder)
    private = is_default_folder(folder) if private is None else private
    try:
        folder.mkdir(parents=not private, mode=0o700)
    except FileExistsError:
        pass
    check_folder(folder, private=private)


def check_folder(folder: Path, *, private: bool) -> None:
    """Raise :class:`UnsafeRuntime` when another user could control what is in ``folder``."""
    folder = Path(folder)
    try:
        st = os.lstat(folder) if private else os.stat(folder)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeRuntime(f"the runtime folder {folder} is a symbolic link, not a folder of yours; {HOW}")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeRuntime(f"the runtime folder {folder} is not a folder; {HOW}")
    mode = stat.S_IMODE(st.st_mode)
    if private:
        if st.st_uid != _me():
            raise UnsafeRuntime(f"the runtime folder {folder} belongs to uid {st.st_uid}, not to you (uid {_me()}): "
                                f"another user may have made it to catch your daemon's socket; {HOW}")
        if mode & 0o077:
            raise UnsafeRuntime(f"the runtime folder {folder} has mode {mode:04o}; it must be 0700 (only you may "
                                f"enter it): `chmod 700 {folder}` if you made it, else {HOW}")
        return
    if st.st_uid not in (_me(), 0):
        raise UnsafeRuntime(f"the socket folder {folder} belongs to uid {st.st_uid}, not to you (uid {_me()}); "
                            "give --socket a path in a folder of your own")
    if mode & 0o022 and not mode & stat.S_ISVTX:
        raise UnsafeRuntime(f"the socket folder {folder} has mode {mode:04o}: others may replace the files in "
                            "it; use a folder only you can write to (or one with the sticky bit, like /tmp)")


def open_private(path: Path, flags: int, mode: int = 0o600) -> int:
    """``os.open`` that never follows a symlink and only returns a regular file owned by the user."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as exc:
        if os.path.islink(path):
            raise UnsafeRuntime(f"{path} is a symbolic link; sdrepl never writes through one (another user may "
                                f"have planted it): {HOW}") from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeRuntime(f"{path} is not a regular file; {HOW}")
        if st.st_uid != _me():
            raise UnsafeRuntime(f"{path} belongs to uid {st.st_uid}, not to you (uid {_me()}); {HOW}")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_socket(path: Path) -> None:
    """Before connecting: the socket file must be a socket owned by the user (missing is not unsafe)."""
    try:
        st = os.lstat(path)
    except OSError:
        return  # connecting says "no daemon"
    if not stat.S_ISSOCK(st.st_mode):
        raise UnsafeRuntime(f"{path} is not a socket; refusing to talk to it: {HOW}")
    if st.st_uid != _me():
        raise UnsafeRuntime(f"the socket {path} belongs to uid {st.st_uid}, not to you (uid {_me()}): refusing to "
                            f"talk to it (another user's daemon, or an impostor); {HOW}")


def check_peer(sock: socket_mod.socket, path: Path) -> None:
    """After connecting (Linux): the process listening on ``path`` must run as the user."""
    option = getattr(socket_mod, "SO_PEERCRED", None)
    if option is None:
        return
    pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket_mod.SOL_SOCKET, option, struct.calcsize("3i")))
    if uid != _me():
        raise UnsafeRuntime(f"the process listening on {path} (pid {pid}) runs as uid {uid}, not as you (uid "
                            f"{_me()}): refusing to talk to it; {HOW}")
