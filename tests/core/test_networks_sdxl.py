"""SDXL LoRAs on ``tiny-sdxl``: kohya ``lora_te1_`` / ``lora_te2_`` / ``lora_unet_`` files reach SDXL's two
text encoders and its UNet, with the effect of the weights merged by hand (W + scale * up @ down), and an
SD 1.x LoRA on SDXL is skipped with its reason."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from lora_files import kohya_file, lowrank
from safetensors.torch import save_file

from sdrepl.core.conditioning import encode_prompts
from sdrepl.core.networks import lora_library, patcher_for, signature_of, wanted
from sdrepl.core.prompt import StaticLookup
from sdrepl.core.samplers import make_scheduler, sample


@pytest.fixture(scope="module")
def xl():
    from sdrepl.core.models import load_model

    return load_model("tiny-sdxl", device="cpu", dtype="fp32")


def _linears(root, keep) -> list[str]:
    return [n for n, m in root.named_modules() if isinstance(m, torch.nn.Linear) and keep(n)]


def sdxl_kohya_file(path, pipe, rank: int = 4, alpha: float = 2.0, seed: int = 1):
    """A kohya SDXL file for every attention projection of the UNet and of both text encoders."""
    gen = torch.Generator().manual_seed(seed)
    tensors, merged = {}, []
    parts = [("lora_unet_", pipe.unet, _linears(pipe.unet, lambda n: ".attn" in n)),
             ("lora_te1_", pipe.text_encoder, _linears(pipe.text_encoder, lambda n: "self_attn" in n)),
             ("lora_te2_", pipe.text_encoder_2, _linears(pipe.text_encoder_2, lambda n: "self_attn" in n))]
    for prefix, root, names in parts:
        for name in names:
            weight = root.get_submodule(name).weight
            down, up = lowrank(tuple(weight.shape), rank, gen, std=0.1)
            key = prefix + name.removeprefix("text_model.").replace(".", "_")
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
            merged.append((root, name, (up @ down) * (alpha / rank)))
    save_file(tensors, str(path))
    return merged


def _picture(model_or_pipe, cond):
    class M:  # the few attributes sample() reads
        pipe = model_or_pipe

    pipe = model_or_pipe
    pipe.scheduler = make_scheduler("Euler", pipe.scheduler.config)
    return np.asarray(sample(M, cond, steps=2, cfg=7.0, width=64, height=64, seed=5)).astype(np.int16)


def test_an_sdxl_lora_reaches_both_encoders_and_the_unet(xl, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    merged = sdxl_kohya_file(folder / "xl-net.safetensors", xl.pipe)
    kohya_file(folder / "sd1-net.safetensors", __import__("sdrepl.core.tiny", fromlist=["build_tiny"]).build_tiny("tiny"))
    lib = lora_library([folder], signature_of(xl.pipe, "sdxl"))
    lib.scan()
    net = lib.get("xl-net")
    assert net is not None and net.info.keys_matched == net.info.keys
    skipped = {s.path.name: s.reason for s in lib.skipped()}
    assert "sd1-net.safetensors" in skipped

    lookup = StaticLookup()
    plain = encode_prompts(xl, "a red fox", "ugly", lookup)
    patcher = patcher_for(xl.pipe)
    patcher.activate([wanted(lib, net, 0.8, 0.8)])
    try:
        ours = encode_prompts(xl, "a red fox", "ugly", lookup)
        ours_picture = _picture(xl.pipe, ours)
    finally:
        patcher.activate([])
    reference = copy.deepcopy(xl.pipe)
    names = {id(xl.pipe.text_encoder): reference.text_encoder, id(xl.pipe.text_encoder_2): reference.text_encoder_2,
             id(xl.pipe.unet): reference.unet}
    with torch.no_grad():
        for root, name, delta in merged:
            names[id(root)].get_submodule(name).weight += 0.8 * delta

    class Ref:
        pipe = reference
        family = "sdxl"
        tokenizer = reference.tokenizer

    theirs = encode_prompts(Ref, "a red fox", "ugly", lookup)
    # Both encoders' halves of the context and the pooled embedding change, as with merged weights.
    for a, b in ((ours.prompt_embeds, theirs.prompt_embeds), (ours.pooled, theirs.pooled)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert (ours.prompt_embeds[..., :768] - plain.prompt_embeds[..., :768]).abs().max() > 1e-3
    assert (ours.prompt_embeds[..., 768:] - plain.prompt_embeds[..., 768:]).abs().max() > 1e-3
    assert np.abs(ours_picture - _picture(reference, theirs)).max() <= 1
    # Deactivated: the untouched model again.
    again = encode_prompts(xl, "a red fox", "ugly", lookup)
    assert torch.equal(again.prompt_embeds, plain.prompt_embeds)
