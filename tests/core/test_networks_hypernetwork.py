"""A1111 hypernetworks: a file built per spec section 3, applied to the tiny model's attention k/v inputs as
``context + hn(context) * strength`` (computed here independently), and removed exactly."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from lora_files import hypernetwork_file

from sdrepl.core.errors import NetworkError
from sdrepl.core.networks.hypernetwork import hypernet_patcher_for, read_hypernetwork

CROSS_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # input 768
SELF_V = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"  # input 32


def _write(path, **extra) -> dict:
    return hypernetwork_file(path, (768, 32), **extra)


def _reference(state: dict, x: torch.Tensor) -> torch.Tensor:
    h = F.relu(F.linear(x, state["linear.0.weight"], state["linear.0.bias"]))
    return F.linear(h, state["linear.2.weight"], state["linear.2.bias"])


@pytest.fixture(scope="module")
def pipe():
    from sdrepl.core.tiny import build_tiny

    return build_tiny("tiny")


def test_read_and_apply_and_remove(tmp_path, pipe):
    obj = _write(tmp_path / "hn.pt")
    info = read_hypernetwork(tmp_path / "hn.pt")
    assert (sorted(info.widths), info.activation, info.step, info.layer_structure) == ([32, 768], "relu", 1234, [1, 2, 1])
    cross_k, self_v = pipe.unet.get_submodule(CROSS_K), pipe.unet.get_submodule(SELF_V)
    ctx, hidden = torch.randn(1, 77, 768), torch.randn(1, 64, 32)
    with torch.no_grad():
        before_k, before_v = cross_k(ctx).clone(), self_v(hidden).clone()
    patcher = hypernet_patcher_for(pipe)
    patcher.activate([(info, 0.5)], ["hn"])
    try:
        with torch.no_grad():
            torch.testing.assert_close(cross_k(ctx), cross_k.forward(ctx + _reference(obj[768][0], ctx) * 0.5))
            torch.testing.assert_close(self_v(hidden), self_v.forward(hidden + _reference(obj[32][1], hidden) * 0.5))
        assert patcher.active == [("hn", 0.5)]
    finally:
        patcher.activate([], [])
    with torch.no_grad():
        assert torch.equal(cross_k(ctx), before_k) and torch.equal(self_v(hidden), before_v)


def test_layer_norm_and_output_activation(tmp_path):
    gen = torch.Generator().manual_seed(1)
    state = {"linear.0.weight": torch.randn(8, 4, generator=gen), "linear.0.bias": torch.zeros(8),
             "linear.2.weight": torch.ones(8), "linear.2.bias": torch.zeros(8),  # LayerNorm after the activation
             "linear.3.weight": torch.randn(4, 8, generator=gen), "linear.3.bias": torch.zeros(4)}
    buf = io.BytesIO()
    torch.save({4: [state, copy.deepcopy(state)], "activation_func": "tanh", "activate_output": True}, buf)
    (tmp_path / "ln.pt").write_bytes(buf.getvalue())
    info = read_hypernetwork(tmp_path / "ln.pt")
    x = torch.randn(3, 4, generator=gen)
    h = F.layer_norm(torch.tanh(F.linear(x, state["linear.0.weight"])), (8,), state["linear.2.weight"],
                     state["linear.2.bias"])
    want = torch.tanh(F.linear(h, state["linear.3.weight"]))
    torch.testing.assert_close(info.widths[4][0](x), want)


@pytest.mark.parametrize(("extra", "reason"), [({"activation_func": "weird"}, "unknown hypernetwork activation")])
def test_bad_hypernetworks(tmp_path, extra, reason):
    _write(tmp_path / "bad.pt", **extra)
    with pytest.raises(NetworkError, match=reason):
        read_hypernetwork(tmp_path / "bad.pt")
