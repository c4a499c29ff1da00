"""``--compile``: the UNet and VAE decoder compile once per picture shape; prompts, embeddings, seeds and
guidance never recompile (counted by the compile backend), and compiled pictures are the eager ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdrepl.core.conditioning import encode_prompts
from sdrepl.core.models import load_model
from sdrepl.core.samplers import make_scheduler, sample
from sdrepl.core.speed import apply_speed
from sdrepl.core.training.text import TrainingLookup, standin

pytestmark = pytest.mark.slow  # compiling the tiny UNet (eager backend) takes ~10 s a shape on 2 cores


@pytest.fixture(scope="module")
def compiled():
    torch._dynamo.reset()
    model = load_model("tiny", device="cpu", dtype="fp32")  # its own copy: compiling changes the modules
    speed = apply_speed(model.pipe, model.device, compile=True, backend="eager")
    yield model, speed
    torch._dynamo.reset()


def picture(model, prompt, lookup, *, seed=1, cfg=7.0, size=32):
    cond = encode_prompts(model, prompt, "blurry", lookup)
    return np.asarray(sample(model, cond, steps=2, cfg=cfg, width=size, height=size, seed=seed,
                             scheduler=make_scheduler("Euler a", model.pipe.scheduler.config)))


def test_prompts_embeddings_seeds_and_guidance_never_recompile(compiled, tiny_model):
    model, speed = compiled
    lookup = TrainingLookup(standin("tok", torch.randn(2, 768, generator=torch.Generator().manual_seed(0)) * 0.02))
    first = picture(model, "a photo of a tree", lookup)
    after_first = dict(speed.graphs)
    assert after_first.get("unet", 0) >= 1 and after_first.get("vae_decoder", 0) >= 1
    picture(model, "a photo of <tok> on a hill", lookup, seed=2)  # an embedding spliced in
    picture(model, "a red car", lookup, seed=3, cfg=4.5)
    assert speed.graphs == after_first, "a prompt, embedding, seed or cfg recompiled"
    # Compiling changes nothing in the picture (eager backend: the same kernels).
    assert np.array_equal(first, picture(tiny_model, "a photo of a tree", lookup))


def test_a_new_size_compiles_once_and_is_reported(compiled):
    model, speed = compiled
    lookup = TrainingLookup(standin("tok", torch.zeros(1, 768)))
    picture(model, "a tree", lookup, size=32)
    before = dict(speed.graphs)
    picture(model, "a tree", lookup, size=48)
    grown = dict(speed.graphs)
    assert grown["unet"] > before["unet"]
    picture(model, "a house", lookup, size=48, seed=9)
    assert speed.graphs == grown
    shapes = [w["shape"] for w in model.describe()["speed"]["warmups"]]
    assert "1x32x32" in shapes and "1x48x48" in shapes
    assert model.describe()["speed"]["compile"] is True


def test_a_forward_hook_like_a_lora_s_is_seen_by_the_compiled_unet(compiled):
    """LoRAs are forward hooks (core.networks.apply): one attached after compiling must change the output
    (dynamo skips hook guards by default and would ignore it), and removing it gives the old output back."""
    model, speed = compiled
    unet = model.pipe.unet
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    e = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(1))

    def call():
        with torch.no_grad():
            return unet(x, torch.tensor(500.0), encoder_hidden_states=e).sample

    plain = call()
    target = next(m for n, m in unet.named_modules() if n.endswith("attn2.to_q"))
    handle = target.register_forward_hook(lambda module, args, out: out * 3.0)
    try:
        hooked = call()
    finally:
        handle.remove()
    assert not torch.equal(plain, hooked)
    assert torch.equal(plain, call())


def test_without_compile_the_cpu_path_is_untouched(tiny_model):
    import copy

    assert copy.deepcopy(tiny_model.pipe).sdrepl_speed.describe() == tiny_model.pipe.sdrepl_speed.describe()
    described = tiny_model.describe()["speed"]
    assert described["compile"] is False and described["channels_last"] is False and described["graphs"] == {}


def test_the_compile_option_reaches_an_auto_started_daemon():
    import argparse

    from sdrepl.config import Settings, add_shared_options, settings_from_args

    parser = argparse.ArgumentParser()
    add_shared_options(parser)
    settings = settings_from_args(parser.parse_args(["--compile"]))
    assert settings.compile is True and "--compile" in settings.daemon_args()
    assert "--compile" not in Settings().daemon_args()
    assert settings_from_args(parser.parse_args(settings.daemon_args())).compile is True


def test_a_new_lora_weight_does_not_recompile_and_matches_eager(compiled, tiny_model, tmp_path):
    """``<lora:x:0.5>`` then ``<lora:x:0.7>``: the weight is a tensor the compiled UNet reads, not a constant
    it guards on (a recompile costs about a minute per weight on a GPU with inductor)."""
    from lora_files import kohya_file

    from sdrepl.core.networks import lora_library, patcher_for, signature_of, wanted

    model, speed = compiled
    kohya_file(tmp_path / "w.safetensors", model.pipe, seed=1)
    lib = lora_library([tmp_path], signature_of(model.pipe, model.family))
    lib.scan()
    net = lib.get("w")
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    e = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(1))

    def call(on):
        with torch.no_grad():
            return on.pipe.unet(x, torch.tensor(500.0), encoder_hidden_states=e).sample

    compiled_patcher, eager_patcher = patcher_for(model.pipe), patcher_for(tiny_model.pipe)
    try:
        outputs = {}
        for weight in (0.5, 0.7, 0.9, 0.6):
            compiled_patcher.activate([wanted(lib, net, weight, weight)])
            outputs[weight] = call(model)
            if weight == 0.5:
                after_first = dict(speed.graphs)
        assert speed.graphs == after_first, "a new LoRA weight recompiled the UNet"
        assert not torch.equal(outputs[0.5], outputs[0.9])
        eager_patcher.activate([wanted(lib, net, 0.7, 0.7)])
        assert torch.equal(outputs[0.7], call(tiny_model))  # compiled (eager backend) == eager, weight 0.7
    finally:
        compiled_patcher.clear()
        eager_patcher.clear()
