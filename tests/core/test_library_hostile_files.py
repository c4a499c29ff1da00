"""The library is the boundary that keeps the daemon up: a reader bug skips one file (logged, with a reason
saying it is a bug), a FIFO or device in the folder never blocks a scan, the other files keep loading."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest
import torch

from sdrepl.core import library as library_module
from sdrepl.core.embedding import SINGLE
from sdrepl.core.formats import write_embedding
from sdrepl.core.library import EmbeddingLibrary


def _good(folder: Path, name: str) -> Path:
    return write_embedding(folder / f"{name}.safetensors", {SINGLE: torch.ones(1, 768)}, name=name)


def test_reader_bug_skips_the_file_with_a_bug_reason_and_logs_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    _good(tmp_path, "fine")
    bad = _good(tmp_path, "trips-the-bug")
    real = library_module.read_embedding_bytes

    def reader(path: Path, data: bytes):
        if Path(path).name == bad.name:
            raise KeyError("unexpected")
        return real(path, data)

    monkeypatch.setattr(library_module, "read_embedding_bytes", reader)
    lib = EmbeddingLibrary([tmp_path], {SINGLE: 768})
    with caplog.at_level(logging.ERROR, logger="sdrepl.core.library"):
        lib.scan()
    assert [e.trigger for e in lib.embeddings()] == ["fine"]
    (skipped,) = lib.skipped()
    assert skipped.path == bad and "bug" in skipped.reason and "KeyError" in skipped.reason
    assert any(str(bad) in record.getMessage() for record in caplog.records)


def test_fifo_in_the_folder_never_blocks_a_scan(tmp_path: Path) -> None:
    _good(tmp_path, "fine")
    os.mkfifo(tmp_path / "pipe.pt")
    lib = EmbeddingLibrary([tmp_path], {SINGLE: 768})
    thread = threading.Thread(target=lambda: (lib.scan(), lib.update_path(tmp_path / "pipe.pt", force=True)),
                              daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "the scan blocked on a FIFO"
    assert [e.trigger for e in lib.embeddings()] == ["fine"]
