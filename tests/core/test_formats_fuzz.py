"""Property: whatever bytes a damaged file holds, read_embedding raises nothing but EmbeddingError.

The readers catch only what their parsers raise for bad input, so an unexpected exception type (a bug)
escapes and fails this test; the library, not the readers, keeps the daemon up in that case.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from attack_corpus import CODE, FORMAT
from fixture_paths import FIXTURES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdrepl.core.embedding import SINGLE
from sdrepl.core.errors import EmbeddingError
from sdrepl.core.formats import read_embedding, write_png_card

SOURCES = sorted(p for p in FIXTURES.rglob("*") if p.is_file())


def _card_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = write_png_card(Path(folder) / "card.png", {SINGLE: torch.ones(1, 768)}, name="c", step=1, preview=None)
        return path.read_bytes()


SAMPLES = ([(p.name, p.read_bytes()) for p in SOURCES] + [("card.png", _card_bytes())]
           + [(a.filename, a.build(Path("/nonexistent/marker"))) for a in CODE + FORMAT if a.name != "torchscript"])


@st.composite
def mutated(draw) -> tuple[str, bytes]:
    name, data = draw(st.sampled_from(SAMPLES))
    buffer = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite-head"]))
        if not buffer:
            break
        at = draw(st.integers(0, len(buffer) - 1))
        if kind == "flip":
            buffer[at] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del buffer[at:]
        elif kind == "insert":
            buffer[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del buffer[at : at + draw(st.integers(1, 64))]
        else:  # headers and length fields live at the start of every container
            head = draw(st.binary(min_size=1, max_size=12))
            buffer[: len(head)] = head
    return name, bytes(buffer)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sample=mutated())
def test_mutated_files_raise_only_embedding_error(sample: tuple[str, bytes]) -> None:
    name, data = sample
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(data)
        try:
            read_embedding(path)
        except EmbeddingError as exc:
            assert str(exc).startswith(str(path))


def test_an_unexpected_exception_in_a_reader_is_not_hidden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What makes the property above able to fail: a reader bug surfaces as itself, not as EmbeddingError."""
    from sdrepl.core.formats import pickle_file

    def buggy(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(pickle_file, "recognise", buggy)
    path = tmp_path / "x.pt"
    path.write_bytes((FIXTURES / "a1111" / "bad-artist.pt").read_bytes())
    with pytest.raises(ZeroDivisionError):
        read_embedding(path)
