"""The embedding library: scanning, skipping, collisions, lookups, incremental updates, compatibility, hashes."""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from fixture_paths import FIXTURES

from sdrepl.core import library as library_module
from sdrepl.core.embedding import CLIP_G, CLIP_L, SINGLE
from sdrepl.core.formats import write_embedding
from sdrepl.core.library import EmbeddingLibrary, LibraryChange

SD1 = {SINGLE: 768}


def put(path: Path, count: int = 1, seed: int = 0, width: int = 768) -> Path:
    """Write a small A1111 .pt / emb_params .safetensors / diffusers .bin, chosen by suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".pt": "pt", ".safetensors": "safetensors", ".bin": "diffusers"}[path.suffix]
    vectors = torch.randn(count, width, generator=torch.Generator().manual_seed(seed))
    return write_embedding(path, {SINGLE: vectors}, fmt, name=path.stem, overwrite=True)


def scanned(folder: Path, widths: dict[str, int] = SD1, **kwargs) -> EmbeddingLibrary:
    lib = EmbeddingLibrary([folder], widths, **kwargs)
    lib.scan()
    return lib


def test_mixed_folder_loads_good_files_and_lists_bad_ones(tmp_path: Path) -> None:
    shutil.copytree(FIXTURES / "a1111", tmp_path / "a1111")
    shutil.copytree(FIXTURES / "diffusers", tmp_path / "diffusers")
    (tmp_path / "cut.pt").write_bytes((FIXTURES / "a1111/bad-hands-5.pt").read_bytes()[:999])
    torch.save({"string_to_param": {"*": torch.full((1, 768), float("nan"))}}, tmp_path / "nan.pt")
    torch.save({"<a>": torch.zeros(768), "<b>": torch.zeros(768)}, tmp_path / "two.bin")
    torch.save({"emb_params": torch.zeros(80, 768)}, tmp_path / "long.pt")
    (tmp_path / "empty.pt").touch()
    (tmp_path / "notes.txt").write_text("not an embedding")
    (tmp_path / ".half.pt.sdrepl-abc.tmp").write_bytes(b"partial")
    shutil.copy(FIXTURES / "a1111/bad-hands-5.pt", tmp_path / "a1111" / "bad-hands-5.preview.png")
    lib = scanned(tmp_path)
    assert [e.trigger for e in lib.embeddings()] == [
        "bad-artist", "bad-artist-anime", "bad-hands-5", "bad-prompt", "bad_prompt_version2", "birb-style",
        "EasyNegative", "eyeliner2",
    ]
    skipped = {s.path.name: s.reason for s in lib.skipped()}
    assert sorted(skipped) == ["cut.pt", "long.pt", "nan.pt", "two.bin"]
    assert "80 vectors" in skipped["long.pt"] and "NaN" in skipped["nan.pt"]


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))), ids=lambda o: "".join(map(str, o)))
def test_collision_winner_is_deterministic_and_all_are_reachable(tmp_path: Path, order: tuple[int, ...]) -> None:
    files = [tmp_path / "b" / "Foo.safetensors", tmp_path / "foo.pt", tmp_path / "a" / "foo.bin"]
    for index in order:
        put(files[index], seed=index)
    lib = scanned(tmp_path)
    assert lib.get("foo").path == tmp_path / "foo.pt"  # shallowest wins
    assert lib.get("a/foo").path == tmp_path / "a" / "foo.bin"
    assert lib.get("b/Foo").path == tmp_path / "b" / "Foo.safetensors"
    [warning] = lib.warnings()
    assert all(str(f) in warning for f in files) and "3 files claim the trigger" in warning
    assert lib.triggers() == ["a/foo", "b/Foo", "foo"]


def test_collision_in_one_folder_uses_file_names(tmp_path: Path) -> None:
    put(tmp_path / "x.safetensors", seed=1)
    put(tmp_path / "x.pt", seed=2)
    lib = scanned(tmp_path)
    assert lib.get("x").path.name == "x.pt"
    assert lib.get("<x.safetensors>").path.name == "x.safetensors"


def test_identical_copies_are_one_embedding_not_a_collision(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "a1111/eyeliner2.pt", tmp_path / "eyeliner2.pt")
    (tmp_path / "copy").mkdir()
    shutil.copy(FIXTURES / "a1111/eyeliner2.pt", tmp_path / "copy" / "eyeliner2.pt")
    lib = scanned(tmp_path)
    assert lib.warnings() == [] and [len(e.files) for e in lib.embeddings()] == [2]


@pytest.mark.parametrize("name", ["bad-artist", "BAD-ARTIST", "<Bad-Artist>", "embedding:bad-artist", " bad-artist.pt"])
def test_get_is_case_insensitive_and_accepts_prompt_spellings(tmp_path: Path, name: str) -> None:
    shutil.copy(FIXTURES / "a1111/bad-artist.pt", tmp_path)
    found = scanned(tmp_path).get(name)
    assert found is not None and found.trigger == "bad-artist"


def test_get_unknown_and_suggestions(tmp_path: Path) -> None:
    shutil.copytree(FIXTURES / "a1111", tmp_path, dirs_exist_ok=True)
    lib = scanned(tmp_path)
    assert lib.get("bad-artst") is None
    assert lib.suggest("bad-artst")[:2] == ["bad-artist", "bad-artist-anime"]
    assert lib.suggest("bad-artst", limit=1) == ["bad-artist"]


def test_embeddings_sorted_case_insensitively(tmp_path: Path) -> None:
    for seed, name in enumerate(["beta", "Alpha", "gamma"]):
        put(tmp_path / f"{name}.pt", seed=seed)
    assert [e.trigger for e in scanned(tmp_path).embeddings()] == ["Alpha", "beta", "gamma"]


def test_incremental_add_modify_remove(tmp_path: Path) -> None:
    lib = scanned(tmp_path)
    version = lib.version
    change = lib.update_path(put(tmp_path / "new.pt", seed=1))
    assert change.added == ["new"] and lib.version == version + 1
    old_hash = lib.get("new").sha256
    change = lib.update_path(put(tmp_path / "new.pt", count=2, seed=2))
    assert change.updated == ["new"] and lib.get("new").num_vectors == 2 and lib.get("new").sha256 != old_hash
    assert not lib.update_path(tmp_path / "new.pt")  # unchanged file: no change, no version bump
    (tmp_path / "new.pt").unlink()
    change = lib.remove_path(tmp_path / "new.pt")
    assert change.removed == ["new"] and lib.get("new") is None


def test_incremental_folder_moved_in_and_out(tmp_path: Path) -> None:
    lib = scanned(tmp_path)
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    put(outside / "pack" / "one.pt", seed=1)
    put(outside / "pack" / "deeper" / "two.safetensors", seed=2)
    shutil.move(outside / "pack", tmp_path / "pack")
    assert lib.update_path(tmp_path / "pack").added == ["one", "two"]
    assert lib.get("pack/deeper/two") is not None
    shutil.rmtree(tmp_path / "pack")
    assert lib.remove_path(tmp_path / "pack").removed == ["one", "two"]
    assert lib.embeddings() == []


def test_update_of_vanished_folder_removes_its_files(tmp_path: Path) -> None:
    put(tmp_path / "gone" / "one.pt")
    lib = scanned(tmp_path)
    shutil.rmtree(tmp_path / "gone")
    assert lib.update_path(tmp_path / "gone").removed == ["one"]


def test_incremental_update_changes_collision_winner(tmp_path: Path) -> None:
    put(tmp_path / "sub" / "foo.pt", seed=1)
    lib = scanned(tmp_path)
    change = lib.update_path(put(tmp_path / "foo.pt", seed=2))
    assert change.added == ["foo"] and change.updated == ["sub/foo"] and change.warnings


def test_temporary_and_non_candidate_files_are_ignored_by_update(tmp_path: Path) -> None:
    lib = scanned(tmp_path)
    (tmp_path / ".x.pt.sdrepl-1.tmp").write_bytes(b"partial")
    (tmp_path / "readme.txt").write_text("hi")
    assert not lib.update_path(tmp_path / ".x.pt.sdrepl-1.tmp")
    assert not lib.update_path(tmp_path / "readme.txt")
    assert not lib.update_path(tmp_path.parent / "elsewhere.pt")  # outside every folder


def test_zero_byte_file_then_written(tmp_path: Path) -> None:
    lib = scanned(tmp_path)
    (tmp_path / "later.pt").touch()
    assert not lib.update_path(tmp_path / "later.pt") and lib.skipped() == []
    shutil.copy(FIXTURES / "a1111/eyeliner2.pt", tmp_path / "later.pt")
    assert lib.update_path(tmp_path / "later.pt").added == ["later"]


def test_symlink_loop_is_refused(tmp_path: Path) -> None:
    put(tmp_path / "sub" / "inside.pt")
    os.symlink(tmp_path, tmp_path / "sub" / "loop")
    os.symlink(tmp_path / "sub", tmp_path / "again")
    lib = scanned(tmp_path)
    assert [e.qualified for e in lib.embeddings()] == ["sub/inside"]
    assert any("loop" in w for w in lib.warnings())
    assert not lib.update_path(tmp_path / "sub")  # an incremental rescan does not follow the loop either
    assert [e.qualified for e in lib.embeddings()] == ["sub/inside"]


def test_symlinked_folder_is_followed(tmp_path: Path) -> None:
    put(tmp_path / "real" / "linked.pt")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(tmp_path / "real", root / "link")
    assert scanned(root).get("link/linked").path == root / "link" / "linked.pt"


def test_incompatible_width_is_skipped_with_reason(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "a1111/bad-artist.pt", tmp_path)
    lib = scanned(tmp_path, {SINGLE: 1024}, model_label="SD 2.x")
    assert lib.embeddings() == [] and lib.get("bad-artist") is None
    [skip] = lib.skipped()
    assert skip.reason.startswith("768-wide embedding, model expects 1024")
    change = lib.set_encoder_widths(SD1, "SD 1.x")
    assert change.added == ["bad-artist"] and change.unskipped == [tmp_path / "bad-artist.pt"]


def test_sdxl_pair_on_sd1_and_sd1_on_sdxl_are_skipped_with_reasons(tmp_path: Path) -> None:
    pair = {CLIP_L: torch.zeros(1, 768), CLIP_G: torch.zeros(1, 1280)}
    write_embedding(tmp_path / "xl.safetensors", pair, name="xl")
    shutil.copy(FIXTURES / "a1111/eyeliner2.pt", tmp_path)
    lib = scanned(tmp_path)
    assert [e.trigger for e in lib.embeddings()] == ["eyeliner2"]
    assert "SDXL embedding" in lib.skipped()[0].reason
    lib.set_encoder_widths({CLIP_L: 768, CLIP_G: 1280}, "SDXL")
    assert [e.trigger for e in lib.embeddings()] == ["xl"]
    assert "on an SDXL model" in lib.skipped()[0].reason and "A1111" in lib.skipped()[0].reason


def test_hashes_are_full_sha256_and_cached_by_size_and_mtime(tmp_path: Path, monkeypatch) -> None:
    shutil.copytree(FIXTURES / "a1111", tmp_path, dirs_exist_ok=True)
    lib = scanned(tmp_path)
    emb = lib.get("eyeliner2")
    assert emb.sha256 == hashlib.sha256(emb.path.read_bytes()).hexdigest() and emb.short_hash == emb.sha256[:12]
    assert lib.hash_cache.misses == 7
    reads = []
    original = library_module.read_embedding_bytes
    monkeypatch.setattr(library_module, "read_embedding_bytes", lambda p, d: reads.append(p) or original(p, d))
    assert not lib.scan()
    assert reads == [] and lib.hash_cache.misses == 7  # unchanged files are neither read nor hashed again
    shutil.copy(FIXTURES / "a1111/bad-artist.pt", tmp_path / "eyeliner2.pt")
    assert lib.scan().updated == ["eyeliner2"] and reads == [tmp_path / "eyeliner2.pt"]
    assert lib.get("eyeliner2").sha256 == lib.get("bad-artist").sha256


def test_missing_folder_is_a_warning(tmp_path: Path) -> None:
    lib = scanned(tmp_path / "nope")
    assert lib.embeddings() == [] and "does not exist" in lib.warnings()[0]


def test_change_description_is_json_safe(tmp_path: Path) -> None:
    import json

    put(tmp_path / "a.pt")
    (tmp_path / "b.pt").write_bytes(b"junk")
    change = EmbeddingLibrary([tmp_path], SD1).scan()
    assert json.loads(json.dumps(change.describe()))["added"] == ["a"]
    assert bool(change) and not LibraryChange()


def test_reads_during_updates_see_consistent_snapshots(tmp_path: Path) -> None:
    lib = scanned(tmp_path)
    paths = [put(tmp_path / f"e{i}.pt", seed=i) for i in range(20)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                for emb in lib.embeddings():
                    assert lib.get(emb.qualified) is not None or lib.version
                lib.suggest("e1")
                lib.triggers()
        except BaseException as exc:  # noqa: BLE001 - report anything to the main thread
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(3):
            for path in paths:
                lib.update_path(path)
            for path in paths[::2]:
                lib.remove_path(path)
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert len(lib.embeddings()) == 10


def test_forced_update_rereads_a_same_size_overwrite_with_the_same_mtime(tmp_path: Path) -> None:
    """The watcher forces a re-read on a close event: an overwrite can keep both size and mtime."""
    path = put(tmp_path / "same.pt", seed=1)
    lib = scanned(tmp_path)
    before = lib.get("same").sha256
    stat = os.stat(path)
    put(path, seed=2)  # same shape, so the same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size
    assert not lib.update_path(path)  # size and mtime say "unchanged"
    change = lib.update_path(path, force=True)
    assert change.updated == ["same"] and lib.get("same").sha256 != before
