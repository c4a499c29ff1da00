"""Against diffusers' own ``load_lora_weights`` on the tiny model (same latents within 1e-5 at fp32), the
A/B/C/A reversibility rule, and gradients with LoRAs active (only the embedding trains)."""

from __future__ import annotations

import copy

import pytest
import torch
from lora_files import kohya_file, kohya_name, lowrank, module, te_attention_modules, unet_attention_modules
from safetensors.torch import save_file

from sdrepl.core.networks import lora_library, patcher_for, signature_of, wanted

pytest.importorskip("peft")  # diffusers needs PEFT to load LoRAs


@pytest.fixture(scope="module")
def base_pipe():
    from sdrepl.core.tiny import build_tiny

    return build_tiny("tiny")


def _latents(pipe, prompt: str = "a photo of a cat") -> torch.Tensor:
    return pipe(prompt=prompt, num_inference_steps=2, guidance_scale=7.0, width=64, height=64,
                generator=torch.Generator().manual_seed(3), output_type="latent").images


def _write(layout: str, path, pipe) -> None:
    """The same random factors in the spelling of ``layout``."""
    gen = torch.Generator().manual_seed(5)
    tensors = {}
    targets = [("unet", p) for p in unet_attention_modules(pipe)] + [("te", p) for p in te_attention_modules(pipe)]
    for component, p in targets:
        down, up = lowrank(tuple(module(pipe, component, p).weight.shape), 4, gen)
        owner = "unet" if component == "unet" else "text_encoder"
        te_path = f"text_model.{p}" if component != "unet" else p
        if layout == "peft":
            tensors[f"{owner}.{te_path}.lora_A.weight"] = down
            tensors[f"{owner}.{te_path}.lora_B.weight"] = up
        elif layout == "diffusers":  # diffusers 0.2x: ``.lora.`` in the UNet, ``.lora_linear_layer.`` in the TE
            inner = "lora" if component == "unet" else "lora_linear_layer"
            tensors[f"{owner}.{te_path}.{inner}.down.weight"] = down
            tensors[f"{owner}.{te_path}.{inner}.up.weight"] = up
        elif layout == "diffusers-attnproc":
            if component != "unet":
                continue  # UNet only
            head, _, proj = p.rpartition(".attn")
            attn, _, leaf = proj.partition(".")
            leaf = leaf.removesuffix(".0")
            tensors[f"{head}.attn{attn}.processor.{leaf}_lora.down.weight"] = down
            tensors[f"{head}.attn{attn}.processor.{leaf}_lora.up.weight"] = up
    save_file(tensors, str(path))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["kohya", "peft", "diffusers"])
