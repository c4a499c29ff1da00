"""The real LoRA files: each loads with the right layout, rank and key count, and on an SD 1.5-shaped model
(built from the shipped SD 1.5 configs, on the meta device: shapes without memory) every key matches."""

from __future__ import annotations

import shutil

import pytest
import torch
from fixture_paths import LORA_FIXTURES

from sdrepl.core.networks import lora_library, patcher_for, signature_of, wanted
from sdrepl.core.networks.container import read_header

EXPECTED = {  # file -> (layout, rank, keys, bundled embeddings)
    "cloneofsimo/lora_disney.safetensors": ("cloneofsimo", 1, 386, ["s1", "s2"]),
    "cloneofsimo/analog_svd_rank4.safetensors": ("cloneofsimo", 4, 384, []),
    "peft/sd15-anime-te/adapter_model.safetensors": ("peft", 8, 48, []),
    "diffusers-attnproc/pytorch_lora_weights.safetensors": ("diffusers-attnproc", 4, 256, []),
    "diffusers-attnproc/pytorch_lora_weights.bin": ("diffusers-attnproc", 4, 256, []),
}


class _Pipe:
    def __init__(self, unet, text_encoder) -> None:
        self.unet, self.text_encoder = unet, text_encoder


@pytest.fixture(scope="module")
def sd15():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdrepl.core.checkpoint_configs import FAMILY_CONFIGS

    configs = FAMILY_CONFIGS["sd1"]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config({k: v for k, v in configs["unet"].items() if not k.startswith("_")})
        te = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in configs["text_encoder"].items()
                                             if k not in ("architectures", "model_type")}))
    return _Pipe(unet, te)


@pytest.fixture(scope="module")
def library(sd15, tmp_path_factory):
    lib = lora_library([LORA_FIXTURES], signature_of(sd15, "sd1"))
    lib.scan()
    return lib


@pytest.mark.slow
@pytest.mark.parametrize("rel", sorted(EXPECTED))
def test_fixture_loads_and_every_key_matches(library, rel):
    layout, rank, keys, embeddings = EXPECTED[rel]
    net = next(n for n in library.networks() if n.path == LORA_FIXTURES / rel)
    info = net.info
    assert (info.layout, info.rank, info.keys, sorted(info.embeddings)) == (layout, rank, keys, embeddings)
    assert info.keys_matched == info.keys, info.warnings
    assert info.base == "sd1" and info.warnings == ()
    assert len(info.hash) == 64


@pytest.mark.slow
def test_fixture_set_attaches_to_every_target(library, sd15):
    nets = [n for n in library.networks() if n.path.suffix == ".safetensors"]
    patcher = patcher_for(sd15)
    try:
        patcher.activate([wanted(library, n, 1.0, 1.0) for n in nets])
        targets = {t for n in nets for _, t in n.info.matched.targets}
        assert patcher.hooked_modules == len(targets)
        assert sum(len(n.info.matched.targets) for n in nets) == 144 + 48 + 144 + 48 + 24 + 128
    finally:
        patcher.clear()
    assert patcher.hooked_modules == 0


def test_names_and_collisions(library):
    assert library.get("lora_disney") is not None
    assert library.get("sd15-anime-te").info.layout == "peft"  # the folder names a generic file
    both = [n for n in library.networks() if n.name == "diffusers-attnproc"]
    assert len(both) == 2 and library.get("diffusers-attnproc").path.suffix == ".bin"  # first by path
    assert library.get("diffusers-attnproc/pytorch_lora_weights.safetensors").path.suffix == ".safetensors"
    assert any("2 LoRA files are called 'diffusers-attnproc'" in w for w in library.warnings())
    assert library.suggest("lora_disny") == ["lora_disney"]


def test_bin_loads_without_cuda(tmp_path, monkeypatch):
    """The .bin was saved with CUDA storages: it must load with map_location="cpu" on a CUDA-less machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    header = read_header(LORA_FIXTURES / "diffusers-attnproc" / "pytorch_lora_weights.bin")
    assert len(header.shapes) == 256 and all(t.device.type == "cpu" for t in header.tensors.values())


def test_bundled_embeddings_are_vectors(library):
    info = library.get("lora_disney").info
    assert {k: v.vectors["text_encoder"].shape for k, v in info.embeddings.items()} == {
        "s1": (1, 768), "s2": (1, 768)}


def test_copy_is_cheap_to_index(tmp_path, sd15):
    """Indexing reads headers only: a safetensors file with its data cut off after the header still indexes
    as truncated (not as a crash), and an intact copy indexes without its tensors being read."""
    src = LORA_FIXTURES / "cloneofsimo" / "analog_svd_rank4.safetensors"
    shutil.copy(src, tmp_path / "a.safetensors")
    lib = lora_library([tmp_path], signature_of(sd15, "sd1"))
    lib.scan()
    assert lib.get("a") is not None and not lib.cached(lib.get("a"))
