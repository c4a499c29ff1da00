"""Writers: every format reads back bit-identical, A1111's exact layout, and the overwrite/suffix rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sdrepl import __version__
from sdrepl.core.embedding import CLIP_G, CLIP_L, SINGLE
from sdrepl.core.errors import EmbeddingError
from sdrepl.core.formats import decide_trigger, read_embedding, write_embedding


def vectors(count: int = 3, width: int = 768, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("fmt", "name", "layout"),
    [
        ("safetensors", "style.safetensors", "safetensors/emb_params"),
        ("pt", "style.pt", "pt/a1111"),
        ("diffusers", "style.bin", "bin/diffusers"),
        ("diffusers", "style.safetensors", "safetensors/diffusers"),
    ],
)
def test_round_trip_is_bit_identical(tmp_path: Path, fmt: str, name: str, layout: str) -> None:
    original = vectors()
    path = write_embedding(tmp_path / name, {SINGLE: original}, fmt, name="style", step=120)
    data = read_embedding(path)
    assert data.format == layout
    assert torch.equal(data.vectors[SINGLE], original)
    assert decide_trigger(path, data) == "style"


def test_sdxl_pair_round_trip(tmp_path: Path) -> None:
    pair = {CLIP_L: vectors(2, 768), CLIP_G: vectors(2, 1280, seed=1)}
    data = read_embedding(write_embedding(tmp_path / "xl.safetensors", pair, name="xl"))
    assert all(torch.equal(data.vectors[k], pair[k]) for k in pair)


def test_pt_has_a1111_exact_layout(tmp_path: Path) -> None:
    original = vectors(2)
    path = write_embedding(
        tmp_path / "a.pt", {SINGLE: original}, "pt", name="a", step=500, checkpoint_hash="7ab762a7",
        checkpoint_name="sd15", init_text="ignored by A1111",
    )
    saved = torch.load(path, weights_only=True)
    assert list(saved) == ["string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"]
    assert saved["string_to_token"] == {"*": 265}
    assert list(saved["string_to_param"]) == ["*"] and torch.equal(saved["string_to_param"]["*"], original)
    assert (saved["name"], saved["step"], saved["sd_checkpoint"], saved["sd_checkpoint_name"]) == (
        "a", 500, "7ab762a7", "sd15",
    )


def test_safetensors_header_metadata(tmp_path: Path) -> None:
    path = write_embedding(
        tmp_path / "m.safetensors", {SINGLE: vectors(4)}, name="m", step=9, checkpoint_hash="abc123",
        checkpoint_name="model", init_text="a tree",
    )
    with safe_open(str(path), "pt") as fh:
        assert list(fh.keys()) == ["emb_params"]
        meta = fh.metadata()
    assert meta == {
        "name": "m", "step": "9", "sd_checkpoint": "abc123", "sd_checkpoint_name": "model", "init_text": "a tree",
        "vectors": "4", "sdrepl_version": __version__,
    }
    data = read_embedding(path)
    assert (data.inner_name, data.step, data.checkpoint_hash, data.init_text) == ("m", 9, "abc123", "a tree")


def test_diffusers_bin_holds_one_bracketed_token(tmp_path: Path) -> None:
    path = write_embedding(tmp_path / "d.bin", {SINGLE: vectors(2)}, "diffusers", name="cat-toy")
    assert list(torch.load(path, weights_only=True)) == ["<cat-toy>"]


def test_existing_file_needs_overwrite(tmp_path: Path) -> None:
    path = write_embedding(tmp_path / "keep.safetensors", {SINGLE: vectors(seed=1)}, name="keep")
    before = path.read_bytes()
    with pytest.raises(EmbeddingError, match="--overwrite"):
        write_embedding(path, {SINGLE: vectors(seed=2)}, name="keep")
    assert path.read_bytes() == before
    write_embedding(path, {SINGLE: vectors(seed=2)}, name="keep", overwrite=True)
    assert torch.equal(read_embedding(path).vectors[SINGLE], vectors(seed=2))


def test_missing_suffix_is_added(tmp_path: Path) -> None:
    assert write_embedding(tmp_path / "plain", {SINGLE: vectors()}, "pt", name="plain").name == "plain.pt"


def test_suffix_must_match_format(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingError, match=r"must be named \*\.pt"):
        write_embedding(tmp_path / "x.safetensors", {SINGLE: vectors()}, "pt", name="x")


def test_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingError, match="unknown format 'ckpt'"):
        write_embedding(tmp_path / "x.ckpt", {SINGLE: vectors()}, "ckpt", name="x")


def test_an_sdxl_pair_is_refused_in_diffusers_layout_with_the_route_that_works(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingError, match="not SDXL's two .*convert to safetensors or pt.*load_textual_inversion"):
        write_embedding(tmp_path / "xl", {CLIP_L: vectors(1), CLIP_G: vectors(1, 1280)}, "diffusers", name="xl")


def test_an_sdxl_pair_as_pt_holds_only_the_two_tensors_and_reads_back(tmp_path: Path) -> None:
    pair = {CLIP_L: vectors(2), CLIP_G: vectors(2, 1280)}
    path = write_embedding(tmp_path / "xl", pair, "pt", name="xl", step=5)
    stored = torch.load(path, weights_only=True)
    assert set(stored) == {CLIP_L, CLIP_G}  # A1111 moves every value of a pair dict to the device
    back = read_embedding(path)
    assert back.format == "pt/sdxl" and all(torch.equal(back.vectors[k], pair[k]) for k in pair)


@pytest.mark.parametrize(
    "bad",
    [torch.full((1, 768), float("nan")), torch.zeros(0, 768), torch.zeros(76, 768), torch.zeros(768)],
    ids=["nan", "empty", "too-many", "1d"],
)
def test_invalid_vectors_are_not_written(tmp_path: Path, bad: torch.Tensor) -> None:
    with pytest.raises(EmbeddingError):
        write_embedding(tmp_path / "bad.safetensors", {SINGLE: bad}, name="bad")
    assert list(tmp_path.iterdir()) == []


def test_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    write_embedding(tmp_path / "a.safetensors", {SINGLE: vectors()}, name="a")
    write_embedding(tmp_path / "a.safetensors", {SINGLE: vectors()}, name="a", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]