def test_same_latents_as_diffusers(tmp_path, base_pipe, layout):
    pipe, ref = copy.deepcopy(base_pipe), copy.deepcopy(base_pipe)
    path = tmp_path / "net.safetensors"
    if layout == "kohya":
        kohya_file(path, pipe, rank=4, alpha=2.0, convs=["down_blocks.0.resnets.0.conv1"])
    else:
        _write(layout, path, pipe)
    plain = _latents(pipe)
    ref.load_lora_weights(str(path), adapter_name="net")
    ref.set_adapters(["net"], [0.7])
    theirs = _latents(ref)
    lib = lora_library([tmp_path], signature_of(pipe, "sd1"))
    lib.scan()
    net = lib.get("net")
    assert net.info.layout == layout and net.info.keys_matched == net.info.keys
    patcher_for(pipe).activate([wanted(lib, net, 0.7, 0.7)])
    ours = _latents(pipe)
    assert (ours - plain).abs().max() > 1e-2  # the LoRA does something
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_attnproc_layout_equals_the_same_factors_in_peft_layout(tmp_path, base_pipe):
    """diffusers 0.3x+ no longer reads the old attention-processor layout; sdrepl does, and it must mean exactly
    what the same factors mean in the PEFT layout (which agrees with diffusers above)."""
    pipe = copy.deepcopy(base_pipe)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _write("diffusers-attnproc", tmp_path / "a" / "old.safetensors", pipe)
    _write("peft", tmp_path / "b" / "new.safetensors", pipe)
    results = []
    for folder, name in (("a", "old"), ("b", "new")):
        lib = lora_library([tmp_path / folder], signature_of(pipe, "sd1"))
        lib.scan()
        nets = [wanted(lib, lib.get(name), 0.0 if name == "new" else 1.0, 1.0)]  # the old layout is UNet only
        patcher_for(pipe).activate(nets)
        results.append(_latents(pipe))
    patcher_for(pipe).clear()
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_b_c_a_is_bit_identical(tmp_path, base_pipe):
    pipe = copy.deepcopy(base_pipe)
    kohya_file(tmp_path / "one.safetensors", pipe, seed=1)
    kohya_file(tmp_path / "two.safetensors", pipe, seed=2, te=False, convs=["down_blocks.0.resnets.0.conv1"])
    lib = lora_library([tmp_path], signature_of(pipe, "sd1"))
    lib.scan()
    one, two = lib.get("one"), lib.get("two")
    patcher = patcher_for(pipe)
    weights = {k: v.clone() for k, v in {**pipe.unet.state_dict(), **pipe.text_encoder.state_dict()}.items()}
    a = _latents(pipe)
    patcher.activate([wanted(lib, one, 1.0, 1.0), wanted(lib, two, 0.5, 0.8)])
    b = _latents(pipe)
    patcher.activate([wanted(lib, one, 0.3, 0.3)])
    c = _latents(pipe)
    assert patcher.active == [{"name": "one", "te": 0.3, "unet": 0.3}]
    patcher.activate([])
    a2 = _latents(pipe)
    assert not torch.equal(a, b) and not torch.equal(b, c) and not torch.equal(a, c)
    assert torch.equal(a, a2)
    now = {**pipe.unet.state_dict(), **pipe.text_encoder.state_dict()}
    assert all(torch.equal(v, now[k]) for k, v in weights.items())


def test_embedding_gradient_with_lora_active(tmp_path, base_pipe):
    """TI training with a LoRA on the text encoder: the gradient reaches the embedding (and equals the one of a
    model whose weights were merged), the LoRA's own tensors and the model get none."""
    pipe = copy.deepcopy(base_pipe)
    for p in pipe.text_encoder.parameters():
        p.requires_grad_(False)
    target = ("te", "encoder.layers.0.self_attn.q_proj")
    weight = module(pipe, *target).weight
    down, up = torch.randn(4, 768) * 0.2, torch.randn(768, 4) * 0.2
    name = kohya_name(*target)
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(4.0)},
              str(tmp_path / "te.safetensors"))
    lib = lora_library([tmp_path], signature_of(pipe, "sd1"))
    lib.scan()
    patcher_for(pipe).activate([wanted(lib, lib.get("te"), 0.9, 0.9)])

    def grad(model) -> torch.Tensor:
        vec = torch.randn(1, 768, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        embeds = model.embeddings.token_embedding(torch.tensor([[49406, 320, 0, 49407]]))
        embeds = torch.cat([embeds[:, :2], vec[None], embeds[:, 3:]], dim=1)
        hidden = model(inputs_embeds=embeds).last_hidden_state if hasattr(model, "text_model") else None
        if hidden is None:
            from sdrepl.core.conditioning import ChunkInput, encode_chunks
            ids = torch.tensor([49406, 320, 0, 49407] + [49407] * 73)
            hidden = encode_chunks(model, [ChunkInput(ids, [(2, vec)])])
        hidden.square().mean().backward()
        return vec.grad

    with_lora = grad(pipe.text_encoder)
    merged = copy.deepcopy(base_pipe.text_encoder)
    with torch.no_grad():
        module(type("P", (), {"text_encoder": merged})(), *target).weight += 0.9 * (4.0 / 4) * (up @ down)
    torch.testing.assert_close(with_lora, grad(merged), rtol=1e-4, atol=1e-6)
    assert weight.grad is None and all(p.grad is None for p in pipe.text_encoder.parameters())
    term = patcher_for(pipe)._hooked[id(module(pipe, *target))].terms[0]
    assert not term.down.requires_grad and term.down.grad is None
