"""SDXL on ``tiny-sdxl``: the model's shape, A1111's two-encoder conditioning checked against diffusers'
``StableDiffusionXLPipeline.encode_prompt`` (plain prompts and embeddings loaded through diffusers' own
two-call ``load_textual_inversion``), chunking, emphasis per encoder, budgets of SDXL pairs, and which
files an SDXL model skips."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sdrepl.core.budget import count_tokens
from sdrepl.core.conditioning import encode_prompts
from sdrepl.core.conditioning_sdxl import encode_encoder_chunks, frame_both, time_ids
from sdrepl.core.embedding import CLIP_G, CLIP_L, Embedding
from sdrepl.core.formats import read_embedding
from sdrepl.core.library import EmbeddingLibrary
from sdrepl.core.prompt import StaticLookup


@pytest.fixture(scope="module")
def xl():
    from sdrepl.core.models import load_model

    return load_model("tiny-sdxl", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def reference_pipe(xl):
    """A second copy of the pipeline for diffusers' own loader (which grows the tokenizers it is given)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(xl.path, local_files_only=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pair_file(tmp_path, name: str, n: int, seed: int = 0, l_width: int = 768, g_width: int = 1280,
              l_n: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    path = tmp_path / f"{name}.safetensors"
    tensors = {CLIP_L: torch.randn(l_n or n, l_width, generator=gen) * 0.02,
               CLIP_G: torch.randn(n, g_width, generator=gen) * 0.02}
    save_file(tensors, str(path))
    return path


def embedding(path, trigger: str) -> Embedding:
    data = read_embedding(path)
    return Embedding(trigger=trigger, qualified=trigger, path=path, data=data, sha256="0" * 64)


def test_tiny_sdxl_has_sdxl_s_shape(xl):
    from transformers import CLIPTextModelWithProjection

    pipe = xl.pipe
    assert xl.family == "sdxl" and xl.native_size == 64
    assert xl.encoder_widths == {CLIP_L: 768, CLIP_G: 1280}
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert pipe.text_encoder_2.config.projection_dim == 1280
    # SDXL's first tokenizer pads with the end token, the second (OpenCLIP) with "!" = id 0.
    assert pipe.tokenizer.pad_token_id == 49407 and pipe.tokenizer_2.pad_token_id == 0
    assert pipe.tokenizer_2.convert_ids_to_tokens(0) == "!"
    assert pipe.unet.config.addition_embed_type == "text_time" and pipe.unet.config.cross_attention_dim == 2048


def test_tiny_sdxl_is_deterministic(xl):
    from sdrepl.core.tiny_sdxl import build_tiny_sdxl

    fresh = build_tiny_sdxl()
    for name in ("text_encoder", "text_encoder_2", "unet", "vae"):
        built, loaded = getattr(fresh, name).state_dict(), getattr(xl.pipe, name).state_dict()
        assert all(torch.equal(built[k], loaded[k]) for k in built), name


@pytest.mark.parametrize("prompt, negative", [
    ("a photo of a cat", "blurry, ugly"),
    ("masterpiece, best quality, a castle on a hill at sunset, oil painting by a famous old master", ""),
    ("", "text"),
])
def test_plain_prompts_match_diffusers_encode_prompt(xl, prompt, negative):
    cond = encode_prompts(xl, prompt, negative, StaticLookup())
    pe, ne, pooled, neg_pooled = xl.pipe.encode_prompt(prompt, negative_prompt=negative or None, device="cpu",
                                                       do_classifier_free_guidance=True)
    for ours, theirs in ((cond.prompt_embeds, pe), (cond.negative_prompt_embeds, ne), (cond.pooled, pooled),
                         (cond.negative_pooled, neg_pooled)):
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() <= 1e-6
    assert cond.prompt_embeds.shape == (1, 77, 2048) and cond.pooled.shape == (1, 1280)


def test_an_empty_negative_prompt_is_zeros_as_in_a1111(xl):
    cond = encode_prompts(xl, "a cat", "", StaticLookup())
    assert not cond.negative_prompt_embeds.any() and not cond.negative_pooled.any()
    assert cond.pooled.abs().sum() > 0


@pytest.mark.parametrize("n", [1, 3])
def test_a_pair_matches_diffusers_two_call_load_textual_inversion(xl, reference_pipe, tmp_path, n):
    path = pair_file(tmp_path, f"pair{n}", n, seed=n)
    emb = embedding(path, "pair-emb")
    from safetensors.torch import load_file

    state = load_file(str(path))
    token = f"<pair{n}>"
    pipe = reference_pipe
    pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    prompt = f"a photo of {token} on a table"
    pe, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    cond = encode_prompts(xl, "a photo of <pair-emb> on a table", "", StaticLookup([emb]))
    assert (cond.prompt_embeds - pe).abs().max().item() <= 1e-6
    assert (cond.pooled - pooled).abs().max().item() <= 1e-6


