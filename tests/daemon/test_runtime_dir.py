"""A hostile neighbour and the runtime folder: pre-created folders, planted symlinks, impostor sockets.

Without ``XDG_RUNTIME_DIR`` the default socket folder is ``$TMPDIR/sdrepl-<uid>`` (``TMPDIR`` points
into a private temp folder here, so the real ``/tmp`` is never touched). Each attack must be refused with
a clear message and leave the victim files exactly as they were. Tests that give a file to another uid
need root (``chown``), and are skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from daemon_testing import daemon_env

from sdrepl.daemon.client import request_sync
from sdrepl.daemon.runtime_dir import UnsafeRuntime, check_folder, ensure_folder, open_private

OTHER_UID = 54321
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another uid needs root")


@pytest.fixture
def tmpdir_root():
    root = Path(tempfile.mkdtemp(prefix="sdrt-", dir="/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def env_for(tmpdir_root: Path) -> dict[str, str]:
    env = {k: v for k, v in daemon_env().items() if not k.startswith("SDREPL_") and k != "XDG_RUNTIME_DIR"}
    env["TMPDIR"] = str(tmpdir_root)
    return env


def sdrepl(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdrepl", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def victims(folder: Path) -> dict[Path, tuple[bytes, int, int]]:
    """Two files of the victim's, named as what an attacker would point the lock and log links at."""
    out = {}
    for name in ("victim-pid", "victim-log"):
        path = folder / name
        path.write_bytes(b"precious\n")
        st = path.stat()
        out[path] = (path.read_bytes(), st.st_mtime_ns, stat.S_IMODE(st.st_mode))
    return out


def untouched(before: dict[Path, tuple[bytes, int, int]]) -> bool:
    return all((p.read_bytes(), p.stat().st_mtime_ns, stat.S_IMODE(p.stat().st_mode)) == v for p, v in before.items())


def plant(folder: Path, before: dict, socket_name: str = "sdrepl.sock") -> None:
    pid_victim, log_victim = before
    (folder / f"{socket_name}.lock").symlink_to(pid_victim)
    (folder / f"{socket_name}.log").symlink_to(log_victim)


# --- the default folder -------------------------------------------------------------------------------------


def test_a_precreated_world_writable_default_folder_is_refused(tmpdir_root: Path) -> None:
    folder = tmpdir_root / f"sdrepl-{os.geteuid()}"
    folder.mkdir()
    os.chmod(folder, 0o777)
    before = victims(tmpdir_root)
    plant(folder, list(before))
    for args in (["serve"], ["serve", "--detach"]):
        done = sdrepl(env_for(tmpdir_root), *args, "--embeddings", str(tmpdir_root), cwd=tmpdir_root)
        assert done.returncode == 2, done
        assert f"the runtime folder {folder} has mode 0777; it must be 0700" in done.stderr
        assert done.stderr.count("\n") == 1  # one line, no traceback
    assert untouched(before)
    assert sorted(p.name for p in folder.iterdir()) == ["sdrepl.sock.lock", "sdrepl.sock.log"]


@as_root
def test_a_default_folder_owned_by_someone_else_is_refused(tmpdir_root: Path) -> None:
    folder = tmpdir_root / f"sdrepl-{os.geteuid()}"
    folder.mkdir(mode=0o700)
    os.chown(folder, OTHER_UID, OTHER_UID)
    done = sdrepl(env_for(tmpdir_root), "serve", "--detach", cwd=tmpdir_root)
    assert done.returncode == 2
    assert f"belongs to uid {OTHER_UID}, not to you" in done.stderr
    assert list(folder.iterdir()) == []


def test_a_symlinked_default_folder_is_refused(tmpdir_root: Path) -> None:
    target = tmpdir_root / "elsewhere"
    target.mkdir(mode=0o700)
    (tmpdir_root / f"sdrepl-{os.geteuid()}").symlink_to(target)
    done = sdrepl(env_for(tmpdir_root), "serve", cwd=tmpdir_root)
    assert done.returncode == 2 and "is a symbolic link" in done.stderr
    assert list(target.iterdir()) == []


def test_the_default_folder_is_created_owner_only(tmpdir_root: Path) -> None:
    folder = tmpdir_root / f"sdrepl-{os.geteuid()}"
    ensure_folder(folder, private=True)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    check_folder(folder, private=True)


# --- planted files in a folder of one's own ------------------------------------------------------------------


