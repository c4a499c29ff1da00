"""Names from files and users follow one rule (core/names.py); writers never leave their folder; a full disk
says "no space left" with the folder and leaves no empty diffusers folder; torch below the safety floor is
refused at start-up."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from sdrepl.core import dependencies
from sdrepl.core.convert import TARGETS, convert_embedding, embedding_from_file
from sdrepl.core.convert import main as convert_main
from sdrepl.core.embedding import SINGLE, Embedding
from sdrepl.core.errors import EmbeddingError, TrainingError
from sdrepl.core.formats import decide_trigger, read_embedding, write_embedding, write_png_card
from sdrepl.core.library import EmbeddingLibrary
from sdrepl.core.names import name_problem
from sdrepl.core.training.options import check_name

BAD_NAMES = ["", ".", "..", ".hidden", "a/b", "../../../../tmp/x", "a\\b", "x\x1b]2;PWNED\x07", "bell\x07",
             "nul\x00", "csi\x9b31m", "zw\u200bsp", "rtl\u202eo", "line\u2028sep", "two words", "tab\tx", "a:b",
             "<x>", "what?", "x" * 201]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n)[:20] for n in BAD_NAMES])
def test_bad_names_are_refused(name: str) -> None:
    assert name_problem(name) is not None


@pytest.mark.parametrize("name", ["bad-hands-5", "style_v2.1", "ünïcode", "日本語", "x" * 200])
def test_good_names_pass(name: str) -> None:
    assert name_problem(name) is None


@pytest.mark.parametrize("name", ["x\x1b]2;PWNED\x07", "bell\x07", "esc\x1b"])
def test_create_refuses_control_characters(name: str) -> None:
    with pytest.raises(TrainingError) as info:
        check_name(name, "!create")
    message = str(info.value)
    assert "control or invisible character" in message and "\x1b" not in message and "\x07" not in message


def _card(folder: Path, file_name: str, inner: str) -> Path:
    return write_png_card(folder / file_name, {SINGLE: torch.ones(1, 768)}, name=inner, step=1, preview=None)


def test_card_with_a_traversal_name_answers_to_its_file_name(tmp_path: Path) -> None:
    path = _card(tmp_path, "card.png", "../../../../tmp/x")
    data = read_embedding(path)
    assert data.inner_name == "../../../../tmp/x" and decide_trigger(path, data) == "card"
    lib = EmbeddingLibrary([tmp_path], {SINGLE: 768})
    lib.scan()
    assert [e.trigger for e in lib.embeddings()] == ["card"]
    assert any("not a usable name" in w and "<card>" in w for w in lib.warnings())


def test_card_with_a_good_inner_name_still_uses_it(tmp_path: Path) -> None:
    path = _card(tmp_path, "card.png", "my-style")
    assert decide_trigger(path, read_embedding(path)) == "my-style"


def test_learned_embeds_with_a_traversal_token_uses_its_folder(tmp_path: Path) -> None:
    folder = tmp_path / "concept"
    folder.mkdir()
    path = folder / "learned_embeds.bin"
    torch.save({"<../../escape>": torch.ones(768)}, path)
    assert decide_trigger(path, read_embedding(path)) == "concept"


def _hostile(tmp_path: Path, trigger: str) -> Embedding:
    """An embedding whose trigger leads out of its folder (as a card's inner name did before the rule)."""
    folder = tmp_path / "embeddings"
    folder.mkdir(exist_ok=True)
    source = write_embedding(folder / "source.safetensors", {SINGLE: torch.ones(1, 768)}, name="source")
    emb = embedding_from_file(source)
    return Embedding(trigger, trigger, emb.path, emb.data, emb.sha256, emb.size, emb.mtime_ns)


def _everything(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.mark.parametrize("to", TARGETS)
def test_every_format_refuses_to_write_outside_the_folder(tmp_path: Path, to: str) -> None:
    emb = _hostile(tmp_path, "../escape")
    before = _everything(tmp_path)
    with pytest.raises(EmbeddingError, match="refusing to write outside"):
        convert_embedding(emb, to)
    assert _everything(tmp_path) == before  # no file and no folder was created anywhere


def test_diffusers_refuses_a_subfolder_that_links_outside(tmp_path: Path) -> None:
    emb = _hostile(tmp_path, "linked")
    outside = tmp_path / "outside"
    outside.mkdir()
    (emb.path.parent / "linked").symlink_to(outside)
    with pytest.raises(EmbeddingError, match="refusing to write outside"):
        convert_embedding(emb, "diffusers")
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("to", TARGETS)
def test_disk_full_names_the_folder_and_leaves_nothing(tmp_path: Path, to: str, monkeypatch: pytest.MonkeyPatch) -> None:
    emb = _hostile(tmp_path, "full")
    before = _everything(tmp_path)

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(EmbeddingError) as info:
        convert_embedding(emb, to)
    monkeypatch.undo()
    assert "no space left" in info.value.reason and str(emb.path.parent) in info.value.reason
    assert _everything(tmp_path) == before  # no temporary, no empty <name>/ folder (diffusers)


@pytest.mark.parametrize(("version", "unsafe"), [("2.5.1", True), ("2.9.1+cu121", True), ("1.13.0", True),
                                                  ("nonsense", True), ("2.10.0", False), ("2.13.0+cpu", False),
                                                  ("3.0.0", False)])
def test_torch_floor(version: str, unsafe: bool) -> None:
    problem = dependencies.torch_problem(version)
    assert (problem is not None) == unsafe
    if unsafe:
        assert "CVE-2025-32434" in problem and "pip install 'torch>=2.10'" in problem


def test_installed_torch_passes() -> None:
    assert dependencies.torch_problem() is None


def test_convert_refuses_to_start_with_an_unsafe_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(dependencies, "installed_torch_version", lambda: "2.5.1")
    path = write_embedding(tmp_path / "x.safetensors", {SINGLE: torch.ones(1, 768)}, name="x")
    assert convert_main([str(path), "--to", "pt"]) == 2
    assert "torch 2.5.1 is too old" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_daemon_refuses_to_start_with_an_unsafe_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from sdrepl.config import Settings
    from sdrepl.daemon.runtime import run_daemon

    monkeypatch.setattr(dependencies, "installed_torch_version", lambda: "2.9.0")
    assert run_daemon(Settings(socket=tmp_path / "d.sock")) == 2
    assert "torch 2.9.0 is too old" in capsys.readouterr().err
    assert not (tmp_path / "d.sock").exists()


@pytest.mark.parametrize("line", ["!create x\x1b]2;PWNED\x07", "!create bell\x07", "!convert ../x --to pt"])
def test_repl_refuses_the_same_names(line: str) -> None:
    from sdrepl.core.errors import UsageError
    from sdrepl.repl.commands import parse_convert, parse_create

    parse = parse_create if line.startswith("!create") else parse_convert
    with pytest.raises(UsageError, match="not a usable embedding name") as info:
        parse(line.split(" ", 1)[1])
    assert "\x1b" not in str(info.value) and "\x07" not in str(info.value)
