"""Converting embeddings: the output keeps the trigger and the vectors; the command line works."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixture_paths import FIXTURES

from sdrepl.core.convert import convert_embedding, embedding_from_file, main
from sdrepl.core.embedding import SINGLE
from sdrepl.core.errors import EmbeddingError
from sdrepl.core.formats import decide_trigger, read_embedding
from sdrepl.core.library import EmbeddingLibrary


@pytest.fixture
def eyeliner(tmp_path: Path) -> Path:
    return Path(shutil.copy(FIXTURES / "a1111/eyeliner2.pt", tmp_path / "eyeliner2.pt"))


@pytest.mark.parametrize(
    ("to", "relpath", "step"),
    [
        ("safetensors", "eyeliner2.safetensors", 3727),
        ("diffusers", "eyeliner2/learned_embeds.bin", None),  # {token: tensor} has no room for metadata
        ("png", "eyeliner2.png", 3727),
    ],
)
def test_conversion_keeps_trigger_and_vectors(eyeliner: Path, to: str, relpath: str, step: int | None) -> None:
    source = embedding_from_file(eyeliner)
    written = convert_embedding(source, to)
    assert written == eyeliner.parent / relpath
    data = read_embedding(written)
    assert decide_trigger(written, data) == "eyeliner2"
    assert torch.equal(data.vectors[SINGLE], source.vectors[SINGLE])
    assert data.step == step


def test_safetensors_to_a1111_pt(tmp_path: Path) -> None:
    source = embedding_from_file(Path(shutil.copy(FIXTURES / "a1111/EasyNegative.safetensors", tmp_path)))
    written = convert_embedding(source, "pt")
    saved = torch.load(written, weights_only=True)
    assert written.name == "EasyNegative.pt" and saved["name"] == "EasyNegative"
    assert torch.equal(saved["string_to_param"]["*"], source.vectors[SINGLE])


def test_learned_embeds_converts_to_trigger_named_file(tmp_path: Path) -> None:
    shutil.copytree(FIXTURES / "diffusers/birb-style", tmp_path / "birb-style")
    written = convert_embedding(embedding_from_file(tmp_path / "birb-style" / "learned_embeds.bin"), "safetensors")
    assert written == tmp_path / "birb-style" / "birb-style.safetensors"


def test_converted_copy_is_the_same_embedding_and_the_original_stays_active(eyeliner: Path) -> None:
    written = convert_embedding(embedding_from_file(eyeliner), "diffusers")
    lib = EmbeddingLibrary([eyeliner.parent], {SINGLE: 768})
    lib.scan()
    assert lib.get("eyeliner2").path == eyeliner and lib.get("eyeliner2").files == (eyeliner, written)
    assert lib.get("eyeliner2/eyeliner2") is lib.get("eyeliner2")  # the copy's own name still reaches it
    assert lib.warnings() == []


def test_same_format_is_refused(eyeliner: Path) -> None:
    with pytest.raises(EmbeddingError, match="already a pt file"):
        convert_embedding(embedding_from_file(eyeliner), "pt")


def test_existing_output_needs_overwrite(eyeliner: Path) -> None:
    emb = embedding_from_file(eyeliner)
    convert_embedding(emb, "safetensors")
    with pytest.raises(EmbeddingError, match="--overwrite"):
        convert_embedding(emb, "safetensors")
    assert convert_embedding(emb, "safetensors", overwrite=True).exists()


def test_main_writes_and_prints_path(eyeliner: Path, capsys) -> None:
    assert main([str(eyeliner), "--to", "safetensors"]) == 0
    assert capsys.readouterr().out.strip() == str(eyeliner.with_suffix(".safetensors"))


def test_main_reports_errors_without_traceback(tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    assert main([str(broken), "--to", "safetensors"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sdrepl: {broken}:") and "Traceback" not in err


def test_main_output_option(eyeliner: Path, tmp_path: Path) -> None:
    target = tmp_path / "out" / "renamed.bin"
    assert main([str(eyeliner), "--to", "diffusers", "--output", str(target)]) == 0
    assert list(torch.load(target, weights_only=True)) == ["<eyeliner2>"]


@pytest.mark.slow
def test_sdrepl_convert_command_refuses_a_same_format_copy(eyeliner: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sdrepl", "convert", str(eyeliner), "--to", "pt"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "already a pt file" in result.stderr
