"""Broken, hostile and unsupported files: one scenario each, each a clear EmbeddingError naming the file."""

from __future__ import annotations

import builtins
import random
import struct
from pathlib import Path

import pytest
import torch
from fixture_paths import FIXTURES

from sdrepl.core.errors import EmbeddingError
from sdrepl.core.formats import NotAnEmbedding, read_embedding
from sdrepl.core.formats.safetensors_file import encode_safetensors


def a1111(vectors: object) -> dict:
    return {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "x", "step": 1}


def read_error(path: Path) -> EmbeddingError:
    with pytest.raises(EmbeddingError) as info:
        read_embedding(path)
    assert not isinstance(info.value, NotAnEmbedding)
    assert str(info.value).startswith(str(path))
    return info.value


class _WouldRunCode:
    """Unpickling this calls open(marker, "w"): a stand-in for any code a hostile pickle could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


def test_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save(a1111(_WouldRunCode(marker)), path)
    error = read_error(path)
    assert "safe load" in error.reason and "not loaded" in error.reason and "io.open" in error.reason
    assert not marker.exists()
    # The file really is hostile: an unsafe load (never done by sdrepl) would have run the code.
    try:
        torch.load(path, weights_only=False)
    except Exception:
        pass
    assert marker.exists()


def test_truncated_pickle(tmp_path: Path) -> None:
    path = tmp_path / "cut.pt"
    path.write_bytes((FIXTURES / "a1111/bad-artist.pt").read_bytes()[:3000])
    assert "truncated or corrupt" in read_error(path).reason


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".bin"])
def test_random_bytes(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"noise{suffix}"
    path.write_bytes(random.Random(7).randbytes(4096))
    read_error(path)


def test_safetensors_header_lying_about_its_length(tmp_path: Path) -> None:
    data = bytearray((FIXTURES / "a1111/EasyNegative.safetensors").read_bytes())
    data[:8] = struct.pack("<Q", 10**9)
    path = tmp_path / "liar.safetensors"
    path.write_bytes(bytes(data))
    assert "header claims 1000000000 bytes" in read_error(path).reason


def test_safetensors_byte_range_outside_file(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes((FIXTURES / "a1111/EasyNegative.safetensors").read_bytes()[:-100])
    assert "outside" in read_error(path).reason


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_values(tmp_path: Path, bad: float) -> None:
    vectors = torch.zeros(2, 768)
    vectors[1, 5] = bad
    path = tmp_path / "diverged.pt"
    torch.save(a1111(vectors), path)
    assert "NaN or infinite" in read_error(path).reason


def test_zero_vectors(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    torch.save(a1111(torch.zeros(0, 768)), path)
    assert "0 vectors" in read_error(path).reason


def test_more_than_75_vectors(tmp_path: Path) -> None:
    path = tmp_path / "long.safetensors"
    path.write_bytes(encode_safetensors({"emb_params": torch.zeros(76, 768)}, {}))
    assert "76 vectors" in read_error(path).reason and "75" in read_error(path).reason


def test_several_terms_in_string_to_param(tmp_path: Path) -> None:
    path = tmp_path / "two.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 768), "x": torch.zeros(2, 768)}}, path)
    reason = read_error(path).reason
    assert "2 terms" in reason and "'x' (tensor [2, 768] float32)" in reason


def test_several_tensors_in_diffusers_dict(tmp_path: Path) -> None:
    path = tmp_path / "two.bin"
    torch.save({"<a>": torch.zeros(768), "<b>": torch.zeros(768)}, path)
    reason = read_error(path).reason
    assert "2 tensors" in reason and "'<a>'" in reason and "'<b>'" in reason


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (a1111([0.1, 0.2]), "list of 2"),
        ({"<tok>": "not a tensor"}, "str of length"),
        ({"emb_params": torch.zeros(2, 768, dtype=torch.int64)}, "floating-point"),
        (a1111(torch.zeros(1, 2, 768)), "3 dimensions"),
        ({"string_to_param": [torch.zeros(1, 768)]}, "expected a dict with one term"),
        ([torch.zeros(1, 768)], "expected one of"),
        ({"clip_l": torch.zeros(1, 768)}, "needs both"),
    ],
    ids=["list-vectors", "string-value", "int-tensor", "3d-tensor", "list-terms", "top-level-list", "half-pair"],
)
def test_wrong_value_types(tmp_path: Path, obj: object, expected: str) -> None:
    path = tmp_path / "wrong.pt"
    torch.save(obj, path)
    reason = read_error(path).reason
    assert expected in reason
    assert "0.1" not in reason  # shapes and types, never values


def test_broken_png(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + random.Random(3).randbytes(300))
    assert "cannot be read as a picture" in read_error(path).reason


def test_file_too_large_to_be_an_embedding(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    with open(path, "wb") as fh:
        fh.truncate(40 * 1024 * 1024)
    assert "checkpoint or LoRA" in read_error(path).reason


def test_lora_safetensors_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "lora.safetensors"
    path.write_bytes(encode_safetensors({f"lora_unet_{i}.alpha": torch.zeros(1) for i in range(20)}, {}))
    assert "model or LoRA" in read_error(path).reason


def test_zero_byte_file_is_skipped_silently(tmp_path: Path) -> None:
    path = tmp_path / "writing.pt"
    path.touch()
    with pytest.raises(NotAnEmbedding, match="empty"):
        read_embedding(path)


def test_preview_picture_is_skipped_silently(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "bad-artist.preview.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(path)
    with pytest.raises(NotAnEmbedding, match="preview"):
        read_embedding(path)


def test_missing_file(tmp_path: Path) -> None:
    assert read_error(tmp_path / "gone.pt").reason == "no such file"