def test_pair_vectors_reach_each_encoder_at_the_same_positions(xl, tmp_path):
    emb = embedding(pair_file(tmp_path, "p", 2), "p")
    chunks, _ = __import__("sdrepl.core.budget", fromlist=["chunk_prompt"]).chunk_prompt(
        "a <p> b", xl.tokenizer, StaticLookup([emb]))
    framed = frame_both(chunks, xl)
    (start_l, vec_l), = framed[CLIP_L][0].splices
    (start_g, vec_g), = framed[CLIP_G][0].splices
    assert start_l == start_g == 2
    assert torch.equal(vec_l, emb.vectors[CLIP_L]) and torch.equal(vec_g, emb.vectors[CLIP_G])
    # Each encoder frames with its own padding id; the chunk's tokens are the same.
    ids_l, ids_g = framed[CLIP_L][0].ids, framed[CLIP_G][0].ids
    assert torch.equal(ids_l[:6], ids_g[:6]) and ids_l[-1] == 49407 and ids_g[-1] == 0


def _reference_chunk(xl, ids_l, ids_g):
    """One chunk by hand: each encoder's penultimate hidden state, side by side."""
    out_l = xl.pipe.text_encoder(ids_l[None], output_hidden_states=True)
    out_g = xl.pipe.text_encoder_2(ids_g[None], output_hidden_states=True)
    return torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)[0], out_g.text_embeds


def test_long_prompts_and_break_run_every_chunk_through_both_encoders(xl):
    prompt = ", ".join(f"word{i}" for i in range(50)) + " BREAK a red cat"
    cond = encode_prompts(xl, prompt, "", StaticLookup())
    k = cond.budget["chunks"]
    assert k >= 3 and cond.budget["chunk_texts"][-1] == "a red cat"
    assert cond.prompt_embeds.shape == (1, k * 77, 2048)
    from sdrepl.core.budget import chunk_prompt

    chunks, _ = chunk_prompt(prompt, xl.tokenizer, StaticLookup())
    framed = frame_both(chunks, xl)
    with torch.no_grad():
        for i in range(k):
            ref, pooled = _reference_chunk(xl, framed[CLIP_L][i].ids, framed[CLIP_G][i].ids)
            assert (cond.prompt_embeds[0, 77 * i: 77 * (i + 1)] - ref).abs().max() <= 1e-5
            if i == 0:  # the pooled embedding comes from the first chunk only
                assert (cond.pooled - pooled).abs().max() <= 1e-5
    # The negative was empty: zeros, padded to the prompt's length with the empty prompt's chunk.
    neg = cond.negative_prompt_embeds
    assert neg.shape == cond.prompt_embeds.shape and not neg[0, :77].any() and neg[0, 77:].any()


def test_emphasis_restores_the_mean_of_each_encoder_separately(xl):
    from sdrepl.core.budget import chunk_prompt

    plain_chunks, _ = chunk_prompt("a cat on a mat", xl.tokenizer, StaticLookup())
    weighted_chunks, _ = chunk_prompt("a (cat:1.6) on a [mat]", xl.tokenizer, StaticLookup())
    with torch.no_grad():
        for key, encoder in ((CLIP_L, xl.pipe.text_encoder), (CLIP_G, xl.pipe.text_encoder_2)):
            plain, _ = encode_encoder_chunks(encoder, frame_both(plain_chunks, xl)[key])
            weighted, _ = encode_encoder_chunks(encoder, frame_both(weighted_chunks, xl)[key])
            raw, _ = encode_encoder_chunks(encoder, frame_both(weighted_chunks, xl)[key], restore_mean=False)
            assert torch.allclose(weighted.mean(), plain.mean(), atol=1e-6), key
            assert not torch.allclose(raw.mean(), plain.mean(), atol=1e-6), key


def test_time_ids_default_to_the_picture_size_and_no_crop():
    assert time_ids(96, 64).tolist() == [[64, 96, 0, 0, 64, 96]]
    assert time_ids(64, 64, original=(128, 80), crop=(4, 2)).tolist() == [[80, 128, 4, 2, 64, 64]]


@pytest.mark.parametrize("n, count, chunks", [(1, 4, 1), (8, 11, 1), (75, 151, 3)])
def test_budget_of_sdxl_pairs(xl, tmp_path, n, count, chunks):
    emb = embedding(pair_file(tmp_path, f"e{n}", n), "pair")
    lookup = StaticLookup([emb])
    budget = count_tokens("a photo <pair> cat", xl.tokenizer, lookup)
    # "a photo" and "cat" are 3 tokens; an N-vector pair costs N. A 75-vector pair fills a chunk of its own:
    # "a photo" closes as a full chunk (75), the pair's is full (75), "cat" opens a third (1).
    assert budget.count == count and budget.chunks == chunks
    cond = encode_prompts(xl, "a photo <pair> cat", "", lookup)
    assert cond.prompt_embeds.shape == (1, 77 * chunks, 2048)


