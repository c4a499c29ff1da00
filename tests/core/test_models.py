"""Model loading: the tiny models, diffusers folders, and single-file checkpoints, all offline.

Single-file checkpoints are made by exporting the tiny models (``core/checkpoint_export.py``), so the
whole original-layout round trip runs without a download; a socket guard proves nothing reaches out.
The real SD 1.x / 2.x / SDXL configs are checked against the published parameter counts on the meta
device (no memory), and the export layout against diffusers' own converters at full SD size.
"""

from __future__ import annotations

import socket
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from sdrepl.core import tiny
from sdrepl.core.checkpoint_export import export_single_file, pipeline_to_ldm, unet_to_ldm, vae_to_ldm
from sdrepl.core.errors import ModelError
from sdrepl.core.models import load_model

COMPONENTS = ("unet", "vae", "text_encoder")


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1, and any network connection fails loudly."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def tiny_sd2():
    return load_model("tiny-sd2", device="cpu", dtype="fp32")


def assert_same_weights(a, b) -> None:
    for name in COMPONENTS:
        left, right = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert left.keys() == right.keys(), name
        differ = [k for k in left if not torch.equal(left[k], right[k])]
        assert not differ, f"{name}: {differ[:3]}"


def picture(pipe, seed: int = 7) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return pipe("a photo of a tree", num_inference_steps=2, height=64, width=64, generator=generator,
                output_type="np").images


def test_tokenizer_gives_the_reference_ids(tokenizer):
    ids = tokenizer("a photo of a tree by monet").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2677, 638, 24499, 49407]


def test_tiny_builds_deterministically():
    first, second = tiny.build_tiny("tiny"), tiny.build_tiny("tiny")
    assert_same_weights(first, second)


def test_tiny_sd2_has_a_1024_wide_encoder_and_pads_like_openclip(tiny_sd2):
    assert tiny_sd2.family == "sd2"
    assert tiny_sd2.text_encoder.config.hidden_size == 1024
    assert tiny_sd2.pipe.unet.config.cross_attention_dim == 1024
    assert tiny_sd2.tokenizer.pad_token_id == 0  # "!", as SD 2.x's tokenizer


def test_saved_folder_loads_back_with_the_same_weights_and_picture(tiny_model, tmp_path, offline):
    tiny_model.pipe.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu", dtype="fp32")
    assert loaded.source == "folder" and loaded.family == "sd1" and loaded.native_size == 64
    assert_same_weights(tiny_model.pipe, loaded.pipe)
    np.testing.assert_array_equal(picture(tiny_model.pipe), picture(loaded.pipe))


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2"])
def test_exported_single_file_loads_offline_with_equal_weights(name, tiny_model, tiny_sd2, tmp_path, offline):
    model = tiny_model if name == "tiny" else tiny_sd2
    path = export_single_file(model, tmp_path / f"{name}.safetensors")
    loaded = load_model(str(path), device="cpu", dtype="fp32")
    assert (loaded.source, loaded.family, loaded.native_size) == ("single-file", model.family, 64)
    assert_same_weights(model.pipe, loaded.pipe)
    np.testing.assert_array_equal(picture(model.pipe), picture(loaded.pipe))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_single_file_loads_in_the_requested_dtype(tiny_model, tmp_path):
    path = export_single_file(tiny_model, tmp_path / "tiny.safetensors")
    loaded = load_model(str(path), device="cpu", dtype="bf16")
    for name in COMPONENTS:
        original, cast = getattr(tiny_model.pipe, name).state_dict(), getattr(loaded.pipe, name).state_dict()
        assert all(cast[k].dtype == torch.bfloat16 for k in cast if cast[k].is_floating_point()), name
        assert all(torch.equal(original[k].to(torch.bfloat16), cast[k]) for k in original), name


