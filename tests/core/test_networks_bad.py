"""Bad LoRA files: each is skipped with a reason (the library names the file), the others keep working."""

from __future__ import annotations

import io
import os

import pytest
import torch
from lora_files import kohya_name, module
from safetensors.torch import save_file

from sdrepl.core.errors import NetworkError
from sdrepl.core.networks import lora_library, patcher_for, signature_of, wanted

LINEAR = ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")  # [32, 768]


@pytest.fixture(scope="module")
def pipe():
    from sdrepl.core.tiny import build_tiny

    return build_tiny("tiny")


def _pair(name: str, out: int = 32, inp: int = 768, rank: int = 4, up_rank: int | None = None) -> dict:
    return {f"{name}.lora_down.weight": torch.randn(rank, inp) * 0.1,
            f"{name}.lora_up.weight": torch.randn(out, up_rank or rank) * 0.1, f"{name}.alpha": torch.tensor(1.0)}


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _write_bad(folder, kind: str) -> str:
    name = kohya_name(*LINEAR)
    path = folder / f"{kind}.safetensors"
    if kind == "nothing":
        save_file(_pair("lora_unet_unet_" + LINEAR[1].replace(".", "_")), str(path))
    elif kind == "sdxl":
        save_file({**_pair("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280),
                   **_pair(name, 32, 2048)}, str(path), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    elif kind == "truncated":
        save_file(_pair(name), str(path))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 100])
    elif kind == "pickle":
        path = folder / "pickle.pt"
        buf = io.BytesIO()
        torch.save({"x": Evil()}, buf)
        path.write_bytes(buf.getvalue())
    elif kind == "rank":
        save_file(_pair(name, up_rank=3), str(path))
    elif kind == "algo":
        save_file({f"{name}.oft_blocks": torch.zeros(4, 8, 8), f"{name}.alpha": torch.tensor(1.0)}, str(path))
    return path.name


@pytest.mark.parametrize(("kind", "reason"), [
    ("nothing", "0 of 3 keys match this model"),
    ("sdxl", "a LoRA for SDXL, but the model is SD 1.x"),
    ("truncated", "truncated"),
    ("pickle", "refused by the safe loader"),
    ("rank", "rank mismatch"),
    ("algo", "LyCORIS algorithm OFT"),
])
def test_bad_file_is_skipped_with_reason(tmp_path, pipe, kind, reason):
    filename = _write_bad(tmp_path, kind)
    save_file(_pair(kohya_name(*LINEAR)), str(tmp_path / "good.safetensors"))
    lib = lora_library([tmp_path], signature_of(pipe, "sd1"))
    change = lib.scan()
    assert [s.path.name for s in change.skipped] == [filename]
    assert reason in lib.skipped()[0].reason, lib.skipped()[0].reason
    assert [n.name for n in lib.networks()] == ["good"]


def test_nan_delta_refused_at_first_use_then_skipped(tmp_path, pipe):
    bad = _pair(kohya_name(*LINEAR))
    bad[f"{kohya_name(*LINEAR)}.lora_up.weight"][0, 0] = float("nan")
    save_file(bad, str(tmp_path / "nan.safetensors"))
    lib = lora_library([tmp_path], signature_of(pipe, "sd1"))
    lib.scan()
    net = lib.get("nan")
    patcher = patcher_for(pipe)
    weight = module(pipe, *LINEAR).weight.detach().clone()
    with pytest.raises(NetworkError, match="NaN") as err:
        patcher.activate([wanted(lib, net, 1.0, 1.0)])
    assert "nan.safetensors" in str(err.value)
    assert patcher.hooked_modules == 0 and torch.equal(module(pipe, *LINEAR).weight, weight)
    change = lib.mark_broken(net, err.value.reason)
    assert [s.path.name for s in change.skipped] == ["nan.safetensors"] and lib.get("nan") is None


def test_partial_match_loads_with_a_warning(tmp_path, pipe):
    save_file({**_pair(kohya_name(*LINEAR)), **_pair("lora_unet_no_such_module")}, str(tmp_path / "half.safetensors"))
    lib = lora_library([tmp_path], signature_of(pipe, "sd1"))
    lib.scan()
    info = lib.get("half").info
    assert (info.keys, info.keys_matched) == (6, 3)
    assert "3 of 6 keys match no module" in info.warnings[0]


