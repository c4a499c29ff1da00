"""Reading real-world embedding files: the shared fixtures, every layout, and the naming rules."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from fixture_paths import FIXTURES

from sdrepl.core.embedding import CLIP_G, CLIP_L, SINGLE
from sdrepl.core.formats import NotAnEmbedding, decide_trigger, is_candidate, read_embedding
from sdrepl.core.formats.safetensors_file import encode_safetensors

FIXTURE_CASES = [
    ("a1111/bad-artist.pt", "bad-artist", 2),
    ("a1111/bad-artist-anime.pt", "bad-artist-anime", 2),
    ("a1111/bad-hands-5.pt", "bad-hands-5", 2),
    ("a1111/bad-prompt.pt", "bad-prompt", 16),
    ("a1111/bad_prompt_version2.pt", "bad_prompt_version2", 8),
    ("a1111/eyeliner2.pt", "eyeliner2", 3),
    ("a1111/EasyNegative.safetensors", "EasyNegative", 8),
    ("diffusers/birb-style/learned_embeds.bin", "birb-style", 1),
]


@pytest.mark.parametrize(("relpath", "trigger", "count"), FIXTURE_CASES, ids=[c[1] for c in FIXTURE_CASES])
def test_fixture_loads_with_trigger_count_and_width(relpath: str, trigger: str, count: int) -> None:
    path = FIXTURES / relpath
    data = read_embedding(path)
    assert decide_trigger(path, data) == trigger
    assert data.num_vectors == count
    assert data.widths == {SINGLE: 768}
    vectors = data.vectors[SINGLE]
    assert vectors.dtype == torch.float32 and vectors.device.type == "cpu" and not vectors.requires_grad


def test_a1111_fixture_keeps_informational_fields() -> None:
    data = read_embedding(FIXTURES / "a1111/bad-artist-anime.pt")
    assert (data.inner_name, data.step, data.checkpoint_hash, data.checkpoint_name) == (
        "bad-artist-2", 1850, "7ab762a7", "blossom-extract",
    )
    assert data.format == "pt/a1111"


def test_diffusers_generic_stem_without_token_uses_folder(tmp_path: Path) -> None:
    folder = tmp_path / "my-concept"
    folder.mkdir()
    torch.save({"string_to_param": {"*": torch.ones(2, 768)}}, folder / "learned_embeds-steps-500.bin")
    path = folder / "learned_embeds-steps-500.bin"
    assert decide_trigger(path, read_embedding(path)) == "my-concept"


def test_renamed_diffusers_file_uses_its_stem(tmp_path: Path) -> None:
    path = tmp_path / "birdie.bin"
    shutil.copy(FIXTURES / "diffusers/birb-style/learned_embeds.bin", path)
    data = read_embedding(path)
    assert data.inner_name == "birb-style"
    assert decide_trigger(path, data) == "birdie"


def test_sdxl_pair_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "xl.safetensors"
    path.write_bytes(encode_safetensors({"clip_l": torch.ones(3, 768), "clip_g": torch.ones(3, 1280)}, {}))
    data = read_embedding(path)
    assert data.widths == {CLIP_L: 768, CLIP_G: 1280} and data.num_vectors == 3


def test_container_is_chosen_by_content_not_extension(tmp_path: Path) -> None:
    path = tmp_path / "misnamed.pt"
    shutil.copy(FIXTURES / "a1111/EasyNegative.safetensors", path)
    assert read_embedding(path).format == "safetensors/emb_params"


def test_half_precision_vectors_become_float32(tmp_path: Path) -> None:
    path = tmp_path / "half.pt"
    torch.save({"string_to_param": {"*": torch.full((2, 768), 0.5, dtype=torch.float16)}}, path)
    vectors = read_embedding(path).vectors[SINGLE]
    assert vectors.dtype == torch.float32 and torch.equal(vectors, torch.full((2, 768), 0.5))


def test_legacy_parameterdict_module_loads_without_running_module_code(tmp_path: Path) -> None:
    # The original textual-inversion code pickled string_to_param as an nn.ParameterDict module.
    legacy = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.arange(1536.0).reshape(2, 768))})
    path = tmp_path / "old.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": legacy, "name": "old"}, path)
    data = read_embedding(path)
    assert torch.equal(data.vectors[SINGLE], torch.arange(1536.0).reshape(2, 768))
    assert type(data.vectors[SINGLE]) is torch.Tensor


@pytest.mark.parametrize(
    ("name", "candidate"),
    [
        ("a.pt", True), ("a.BIN", True), ("a.ckpt", True), ("a.safetensors", True), ("a.png", True),
        ("a.webp", True), ("a.txt", False), ("a.json", False), ("a.preview.png", False),
        (".a.pt.sdrepl-x1.tmp", False), ("._a.pt", False), ("noext", False),
    ],
)
def test_is_candidate(name: str, candidate: bool) -> None:
    assert is_candidate(Path(name)) is candidate


@pytest.mark.parametrize("name", ["notes.txt", "a.preview.png", "._mac.pt", ".x.pt.sdrepl-1.tmp"])
def test_non_candidates_raise_not_an_embedding(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"anything")
    with pytest.raises(NotAnEmbedding):
        read_embedding(path)
