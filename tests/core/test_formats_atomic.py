"""Atomic writes: readers see the old file or the new one; failures leave the old file and no temporaries."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from sdrepl.core.atomic import atomic_write_bytes, atomic_writer, is_temp_name


def test_write_creates_file_with_normal_permissions(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    atomic_write_bytes(target, b"hello")
    assert target.read_bytes() == b"hello"
    assert stat.S_IMODE(target.stat().st_mode) & 0o044  # readable by others like any plain file (umask 022)
    assert list(tmp_path.iterdir()) == [target]


def test_temporary_is_hidden_in_same_folder_and_recognised(tmp_path: Path) -> None:
    target = tmp_path / "b.pt"
    with atomic_writer(target) as tmp:
        assert tmp.parent == tmp_path and is_temp_name(tmp) and tmp.name.startswith(".")
        assert not target.exists()
        tmp.write_bytes(b"x")
    assert target.read_bytes() == b"x" and not tmp.exists()


def test_error_keeps_old_file_and_removes_temporary(tmp_path: Path) -> None:
    target = tmp_path / "c.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_writer(target) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("crash mid-save")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


def test_no_overwrite_refuses_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "d.pt"
    target.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        atomic_write_bytes(target, b"new", overwrite=False)
    assert target.read_bytes() == b"old"


def test_no_overwrite_loses_race_without_clobbering(tmp_path: Path) -> None:
    target = tmp_path / "e.pt"
    with pytest.raises(FileExistsError), atomic_writer(target, overwrite=False) as tmp:
        tmp.write_bytes(b"mine")
        target.write_bytes(b"someone else's")  # another writer got there first
    assert target.read_bytes() == b"someone else's"
    assert list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize(
    ("name", "temp"), [(".a.pt.sdrepl-x.tmp", True), ("a.pt", False), ("a.tmp", False), (".hidden.pt", False)]
)
def test_is_temp_name(name: str, temp: bool) -> None:
    assert is_temp_name(Path(name)) is temp