def test_no_layout(tmp_path, pipe):
    save_file({"model.diffusion_model.x": torch.zeros(2)}, str(tmp_path / "ckpt.safetensors"))
    lib = lora_library([tmp_path], signature_of(pipe, "sd1"))
    lib.scan()
    assert "no LoRA layout recognised" in lib.skipped()[0].reason


def test_cache_is_bounded(tmp_path, pipe):
    for i in range(3):
        save_file(_pair(kohya_name(*LINEAR)), str(tmp_path / f"n{i}.safetensors"))
    lib = lora_library([tmp_path], signature_of(pipe, "sd1"), cache_bytes=1)
    lib.scan()
    for net in lib.networks():
        lib.deltas(net)
    assert sum(lib.cached(n) for n in lib.networks()) == 1  # only the latest stays over the bound


@pytest.mark.slow
def test_model_switch_rechecks_every_file(tmp_path, pipe):
    """!model tiny -> tiny-sdxl: the SD 1.x LoRA becomes skipped with both families named, and back."""
    from sdrepl.core.tiny import build_tiny

    save_file(_pair(kohya_name(*LINEAR)), str(tmp_path / "sd1.safetensors"))
    lib = lora_library([tmp_path], signature_of(pipe, "sd1"))
    lib.scan()
    xl = build_tiny("tiny-sdxl")
    change = lib.set_signature(signature_of(xl, "sdxl"))
    assert change.removed == ["sd1"] and "a LoRA for SD 1.x, but the model is SDXL" in lib.skipped()[0].reason
    change = lib.set_signature(signature_of(pipe, "sd1"))
    assert change.added == ["sd1"] and lib.skipped() == []


def test_kohya_bundled_embedding(tmp_path, pipe):
    """A1111 1.7+ ``bundle_emb.<name>.string_to_param.*`` keys: an embedding of the LoRA, every key accounted for."""
    vectors = torch.randn(2, 768)
    save_file({**_pair(kohya_name(*LINEAR)), "bundle_emb.mystyle.string_to_param.*": vectors},
              str(tmp_path / "withemb.safetensors"))
    lib = lora_library([tmp_path], signature_of(pipe, "sd1"))
    lib.scan()
    info = lib.get("withemb").info
    assert info.keys_matched == info.keys == 4 and info.warnings == ()
    assert torch.equal(info.embeddings["mystyle"].vectors["text_encoder"], vectors)


def _finishes(fn, seconds: float = 20):
    """Run ``fn`` in a thread; fail the test if it is still running after ``seconds`` (it blocked)."""
    import threading

    result: dict = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # re-raised in the test's thread
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "blocked on a FIFO"
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_fifo_in_the_lora_folder_is_skipped_with_a_reason_and_never_blocks(tmp_path, pipe):
    save_file(_pair(kohya_name(*LINEAR)), str(tmp_path / "good.safetensors"))
    os.mkfifo(tmp_path / "x.safetensors")
    lib = lora_library([tmp_path], signature_of(pipe, "sd1"))
    change = _finishes(lib.scan)
    assert [s.path.name for s in change.skipped] == ["x.safetensors"]
    assert "FIFO" in lib.skipped()[0].reason and "not opened" in lib.skipped()[0].reason
    assert [n.name for n in lib.networks()] == ["good"]
    _finishes(lambda: lib.update_path(tmp_path / "x.safetensors", force=True))
    assert [n.name for n in lib.networks()] == ["good"]


def test_a_fifo_swapped_in_after_the_stat_is_refused_not_waited_on(tmp_path, monkeypatch):
    """The race the stat check alone cannot close: the name is a regular file when stat'ed, a FIFO when opened."""
    from sdrepl.core.networks.container import read_header

    decoy = tmp_path / "decoy.safetensors"
    save_file(_pair(kohya_name(*LINEAR)), str(decoy))
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    real_stat = os.stat

    def stat(path, *args, **kwargs):  # what stat saw a moment before the swap
        return real_stat(decoy if os.fspath(path) == str(fifo) else path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    with pytest.raises(NetworkError, match="FIFO"):
        _finishes(lambda: read_header(fifo))
