"""Identical files under one trigger (a ``!convert`` copy beside the original) are one embedding with several
files: no collision warning, the older file stays the one served, removing a copy says which file went."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sdrepl.core.embedding import SINGLE
from sdrepl.core.formats import write_embedding
from sdrepl.core.library import EmbeddingLibrary

SD1 = {SINGLE: 768}


def put(path: Path, seed: int = 0, age_s: int = 0) -> Path:
    """An embedding file; ``age_s`` seconds older than now (the original a copy was made from)."""
    fmt = {".pt": "pt", ".safetensors": "safetensors", ".bin": "diffusers"}[path.suffix]
    path.parent.mkdir(parents=True, exist_ok=True)
    vectors = torch.randn(2, 768, generator=torch.Generator().manual_seed(seed))
    write_embedding(path, {SINGLE: vectors}, fmt, name=path.stem, overwrite=True)
    if age_s:
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - age_s * 10**9))
    return path


def scanned(folder: Path) -> EmbeddingLibrary:
    lib = EmbeddingLibrary([folder], SD1)
    lib.scan()
    return lib


def test_identical_copies_are_one_entry_with_several_files_and_no_collision(tmp_path: Path) -> None:
    original = put(tmp_path / "x.safetensors", age_s=60)
    copy = put(tmp_path / "x.pt")  # sorts first by path: still the older original is served
    (entry,) = scanned(tmp_path).embeddings()
    assert entry.path == original and entry.files == (original, copy)
    assert entry.describe()["files"] == [str(original), str(copy)]
    lib = scanned(tmp_path)
    assert lib.warnings() == [] and lib.get("x").path == original and lib.triggers() == ["x"]


def test_a_copy_arriving_later_changes_neither_the_active_file_nor_warns(tmp_path: Path) -> None:
    original = put(tmp_path / "x.safetensors", age_s=60)
    lib = scanned(tmp_path)
    copy = put(tmp_path / "sub" / "x.pt")
    change = lib.update_path(copy)
    assert change.warnings == [] and change.added == [] and change.removed == []
    assert change.files_added == [(copy, "x", original)]
    assert [e.files for e in change.entries] == [(original, copy)]
    assert lib.get("x").path == original and len(lib.embeddings()) == 1 and lib.warnings() == []


def test_different_vectors_under_one_name_still_collide(tmp_path: Path) -> None:
    put(tmp_path / "x.safetensors", seed=1)
    put(tmp_path / "x.pt", seed=2)
    lib = scanned(tmp_path)
    assert len(lib.embeddings()) == 2 and all(len(e.files) == 1 for e in lib.embeddings())
    assert lib.get("x").path.name == "x.pt" and lib.get("<x.safetensors>").path.name == "x.safetensors"
    (warning,) = lib.warnings()
    assert "2 files claim the trigger 'x'" in warning


def test_copy_and_a_different_file_one_entry_with_two_files_and_one_collision(tmp_path: Path) -> None:
    put(tmp_path / "x.pt", seed=1, age_s=60)
    put(tmp_path / "a" / "x.pt", seed=1)
    put(tmp_path / "b" / "x.pt", seed=2)
    lib = scanned(tmp_path)
    assert sorted(len(e.files) for e in lib.embeddings()) == [1, 2]
    (warning,) = lib.warnings()
    assert warning.startswith("2 files claim the trigger 'x'") and "<b/x>" in warning


def test_removing_a_copy_removes_only_that_file(tmp_path: Path) -> None:
    original = put(tmp_path / "x.safetensors", age_s=60)
    copy = put(tmp_path / "x.pt")
    lib = scanned(tmp_path)
    copy.unlink()
    change = lib.remove_path(copy)
    assert change.removed == [] and change.removed_paths == []
    assert change.files_removed == [(copy, "x", original)]
    assert change.describe()["files_removed"] == [{"path": str(copy), "name": "x", "entry": str(original)}]
    (entry,) = lib.embeddings()
    assert entry.path == original and entry.files == (original,)


def test_removing_the_original_leaves_the_copy_as_the_path(tmp_path: Path) -> None:
    original = put(tmp_path / "x.safetensors", age_s=60)
    copy = put(tmp_path / "x.pt")
    lib = scanned(tmp_path)
    before = lib.get("x").vectors[SINGLE].clone()
    original.unlink()
    change = lib.remove_path(original)
    assert change.removed == [] and change.added == [] and change.warnings == []
    assert change.files_removed == [(original, "x", copy)]
    assert change.removed_paths == [original] and [e.path for e in change.entries] == [copy]
    (entry,) = lib.embeddings()
    assert entry.path == copy and entry.files == (copy,) and torch.equal(lib.get("x").vectors[SINGLE], before)
    copy.unlink()
    change = lib.remove_path(copy)
    assert change.removed == ["x"] and change.files_removed == [] and lib.embeddings() == []


def test_a_copy_rewritten_with_other_vectors_splits_off_as_a_collision(tmp_path: Path) -> None:
    put(tmp_path / "x.safetensors", age_s=60)
    copy = put(tmp_path / "x.pt")
    lib = scanned(tmp_path)
    put(copy, seed=5)
    change = lib.update_path(copy, force=True)
    assert change.files_removed == [] and len(change.warnings) == 1
    assert len(lib.embeddings()) == 2


def test_a_copy_in_a_subfolder_stays_reachable_by_its_qualified_name(tmp_path: Path) -> None:
    original = put(tmp_path / "x.pt", age_s=60)
    copy = put(tmp_path / "sub" / "x.pt")
    lib = scanned(tmp_path)
    assert lib.get("<sub/x>") is lib.get("x") and lib.get("x").path == original
    assert lib.get("sub/x.pt") is lib.get("x") and len(lib.embeddings()) == 1
    copy.unlink()
    lib.remove_path(copy)
    assert lib.get("sub/x") is None and lib.get("x").path == original