def test_an_sdxl_model_skips_files_that_do_not_fit_with_reasons(xl, tmp_path):
    folder = tmp_path / "emb"
    folder.mkdir()
    pair_file(folder, "good", 2)
    pair_file(folder, "mismatched", 2, l_n=3)
    save_file({CLIP_G: torch.zeros(2, 1280)}, str(folder / "only-g.safetensors"))
    torch.save({"string_to_param": {"*": torch.zeros(2, 1024)}, "name": "sd2"}, folder / "sd2.pt")
    torch.save({"string_to_param": {"*": torch.zeros(2, 768)}, "name": "sd1"}, folder / "sd1.pt")
    lib = EmbeddingLibrary([folder], xl.encoder_widths, model_label=xl.label)
    lib.scan()
    assert [e.trigger for e in lib.embeddings()] == ["good"]
    reasons = {s.path.name: s.reason for s in lib.skipped()}
    assert "clip_l has 3 vectors but clip_g has 2" in reasons["mismatched.safetensors"]
    assert "no 'clip_l'" in reasons["only-g.safetensors"]
    assert "1024-wide embedding" in reasons["sd2.pt"] and "clip_l 768" in reasons["sd2.pt"]
    assert "as A1111 does" in reasons["sd1.pt"]


def _picture(model, prompt: str = "a photo of a cat"):
    import numpy as np

    from sdrepl.core.samplers import make_scheduler, sample

    model.pipe.scheduler = make_scheduler("Euler a", model.pipe.scheduler.config)
    cond = encode_prompts(model, prompt, "ugly", StaticLookup())
    return np.asarray(sample(model, cond, steps=2, cfg=7.0, width=64, height=64, seed=3))


def test_a_diffusers_folder_and_a_single_file_export_give_the_built_in_picture(xl, tmp_path):
    from sdrepl.core.checkpoint_export import export_single_file
    from sdrepl.core.checkpoints import inspect_state_dict, read_state_dict
    from sdrepl.core.models import load_model

    expected = _picture(xl)
    assert (expected == _picture(xl)).all()  # same prompt, same picture
    folder = tmp_path / "tiny-sdxl-folder"
    xl.pipe.save_pretrained(folder, safe_serialization=True)
    from_folder = load_model(str(folder), device="cpu", dtype="fp32")
    assert from_folder.family == "sdxl" and from_folder.native_size == 64
    assert (_picture(from_folder) == expected).all()
    del from_folder
    path = export_single_file(xl, tmp_path / "tiny-sdxl.safetensors")
    state, hint = read_state_dict(path)
    assert inspect_state_dict(state, path, hint).tiny == "tiny-sdxl"
    del state
    single = load_model(str(path), device="cpu", dtype="fp32")
    assert single.family == "sdxl" and single.source == "single-file"
    assert (_picture(single) == expected).all()


def test_sdrepl_s_loop_gives_the_sdxl_pipeline_s_picture(xl):
    """The denoising loop carries SDXL's added conditioning as StableDiffusionXLPipeline does."""
    import numpy as np

    from sdrepl.core.samplers import make_scheduler

    ours = _picture(xl, "a red fox in the snow")
    cond = encode_prompts(xl, "a red fox in the snow", "ugly", StaticLookup())
    xl.pipe.scheduler = make_scheduler("Euler a", xl.pipe.scheduler.config)
    theirs = xl.pipe(prompt_embeds=cond.prompt_embeds, negative_prompt_embeds=cond.negative_prompt_embeds,
                     pooled_prompt_embeds=cond.pooled, negative_pooled_prompt_embeds=cond.negative_pooled,
                     num_inference_steps=2, guidance_scale=7.0, width=64, height=64,
                     generator=torch.Generator("cpu").manual_seed(3), output_type="pil").images[0]
    assert np.array_equal(ours, np.asarray(theirs))


def test_clip_skip_on_sdxl_matches_diffusers(xl):
    """Clip skip 1 and 2 are SDXL's native penultimate layer; 3 is diffusers' ``clip_skip=1`` (one more)."""
    from sdrepl.core.prompt import PromptOptions

    prompt = "a photo of a cat"
    native = encode_prompts(xl, prompt, "", StaticLookup())
    two = encode_prompts(xl, prompt, "", StaticLookup(), PromptOptions(clip_skip=2))
    assert torch.equal(native.prompt_embeds, two.prompt_embeds)
    three = encode_prompts(xl, prompt, "", StaticLookup(), PromptOptions(clip_skip=3))
    pe, _, pooled, _ = xl.pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False, clip_skip=1)
    assert (three.prompt_embeds - pe).abs().max().item() <= 1e-6
    assert (three.pooled - pooled).abs().max().item() <= 1e-6
