"""Each LoRA / LyCORIS algorithm, from a file built by the spec's key rules, against its formula computed
here independently: the patched module's output must equal the module run with the merged weight."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from lora_files import kohya_name, module
from safetensors.torch import save_file

from sdrepl.core.networks import lora_library, patcher_for, signature_of, wanted
from sdrepl.core.networks.modules import ldm_name, ldm_prefixes

LINEAR = ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")  # [32, 768]
TE_LINEAR = ("te", "encoder.layers.1.self_attn.v_proj")
OUT = ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0")  # [32, 32] with bias
CONV = ("unet", "down_blocks.0.resnets.0.conv1")  # [32, 32, 3, 3]


@pytest.fixture(scope="module")
def pipe():
    from sdrepl.core.tiny import build_tiny

    return build_tiny("tiny")


@pytest.fixture(scope="module")
def sig(pipe):
    return signature_of(pipe, "sd1")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _apply(tmp_path, pipe, sig, tensors: dict, te: float, unet: float):
    folder = tmp_path / "loras"
    folder.mkdir(exist_ok=True)
    save_file(tensors, str(folder / "net.safetensors"))
    lib = lora_library([folder], sig)
    lib.scan()
    assert lib.skipped() == [], lib.skipped()
    net = lib.get("net")
    assert net.info.keys_matched == net.info.keys == len(tensors)
    patcher = patcher_for(pipe)
    patcher.activate([wanted(lib, net, te, unet)])
    return patcher, net


def _check(pipe, target, expected_weight, expected_bias=None, x=None):
    mod = module(pipe, *target)
    if x is None:
        shape = (2, 5, mod.weight.shape[1]) if isinstance(mod, torch.nn.Linear) else (2, mod.weight.shape[1], 6, 6)
        x = torch.randn(shape, generator=_gen(9))
    with torch.no_grad():
        got = mod(x)
        bias = mod.bias if expected_bias is None else mod.bias + expected_bias
        if isinstance(mod, torch.nn.Linear):
            want = F.linear(x, expected_weight, bias)
        else:
            want = F.conv2d(x, expected_weight, bias, mod.stride, mod.padding, mod.dilation, mod.groups)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _clear(pipe):
    patcher_for(pipe).clear()


@pytest.mark.parametrize("names", ["diffusers", "ldm"])
def test_kohya_linear_and_conv(tmp_path, pipe, sig, names):
    w_lin = module(pipe, *LINEAR).weight.detach().clone()
    w_conv = module(pipe, *CONV).weight.detach().clone()
    g = _gen(1)
    tensors = {}
    for target, w in ((LINEAR, w_lin), (CONV, w_conv)):
        name = kohya_name(*target)
        if names == "ldm":
            name = "lora_unet_" + ldm_name(target[1], ldm_prefixes(pipe.unet.config)).replace(".", "_")
            assert "input_blocks" in name
        tensors[f"{name}.lora_down.weight"] = torch.randn((4, *w.shape[1:]), generator=g) * 0.1
        tensors[f"{name}.lora_up.weight"] = torch.randn((w.shape[0], 4, *([1, 1] if w.dim() == 4 else [])), generator=g) * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    try:
        _apply(tmp_path, pipe, sig, tensors, te=0.3, unet=0.8)
        for target, w in ((LINEAR, w_lin), (CONV, w_conv)):
            name = [k for k in tensors if k.endswith(".alpha")][0 if target == LINEAR else 1][: -len(".alpha")]
            down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
            delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
            _check(pipe, target, w + 0.8 * (2.0 / 4) * delta)
    finally:
        _clear(pipe)


def test_kohya_text_encoder_uses_te_multiplier(tmp_path, pipe, sig):
    w = module(pipe, *TE_LINEAR).weight.detach().clone()
    name = kohya_name(*TE_LINEAR)
    down, up = torch.randn(8, 768, generator=_gen(2)) * 0.1, torch.randn(768, 8, generator=_gen(3)) * 0.1
    try:
        _apply(tmp_path, pipe, sig, {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}, te=0.5, unet=1.0)
        _check(pipe, TE_LINEAR, w + 0.5 * 1.0 * (up @ down))  # no alpha: scale 1
    finally:
        _clear(pipe)


def test_locon_with_mid(tmp_path, pipe, sig):
    w = module(pipe, *CONV).weight.detach().clone()
    name = kohya_name(*CONV)
    g = _gen(4)
    down = torch.randn(4, 32, 1, 1, generator=g) * 0.1
    mid = torch.randn(4, 4, 3, 3, generator=g) * 0.1
    up = torch.randn(32, 4, 1, 1, generator=g) * 0.1
    # CP: dW[o, i, k, l] = sum_{a, b} up[o, a] * mid[a, b, k, l] * down[b, i]
    delta = torch.einsum("oa,abkl,bi->oikl", up[:, :, 0, 0], mid, down[:, :, 0, 0])
    try:
        _apply(tmp_path, pipe, sig, {f"{name}.lora_down.weight": down, f"{name}.lora_mid.weight": mid,
                                     f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(4.0)}, 1.0, 0.6)
        _check(pipe, CONV, w + 0.6 * 1.0 * delta)
    finally:
        _clear(pipe)


@pytest.mark.parametrize("target", [LINEAR, CONV])
def test_loha(tmp_path, pipe, sig, target):
    w = module(pipe, *target).weight.detach().clone()
    name = kohya_name(*target)
    g = _gen(5)
    out, inner = w.shape[0], math.prod(w.shape[1:])
    t = {k: torch.randn(s, generator=g) * 0.2 for k, s in (("hada_w1_a", (out, 4)), ("hada_w1_b", (4, inner)),
                                                          ("hada_w2_a", (out, 4)), ("hada_w2_b", (4, inner)))}
    delta = ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])).reshape(w.shape)
    try:
        _apply(tmp_path, pipe, sig, {**{f"{name}.{k}": v for k, v in t.items()}, f"{name}.alpha": torch.tensor(1.0)},
               1.0, 0.9)
        _check(pipe, target, w + 0.9 * (1.0 / 4) * delta)
    finally:
        _clear(pipe)


@pytest.mark.parametrize("decomposed", [False, True])
def test_lokr(tmp_path, pipe, sig, decomposed):
    w = module(pipe, *LINEAR).weight.detach().clone()  # [32, 768] = kron([4, 8], [8, 96])
    name = kohya_name(*LINEAR)
    g = _gen(6)
    w1 = torch.randn(4, 8, generator=g) * 0.3
    if decomposed:
        a, b = torch.randn(8, 2, generator=g) * 0.3, torch.randn(2, 96, generator=g) * 0.3
        w2, keys, scale = a @ b, {"lokr_w2_a": a, "lokr_w2_b": b}, 3.0 / 2
    else:
        w2 = torch.randn(8, 96, generator=g) * 0.3
        keys, scale = {"lokr_w2": w2}, 1.0  # both sides full: alpha is not used
    delta = torch.kron(w1, w2)
    try:
        _apply(tmp_path, pipe, sig, {f"{name}.lokr_w1": w1, **{f"{name}.{k}": v for k, v in keys.items()},
                                     f"{name}.alpha": torch.tensor(3.0)}, 1.0, 0.7)
        _check(pipe, LINEAR, w + 0.7 * scale * delta)
    finally:
        _clear(pipe)


def test_dora(tmp_path, pipe, sig):
    w = module(pipe, *LINEAR).weight.detach().clone()
    name = kohya_name(*LINEAR)
    g = _gen(7)
    down, up = torch.randn(4, 768, generator=g) * 0.1, torch.randn(32, 4, generator=g) * 0.1
    magnitude = torch.rand(1, 768, generator=g) + 0.5  # kohya/LyCORIS: one magnitude per input column
    merged = w + (2.0 / 4) * (up @ down)
    dora = merged * (magnitude / merged.norm(dim=0, keepdim=True))
    try:
        _apply(tmp_path, pipe, sig, {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                                     f"{name}.alpha": torch.tensor(2.0), f"{name}.dora_scale": magnitude}, 1.0, 0.5)
        _check(pipe, LINEAR, w + 0.5 * (dora - w))
    finally:
        _clear(pipe)


def test_full_and_ia3(tmp_path, pipe, sig):
    w_out = module(pipe, *OUT).weight.detach().clone()
    w_te = module(pipe, *TE_LINEAR).weight.detach().clone()
    g = _gen(8)
    diff, diff_b = torch.randn(w_out.shape, generator=g) * 0.01, torch.randn(w_out.shape[0], generator=g) * 0.01
    ia3 = torch.randn(w_te.shape[0], generator=g) * 0.1
    tensors = {f"{kohya_name(*OUT)}.diff": diff, f"{kohya_name(*OUT)}.diff_b": diff_b,
               f"{kohya_name(*TE_LINEAR)}.weight": ia3, f"{kohya_name(*TE_LINEAR)}.on_input": torch.tensor(False)}
    try:
        patcher, net = _apply(tmp_path, pipe, sig, tensors, te=0.4, unet=0.6)
        assert net.info.layout == "lycoris" and net.info.parsed.algos == ["full", "ia3"]
        _check(pipe, OUT, w_out + 0.6 * diff, 0.6 * diff_b)
        _check(pipe, TE_LINEAR, w_te + 0.4 * (w_te * ia3[:, None]))
    finally:
        _clear(pipe)


def test_weights_change_and_clear_restore_exact_outputs(tmp_path, pipe, sig):
    mod = module(pipe, *LINEAR)
    x = torch.randn(2, 5, 768, generator=_gen(10))
    with torch.no_grad():
        before = mod(x).clone()
    state = copy.deepcopy(mod.state_dict())
    name = kohya_name(*LINEAR)
    tensors = {f"{name}.lora_down.weight": torch.randn(4, 768, generator=_gen(11)),
               f"{name}.lora_up.weight": torch.randn(32, 4, generator=_gen(12))}
    patcher, net = _apply(tmp_path, pipe, sig, tensors, 1.0, 1.0)
    lib_want = patcher._active[net.key]
    assert lib_want[2] == 1.0
    with torch.no_grad():
        assert not torch.equal(mod(x), before)
    _clear(pipe)
    with torch.no_grad():
        assert torch.equal(mod(x), before)
    assert all(torch.equal(v, mod.state_dict()[k]) for k, v in state.items())
    assert patcher.hooked_modules == 0 and not mod._forward_hooks


def test_sdxl_te1_te2_and_unet_prefixes(tmp_path):
    """SDXL files name the two encoders lora_te1_ / lora_te2_: each lands on its own encoder; an SD 1.x file
    (lora_te_) is refused on SDXL with both families named."""
    from sdrepl.core.tiny import build_tiny

    xl = build_tiny("tiny-sdxl")
    sig = signature_of(xl, "sdxl")
    g = _gen(20)
    tensors = {}
    targets = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": xl.text_encoder,
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": xl.text_encoder_2}
    for name, enc in targets.items():
        root = getattr(enc, "text_model", enc)
        w = root.get_submodule("encoder.layers.0.self_attn.q_proj").weight
        tensors[f"{name}.lora_down.weight"] = torch.randn(2, w.shape[1], generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], 2, generator=g)
    unet_target = next(n for n, m in xl.unet.named_modules() if n.endswith("attn2.to_k"))
    w = xl.unet.get_submodule(unet_target).weight
    tensors[f"lora_unet_{unet_target.replace('.', '_')}.lora_down.weight"] = torch.randn(2, w.shape[1], generator=g)
    tensors[f"lora_unet_{unet_target.replace('.', '_')}.lora_up.weight"] = torch.randn(w.shape[0], 2, generator=g)
    (tmp_path / "xl").mkdir()
    save_file(tensors, str(tmp_path / "xl" / "xl.safetensors"))
    lib = lora_library([tmp_path / "xl"], sig)
    lib.scan()
    info = lib.get("xl").info
    assert info.base == "sdxl" and info.keys_matched == info.keys == 6
    assert {t[0] for _, t in info.matched.targets} == {"te", "te2", "unet"}
    patcher = patcher_for(xl)
    patcher.activate([wanted(lib, lib.get("xl"), 1.0, 1.0)])
    assert patcher.hooked_modules == 3
    patcher.clear()
    (tmp_path / "sd1").mkdir()
    name = kohya_name(*TE_LINEAR)
    save_file({f"{name}.lora_down.weight": torch.zeros(2, 768), f"{name}.lora_up.weight": torch.zeros(768, 2)},
              str(tmp_path / "sd1" / "old.safetensors"))
    lib = lora_library([tmp_path / "sd1"], sig)
    lib.scan()
    assert "a LoRA for SD 1.x, but the model is SDXL" in lib.skipped()[0].reason
