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


_SNIPPETS = [b"}", b"]", b")", b"(", b"t", b"\x85", b"\x86", b"\x87", b"s", b"u", b"a", b"e", b"q\x00", b"q\x01",
             b"h\x00", b"h\x01", b"K\x05", b"M\x05\x01", b"J\x05\x00\x00\x00", b"\x88", b"\x89", b"N", b"0", b"2",
             b"1", b"X\x01\x00\x00\x000", b"X\x07\x00\x00\x00storage", b"X\x03\x00\x00\x00cpu", b"\x8a\x01\x05",
             b"ctorch._utils\n_rebuild_tensor_v2\n", b"ccollections\nOrderedDict\n", b"ctorch\nFloatStorage\n",
             b"ctorch._utils\n_rebuild_parameter\n", b"ctorch.nn.modules.container\nParameterDict\n",
             b"c__builtin__\nset\n", b"R", b"Q", b"\x81", b"b"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.sampled_from(_SNIPPETS), max_size=60))
def test_random_opcode_streams_are_refused_or_inspected(ops: list[bytes]) -> None:
    """The inspector (opcode scan, restricted unpickler, size checks) raises only PickleRefused on any stream
    of the opcodes torch.save uses, in any order, with the allowed globals."""
    from attack_corpus import torch_zip

    from sdrepl.core.formats.limits import EMBEDDING_LIMITS
    from sdrepl.core.formats.pickle_scan import PickleRefused, inspect_torch_file

    data = torch_zip(b"\x80\x02" + b"".join(ops) + b".", {"data/0": bytes(64), "version": b"3\n"})
    try:
        inspect_torch_file(data, EMBEDDING_LIMITS)
    except PickleRefused:
        pass