def test_export_uses_the_original_names(tiny_model, tiny_sd2):
    sd1, sd2 = pipeline_to_ldm(tiny_model.pipe), pipeline_to_ldm(tiny_sd2.pipe)
    for key in ("model.diffusion_model.input_blocks.2.0.op.weight",  # the down block's downsampler
                "model.diffusion_model.output_blocks.1.1.conv.weight",  # upsampler of an up block without attention
                "model.diffusion_model.output_blocks.3.1.proj_in.weight",
                "model.diffusion_model.middle_block.2.in_layers.0.weight",
                "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight",  # decoder blocks count backwards
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"):
        assert key in sd1, key
    assert sd1["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # stored as a 1x1 convolution
    assert sd2["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 1024, 1024)
    assert not any(k.startswith("cond_stage_model.transformer.") for k in sd2)


def test_old_sd1_names_and_a1111_extras_load(tiny_model, tmp_path):
    """Old SD 1.x files name CLIP weights without ``text_model.``; many carry schedule and EMA extras."""
    from safetensors.torch import save_file

    state = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v.contiguous()
             for k, v in pipeline_to_ldm(tiny_model.pipe).items()}
    state.update({"cond_stage_model.transformer.embeddings.position_ids": torch.arange(77.0)[None],
                  "alphas_cumprod": torch.linspace(1, 0, 1000), "model_ema.decay": torch.tensor(0.9999)})
    save_file(state, tmp_path / "old.safetensors")
    loaded = load_model(str(tmp_path / "old.safetensors"), device="cpu", dtype="fp32")
    assert_same_weights(tiny_model.pipe, loaded.pipe)


def test_ckpt_with_lightning_callback_and_numpy_step_loads(tiny_model, tmp_path, monkeypatch):
    """Real SD .ckpt files pickle a Lightning ModelCheckpoint and a numpy global_step beside the weights."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__ = module.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.setitem(sys.modules, name, module)
    callback = ModelCheckpoint()
    callback.best_model_path = "/somewhere/last.ckpt"
    state = {k: v.clone() for k, v in pipeline_to_ldm(tiny_model.pipe).items()}
    torch.save({"state_dict": state, "global_step": np.int64(470000), "callbacks": {ModelCheckpoint: callback}},
               tmp_path / "model.ckpt")
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.delitem(sys.modules, name)  # loading must not need the class
    loaded = load_model(str(tmp_path / "model.ckpt"), device="cpu", dtype="fp32")
    assert_same_weights(tiny_model.pipe, loaded.pipe)


def test_explicit_config_folder(tiny_model, tmp_path):
    from sdrepl.core.checkpoints import load_single_file

    path = export_single_file(tiny_model, tmp_path / "t.safetensors")
    pipe = load_single_file(path, config=tiny.ensure_tiny_folder("tiny"))
    assert_same_weights(tiny_model.pipe, pipe)
    with pytest.raises(ModelError, match="not a diffusers config folder"):
        load_single_file(path, config=tmp_path)


# -- the real SD configs, at full size on the meta device ---------------------------------------------------


@pytest.fixture
def config_folder(tmp_path, monkeypatch):
    from sdrepl.core.checkpoint_configs import ensure_config_folder

    monkeypatch.setenv("SDREPL_CACHE_DIR", str(tmp_path))
    return ensure_config_folder


# Published parameter counts: UNet, VAE, text encoder(s).
PARAMS = {"sd1": (859_520_964, 83_653_863, [123_060_480]),
          "sd2": (865_910_724, 83_653_863, [340_387_840]),
          "sdxl": (2_567_463_684, 83_653_863, [123_060_480, 694_659_840])}


def meta_components(folder: Path, family: str):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        encoders = [CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))]
        if family == "sdxl":
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2")))
    return unet, vae, encoders


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_standard_configs_have_the_published_sizes(family, config_folder):
    from transformers import CLIPTokenizer

    folder = config_folder(family)
    assert config_folder(family) == folder  # cached: the second call finds it
    unet, vae, encoders = meta_components(folder, family)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(unet), count(vae), [count(e) for e in encoders]) == PARAMS[family]
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert tokenizer("a photo of a tree by monet").input_ids == [49406, 320, 1125, 539, 320, 2677, 638, 24499, 49407]
    assert tokenizer.pad_token == ("!" if family == "sd2" else "<|endoftext|>")


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_export_is_the_inverse_of_diffusers_conversion_at_full_size(family, config_folder):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        infer_diffusers_model_type,
    )

    unet, vae, _ = meta_components(config_folder(family), family)
    ldm = {**unet_to_ldm(unet.state_dict(), unet.config), **vae_to_ldm(vae.state_dict(), vae.config)}
    assert infer_diffusers_model_type(ldm) == {"sd1": "v1", "sd2": "v2"}[family]
    assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in ldm
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in ldm
    back_unet = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    back_vae = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    assert set(back_unet) == set(unet.state_dict())
    assert set(back_vae) == set(vae.state_dict())


# -- SDXL, at a small size through an explicit config folder ------------------------------------------------


def small_sdxl():
    """An SDXL-shaped pipeline small enough for a test (two encoders of different widths, text_time UNet)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    text = dict(vocab_size=49408, max_position_embeddings=77, num_hidden_layers=2, num_attention_heads=4,
                bos_token_id=49406, eos_token_id=49407)
    encoder = CLIPTextModel(CLIPTextConfig(**text, hidden_size=32, intermediate_size=64, pad_token_id=49407))
    encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text, hidden_size=64, intermediate_size=128,
                                                           projection_dim=64, hidden_act="gelu", pad_token_id=0))
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
        cross_attention_dim=96, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 64)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=encoder, text_encoder_2=encoder_2,
                                     tokenizer=tiny.load_tokenizer(), tokenizer_2=tiny.load_tokenizer("!"), unet=unet,
                                     scheduler=EulerDiscreteScheduler.from_config(SD_SCHEDULE))


SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}


def test_sdxl_checkpoint_loads_through_a_config_folder(tmp_path, offline):
    from diffusers import StableDiffusionXLPipeline

    pipe = small_sdxl()
    pipe.save_pretrained(tmp_path / "config")
    path = export_single_file(pipe, tmp_path / "xl.safetensors")
    keys = set(pipeline_to_ldm(pipe))
    assert {"model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.1.model.text_projection",
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"} <= keys
    with pytest.raises(ModelError, match="unknown size"):  # not a standard SDXL, and no config given
        load_model(str(path), device="cpu", dtype="fp32")
    loaded = load_model(str(path), device="cpu", dtype="fp32", config=tmp_path / "config")
    assert isinstance(loaded.pipe, StableDiffusionXLPipeline) and loaded.family == "sdxl"
    for name in (*COMPONENTS, "text_encoder_2"):
        left, right = getattr(pipe, name).state_dict(), getattr(loaded.pipe, name).state_dict()
        assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left), name
    image = loaded.pipe("a tree", num_inference_steps=2, height=64, width=64, output_type="np",
                        generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)
