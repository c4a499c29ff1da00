"""The library's incremental updates and its lock discipline.

- Incremental = full rebuild: after every one of a random sequence of file operations (collisions across
  folders, subfolders and roots, overwrites, removals of files and folders), the library fed one event
  at a time shows exactly what a fresh scan of the same folders shows.
- No lock across file I/O: a read that never returns blocks neither other updates nor lookups; races
  between mutations are settled by read order (an older read never replaces a newer one, a removed file
  is not brought back by a read that started before the removal), and a file written again while it is
  read is read again.
- A name swapped for a FIFO between the stat and the open never blocks the reader.
"""

from __future__ import annotations

import os
import random
import shutil
import threading
from pathlib import Path

import pytest
import torch

from sdrepl.core import formats
from sdrepl.core import library as library_module
from sdrepl.core.embedding import SINGLE
from sdrepl.core.formats import NotAnEmbedding, write_embedding
from sdrepl.core.library import EmbeddingLibrary

SD1 = {SINGLE: 768}


def put(path: Path, seed: int = 0, count: int = 1, name: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    vectors = torch.randn(count, 768, generator=torch.Generator().manual_seed(seed))
    return write_embedding(path, {SINGLE: vectors}, "safetensors", name=name or path.stem, overwrite=True)


def view(lib: EmbeddingLibrary) -> tuple:
    """Everything a user can see of a library."""
    return (
        [(e.trigger, e.qualified, str(e.path), e.sha256, e.warnings) for e in lib.embeddings()],
        [(str(s.path), s.reason) for s in lib.skipped()],
        lib.warnings(),
        lib.triggers(),
        {name: str(lib.get(name).path) for name in lib.triggers()},
    )


def test_incremental_updates_equal_a_full_rebuild(tmp_path: Path) -> None:
    roots = [tmp_path / "a", tmp_path / "b"]
    for root in roots:
        root.mkdir()
    lib = EmbeddingLibrary(roots, SD1)
    lib.scan()
    rng = random.Random(7)
    names = ["cat", "Cat", "dog", "x", "sub"]  # few names: many collisions, also case-only ones
    folders = [".", "sub", "sub/deeper", "other"]
    for step in range(120):
        root = rng.choice(roots)
        existing = [p for r in roots for p in r.rglob("*.safetensors")]
        action = rng.random()
        if action < 0.55 or not existing:
            folder = rng.choice(folders)
            path = root / folder / f"{rng.choice(names)}{rng.choice(['', '-2'])}.safetensors"
            put(path, seed=rng.randrange(3))  # seeds repeat: identical-vector collisions too
            change = lib.update_path(path)
        elif action < 0.7:  # same name, different extension: a second claimant in the same folder
            source = rng.choice(existing)
            target = source.with_suffix(".pt")
            shutil.copy(source, target)
            change = lib.update_path(target)
        elif action < 0.9:
            path = rng.choice(existing)
            path.unlink()
            change = lib.remove_path(path)
        else:
            folder = root / rng.choice(folders[1:])
            if not folder.exists():
                continue
            shutil.rmtree(folder)
            change = lib.remove_path(folder)
        fresh = EmbeddingLibrary(roots, SD1)
        fresh.scan()
        mine, truth = view(lib), view(fresh)
        for part, (a, b) in enumerate(zip(mine, truth, strict=True)):
            assert a == b, f"step {step}, part {part}: {change}"


def test_change_names_every_file_whose_name_moved(tmp_path: Path) -> None:
    lib = EmbeddingLibrary([tmp_path / "first", tmp_path / "second"], SD1)
    put(tmp_path / "second" / "cat.safetensors", seed=1)
    lib.scan()
    assert lib.get("cat").path.parent.name == "second"
    # A claimant in the earlier folder wins the trigger: the old winner is now reached by its qualified name.
    change = lib.update_path(put(tmp_path / "first" / "cat.safetensors", seed=2))
    assert change.added == ["cat"] and change.updated == ["cat.safetensors"]
    assert {str(e.path) for e in change.entries} == {str(tmp_path / "first" / "cat.safetensors"),
                                                    str(tmp_path / "second" / "cat.safetensors")}
    assert change.version == lib.version == lib.snapshot().version
    change = lib.remove_path(tmp_path / "first" / "cat.safetensors")
    (tmp_path / "first" / "cat.safetensors").unlink()
    change = lib.remove_path(tmp_path / "first" / "cat.safetensors")
    assert not change  # removing twice changes nothing


def test_batch_update_is_one_change(tmp_path: Path) -> None:
    lib = EmbeddingLibrary([tmp_path], SD1)
    lib.scan()
    paths = [put(tmp_path / f"e{i}.safetensors", seed=i) for i in range(30)]
    change = lib.update_paths(paths)
    assert len(change.added) == 30 and lib.version == 1
    change = lib.remove_paths(paths[:10])
    for path in paths[:10]:
        path.unlink()
    change = lib.remove_paths(paths[:10])
    assert len(lib.embeddings()) == 20


class Gate:
    """Makes reads of one file wait (after reading it) until released: a slow or hung file."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.name = name
        self.reached = threading.Event()
        self.release = threading.Event()
        real = library_module._read_file_bytes

        def read(path: Path, st: os.stat_result | None = None):
            result = real(path, st)
            if Path(path).name == self.name:
                self.reached.set()
                assert self.release.wait(30), "the gate was never released"
            return result

        monkeypatch.setattr(library_module, "_read_file_bytes", read)


def in_thread(fn, *args) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    thread.start()
    return thread, out


def test_a_hung_read_blocks_neither_updates_nor_lookups_nor_reload(tmp_path: Path, monkeypatch) -> None:
    lib = EmbeddingLibrary([tmp_path], SD1)
    lib.scan()
    gate = Gate(monkeypatch, "slow.safetensors")
    hung, _ = in_thread(lib.update_path, put(tmp_path / "slow.safetensors", seed=1))
    try:
        assert gate.reached.wait(10)
        other, out = in_thread(lib.update_path, put(tmp_path / "other.safetensors", seed=2))
        other.join(10)
        assert not other.is_alive(), "an update waited for a read of another file"
        assert out[0].added == ["other"] and lib.get("other") is not None
        assert lib.get("slow") is None  # not there yet: its read is still running
    finally:
        gate.release.set()
        hung.join(10)
    assert lib.get("slow") is not None


class HeldApply:
    """Holds one thread's mutation between its reads and their application (the window a race needs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.thread: threading.Thread | None = None
        self.reached = threading.Event()
        self.release = threading.Event()
        real = EmbeddingLibrary._apply

        def apply(lib, *args, **kwargs):
            if threading.current_thread() is self.thread:
                self.reached.set()
                assert self.release.wait(30), "never released"
            return real(lib, *args, **kwargs)

        monkeypatch.setattr(EmbeddingLibrary, "_apply", apply)

    def start(self, fn) -> threading.Thread:
        self.thread = threading.Thread(target=fn, daemon=True)
        self.thread.start()
        assert self.reached.wait(10)
        return self.thread


def test_an_older_read_never_replaces_a_newer_one(tmp_path: Path, monkeypatch) -> None:
    path = put(tmp_path / "x.safetensors", seed=1)
    lib = EmbeddingLibrary([tmp_path], SD1)
    lib.scan()
    held = HeldApply(monkeypatch)
    slow = held.start(lambda: lib.update_path(path, force=True))  # has read version 1, not applied it yet
    put(path, seed=3, count=2)  # version 2, read and applied by a mutation that started later
    assert lib.update_path(path, force=True).updated == ["x"]
    newest = lib.get("x").sha256
    held.release.set()
    slow.join(10)
    assert lib.get("x").sha256 == newest and lib.get("x").num_vectors == 2


def test_a_read_that_started_before_a_removal_does_not_bring_the_file_back(tmp_path: Path, monkeypatch) -> None:
    path = put(tmp_path / "x.safetensors", seed=1)
    lib = EmbeddingLibrary([tmp_path], SD1)
    held = HeldApply(monkeypatch)
    slow = held.start(lib.scan)  # has read x, not applied it yet
    path.unlink()
    assert not lib.remove_path(path)  # nothing to remove yet: the scan has not applied
    held.release.set()
    slow.join(10)
    assert lib.get("x") is None and lib.embeddings() == []


def test_a_file_written_while_it_is_read_is_read_again(tmp_path: Path, monkeypatch) -> None:
    path = put(tmp_path / "x.safetensors", seed=1)
    real = library_module._read_file_bytes
    calls = []

    def read(p: Path, st: os.stat_result | None = None):
        result = real(p, st)
        calls.append(p)
        if len(calls) == 1:
            put(path, seed=2, count=3)  # a writer finishes right after our read
        return result

    monkeypatch.setattr(library_module, "_read_file_bytes", read)
    lib = EmbeddingLibrary([tmp_path], SD1)
    lib.scan()
    assert len(calls) == 2 and lib.get("x").num_vectors == 3


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_name_swapped_for_a_fifo_after_the_stat_never_blocks(tmp_path: Path) -> None:
    path = put(tmp_path / "x.safetensors")
    regular = os.stat(path)
    path.unlink()
    os.mkfifo(path)  # no writer: a plain open() would wait forever
    thread, out = in_thread(lambda: _outcome(lambda: formats.read_file_bytes(path, regular)))
    thread.join(5)
    assert not thread.is_alive(), "opening the FIFO blocked"
    assert isinstance(out[0], NotAnEmbedding) and "not a regular file" in str(out[0])


def _outcome(fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc
