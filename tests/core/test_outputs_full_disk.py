"""A full outputs folder is a user's condition: the error names the folder and says "no space left", and
every picture that was written is reported (none is left on disk unmentioned)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from sdrepl.core import outputs as outputs_module
from sdrepl.core.errors import WriteError
from sdrepl.core.generation import GenerationJob, run_generation
from sdrepl.core.outputs import OutputFolder
from sdrepl.core.prompt import StaticLookup


class RoomFor:
    """``atomic_writer`` on a disk with room for ``count`` more files (then ENOSPC mid-write)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int) -> None:
        self.left = count
        real = outputs_module.atomic_writer

        def writer(path, *, overwrite=True):
            if self.left <= 0:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            self.left -= 1
            return real(path, overwrite=overwrite)

        monkeypatch.setattr(outputs_module, "atomic_writer", writer)


def test_a_full_disk_names_the_folder_and_no_space_left(tmp_path: Path, monkeypatch) -> None:
    RoomFor(monkeypatch, 0)
    with pytest.raises(WriteError) as info:
        OutputFolder(tmp_path / "out").save(lambda tmp: tmp.write_bytes(b"png"), seed=1)
    message = str(info.value)
    assert "no space left" in message and str(tmp_path / "out") in message
    assert [p.name for p in (tmp_path / "out").rglob("*") if p.is_file()] == []


def test_room_for_one_of_three_pictures_reports_the_one(tmp_path: Path, monkeypatch, tiny_model) -> None:
    RoomFor(monkeypatch, 1)
    job = GenerationJob("a red cube", "", 1, 7.0, 11, 64, 64, "Euler a", 3, 1)
    with pytest.raises(WriteError) as info:
        run_generation(tiny_model, StaticLookup(), job, OutputFolder(tmp_path / "out"))
    message = str(info.value)
    written = [p for p in (tmp_path / "out").rglob("*.png")]
    assert len(written) == 1 and str(written[0]) in message
    assert "no space left" in message and "1 of 3 picture(s) written" in message and "seed(s) 12, 13" in message
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".tmp")]


