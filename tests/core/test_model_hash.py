"""The model hash never holds up a picture: big checkpoints are hashed in the background, remembered on
disk by (path, size, mtime), and pictures made before the hash is known carry no ``Model hash``."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from pathlib import Path

from sdrepl.core import model_hash as model_hash_module
from sdrepl.core.generation import GenerationJob, run_generation
from sdrepl.core.hashing import PersistentHashes
from sdrepl.core.model_hash import SYNC_BYTES, ModelHasher
from sdrepl.core.outputs import OutputFolder
from sdrepl.core.pnginfo import parse_parameters, read_png_parameters
from sdrepl.core.prompt import StaticLookup


def big_file(path: Path) -> Path:
    with open(path, "wb") as fh:
        fh.write(b"weights")
        fh.seek(SYNC_BYTES + 1024)
        fh.write(b"end")
    return path


def test_a_big_file_is_hashed_in_the_background_and_remembered(tmp_path: Path) -> None:
    path = big_file(tmp_path / "model.safetensors")
    table = PersistentHashes(tmp_path / "cache" / "hashes.json")
    hasher = ModelHasher(path, table)
    assert hasher.describe()["state"] == "hashing" and hasher.short == ""
    hasher.start()
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert hasher.wait(60) == expected[:10] and hasher.describe()["state"] == "known"
    assert hasher.describe()["done_mb"] == hasher.describe()["total_mb"]
    # A new daemon start: known at once from the table on disk, no thread.
    again = ModelHasher(path, PersistentHashes(tmp_path / "cache" / "hashes.json"))
    assert again.short == expected[:10] and again._thread is None
    # The file changed (new mtime): hashed again.
    os.utime(path, ns=(1, 1))
    assert ModelHasher(path, PersistentHashes(tmp_path / "cache" / "hashes.json")).short == ""


def test_a_damaged_table_is_an_empty_one(tmp_path: Path) -> None:
    (tmp_path / "hashes.json").write_text("{not json")
    small = tmp_path / "unet.safetensors"
    small.write_bytes(b"small weights")
    assert ModelHasher(small, PersistentHashes(tmp_path / "hashes.json")).short == hashlib.sha256(
        b"small weights").hexdigest()[:10]


def test_pictures_do_not_wait_for_the_hash_and_record_it_once_known(tiny_model, tmp_path, monkeypatch) -> None:
    gate = threading.Event()
    real_run = ModelHasher._run

    def slow_run(self) -> None:
        assert gate.wait(60)
        real_run(self)

    monkeypatch.setattr(model_hash_module, "SYNC_BYTES", 0)  # every file counts as big
    monkeypatch.setattr(ModelHasher, "_run", slow_run)
    model = dataclasses.replace(tiny_model)  # a copy with its own hash job
    model._hasher = None
    table = PersistentHashes(tmp_path / "hashes.json")
    model._hasher = ModelHasher(model.path, table)
    model._hasher.start()
    job = GenerationJob("a red cube", "", 1, 7.0, 3, 64, 64, "Euler a", 1, 1)
    outputs = OutputFolder(tmp_path / "out")
    try:
        first = run_generation(model, StaticLookup(), job, outputs)["images"][0]["path"]
        assert model._hasher.describe()["state"] == "hashing"  # the picture did not wait
        text = read_png_parameters(Path(first))
        assert "Model hash" not in text and parse_parameters(text)["model_hash"] is None
    finally:
        gate.set()
    model._hasher.wait(60)
    second = run_generation(model, StaticLookup(), job, outputs)["images"][0]["path"]
    assert parse_parameters(read_png_parameters(Path(second)))["model_hash"] == model.model_hash != ""


def test_status_text_shows_the_hash_or_its_progress() -> None:
    from sdrepl.core.status_text import format_status

    hashing = format_status({"model_hash": {"state": "hashing", "done_mb": 512.0, "total_mb": 2048.0}})
    assert "model hash: computing, 512 of 2048 MB (25%)" in hashing and "no Model hash" in hashing
    assert "model hash: abcdef1234" in format_status({"model_hash": {"state": "known", "hash": "abcdef1234"}})