def test_symlinked_lock_and_log_files_are_refused_and_not_followed(tmpdir_root: Path) -> None:
    folder = tmpdir_root / "mine"
    folder.mkdir(mode=0o700)
    before = victims(tmpdir_root)
    plant(folder, list(before), "d.sock")
    env = env_for(tmpdir_root)
    detached = sdrepl(env, "serve", "--detach", "--socket", str(folder / "d.sock"), cwd=tmpdir_root)
    assert detached.returncode == 2 and f"{folder / 'd.sock.log'} is a symbolic link" in detached.stderr
    foreground = sdrepl(env, "serve", "--socket", str(folder / "d.sock"), cwd=tmpdir_root)
    assert foreground.returncode == 2 and f"{folder / 'd.sock.lock'} is a symbolic link" in foreground.stderr
    assert untouched(before)


def test_open_private_refuses_links_fifos_and_strangers_files(tmpdir_root: Path) -> None:
    (tmpdir_root / "link").symlink_to(tmpdir_root / "nowhere")
    with pytest.raises(UnsafeRuntime, match="symbolic link"):
        open_private(tmpdir_root / "link", os.O_WRONLY | os.O_CREAT)
    assert not (tmpdir_root / "nowhere").exists()
    os.mkfifo(tmpdir_root / "fifo")
    with pytest.raises(UnsafeRuntime, match="not a regular file"):
        open_private(tmpdir_root / "fifo", os.O_RDONLY)  # and it did not block waiting for a writer
    if os.geteuid() == 0:
        theirs = tmpdir_root / "theirs"
        theirs.write_text("x")
        os.chown(theirs, OTHER_UID, OTHER_UID)
        with pytest.raises(UnsafeRuntime, match=f"belongs to uid {OTHER_UID}"):
            open_private(theirs, os.O_RDONLY)


@pytest.mark.parametrize(("mode", "ok"), [(0o700, True), (0o755, True), (0o1777, True), (0o777, False),
                                          (0o770, False)])
def test_a_chosen_socket_folder_must_not_let_others_swap_files(tmpdir_root: Path, mode: int, ok: bool) -> None:
    folder = tmpdir_root / "chosen"
    folder.mkdir()
    os.chmod(folder, mode)
    if ok:
        check_folder(folder, private=False)
    else:
        with pytest.raises(UnsafeRuntime, match="others may replace the files"):
            check_folder(folder, private=False)


# --- impostor sockets ----------------------------------------------------------------------------------------


@as_root
def test_the_client_refuses_a_socket_owned_by_someone_else(tmpdir_root: Path) -> None:
    path = tmpdir_root / "d.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        listener.setblocking(False)
        os.chown(path, OTHER_UID, OTHER_UID)
        with pytest.raises(UnsafeRuntime, match=f"belongs to uid {OTHER_UID}, not to you"):
            request_sync(path, "status", timeout=2)
        done = sdrepl(env_for(tmpdir_root), "status", "--socket", str(path), cwd=tmpdir_root)
        assert done.returncode == 2 and "refusing to talk to it" in done.stderr
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody ever connected


def _impostor_listener(path: Path) -> tuple[int, int]:
    """A listener on ``path`` run by another uid: a forked child that drops to OTHER_UID (no exec, so the
    other user needs no access to this interpreter, which may live in root's home). Returns (pid, ready fd)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only plain system calls, then _exit
        try:
            os.close(read_end)
            os.setgid(OTHER_UID)
            os.setuid(OTHER_UID)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(str(path))
            s.listen()
            os.write(write_end, b"ready")
            conn, _ = s.accept()
            time.sleep(5)
        finally:
            os._exit(0)
    os.close(write_end)
    return pid, read_end


@as_root
def test_the_client_refuses_a_listener_running_as_someone_else(tmpdir_root: Path) -> None:
    """SO_PEERCRED: the socket file was given to us, but the process behind it is another user's."""
    os.chmod(tmpdir_root, 0o711)  # the other user may pass through to its folder
    folder = tmpdir_root / "shared"
    folder.mkdir()
    os.chown(folder, OTHER_UID, OTHER_UID)
    path = folder / "d.sock"
    pid, ready = _impostor_listener(path)
    try:
        assert os.read(ready, 5) == b"ready"
        os.chown(path, 0, 0)
        with pytest.raises(UnsafeRuntime, match=f"runs as uid {OTHER_UID}, not as you"):
            request_sync(path, "status", timeout=2)
    finally:
        os.close(ready)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
