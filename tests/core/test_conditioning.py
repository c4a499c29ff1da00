"""Conditioning: embeddings spliced as vectors, chunks, emphasis, CLIP skip, and faithfulness to the model.

All on the ``tiny`` model (fp32, CPU): a real CLIP text transformer over the real vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdrepl.core.budget import chunk_prompt
from sdrepl.core.conditioning import (
    ChunkInput,
    chunk_inputs,
    emphasis,
    empty_chunk,
    encode_chunks,
    encode_prompts,
    encode_text,
    join_chunks,
)
from sdrepl.core.create import create_embedding_vectors
from sdrepl.core.embedding import SINGLE, Embedding, EmbeddingData
from sdrepl.core.errors import PromptError
from sdrepl.core.prompt import PromptOptions, StaticLookup


def make_embedding(name: str, vectors: torch.Tensor) -> Embedding:
    return Embedding(name, name, Path(f"/emb/{name}.pt"), EmbeddingData({SINGLE: vectors}, "a1111"), "0" * 64)


def cats(n: int) -> str:
    return " ".join(["cat"] * n)


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def zzzz(model) -> Embedding:
    """A 1-vector embedding created from ``tree`` and not trained."""
    return make_embedding("zzzz1234", create_embedding_vectors(model, "tree", 1)[SINGLE])


@pytest.fixture(scope="module")
def lookup(zzzz, fixtures_dir) -> StaticLookup:
    hands = torch.load(fixtures_dir / "a1111" / "bad-hands-5.pt", weights_only=True, map_location="cpu")
    return StaticLookup([zzzz, make_embedding("bad-hands-5", hands["string_to_param"]["*"])])


@pytest.fixture(scope="module")
def reference_pipe(model):
    """The model's own pipeline with a fresh copy of the SD 1.x tokenizer (``model_max_length`` 77), to
    compare with diffusers' ``encode_prompt`` even where a tiny model cached by an older build lost it."""
    from diffusers import StableDiffusionPipeline

    from sdrepl.core.tiny import load_tokenizer

    return StableDiffusionPipeline(**{**model.pipe.components, "tokenizer": load_tokenizer()})


# --- faithful to the model ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "negative"), [("a photo of a tree by monet", ""), ("cat, dog", "ugly, blurry, " + cats(60))]
)
def test_plain_prompt_is_bit_identical_to_the_pipeline(prompt, negative, model, reference_pipe):
    ours = encode_prompts(model, prompt, negative, StaticLookup())
    with torch.no_grad():
        theirs, theirs_neg = reference_pipe.encode_prompt(
            prompt, model.device, 1, True, negative_prompt=negative
        )
    assert torch.equal(ours.prompt_embeds, theirs)
    assert torch.equal(ours.negative_prompt_embeds, theirs_neg)


def test_plain_prompt_equals_the_text_encoder_on_input_ids(model):
    ids = model.tokenizer(
        "a photo of a tree by monet", padding="max_length", max_length=77, return_tensors="pt"
    )
    with torch.no_grad():
        expected = model.text_encoder(ids.input_ids)[0]
    assert torch.equal(encode_text(model, "a photo of a tree by monet", StaticLookup()), expected)


def test_clip_skip_2_is_the_penultimate_state_through_the_final_norm(model):
    ids = model.tokenizer("a red cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = model.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        expected = model.text_encoder.final_layer_norm(hidden)
    ours = encode_text(model, "a red cat", StaticLookup(), PromptOptions(clip_skip=2))
    assert torch.equal(ours, expected)
    assert not torch.equal(ours, encode_text(model, "a red cat", StaticLookup()))


def test_clip_skip_out_of_range_is_refused(model):
    with pytest.raises(PromptError, match="clip_skip 3 is out of range"):
        encode_text(model, "cat", StaticLookup(), PromptOptions(clip_skip=3))


# --- embeddings -----------------------------------------------------------------------------------------


def test_untrained_embedding_from_tree_encodes_as_tree(model, lookup):
    expected = encode_text(model, "a tree by monet", lookup)
    assert torch.equal(encode_text(model, "a zzzz1234 by monet", lookup), expected)  # bare name
    assert torch.equal(encode_text(model, "a <zzzz1234> by monet", lookup), expected)
    assert torch.equal(encode_text(model, "a embedding:zzzz1234 by monet", lookup), expected)
    assert not torch.equal(
        encode_text(model, "a zzzz1234 by monet", lookup, PromptOptions(bare_names=False)), expected
    )


@pytest.mark.slow
def test_untrained_embedding_makes_the_same_picture(model, lookup):
    def picture(prompt: str):
        cond = encode_prompts(model, prompt, "", lookup)
        out = model.pipe(
            prompt_embeds=cond.prompt_embeds,
            negative_prompt_embeds=cond.negative_prompt_embeds,
            num_inference_steps=3,
            height=64,
            width=64,
            generator=torch.Generator("cpu").manual_seed(1234),
            output_type="np",
        )
        return torch.from_numpy(out.images)

    expected = picture("a tree by monet")
    assert torch.equal(picture("a <zzzz1234> by monet"), expected)
    assert torch.equal(picture("a zzzz1234 by monet"), expected)
    assert not torch.equal(picture("a cat by monet"), expected)


def test_embedding_vectors_replace_their_positions(model, lookup):
    """Splicing ``bad-hands-5`` equals running the encoder on ids whose rows are those vectors."""
    chunks, _ = chunk_prompt("a photo of <bad-hands-5>", model.tokenizer, lookup)
    (ci,) = chunk_inputs(chunks, model.tokenizer)
    assert ci.splices[0][0] == 4  # BOS, a, photo, of
    tm = model.text_encoder
    with torch.no_grad():
        embeds = tm.embeddings.token_embedding(ci.ids[None]).clone()
        embeds[0, 4:6] = lookup.get("bad-hands-5").vectors[SINGLE]
        changed = encode_chunks(model.text_encoder, [ci])
        plain = encode_text(model, "a photo of", lookup)
    assert changed.shape == (1, 77, 768)
    assert torch.equal(changed[0, :4], plain[0, :4])  # causal: positions before the embedding are untouched
    assert not torch.equal(changed[0, 4:], plain[0, 4:])


def test_long_prompt_is_not_truncated(model, lookup):
    a = encode_text(model, cats(80) + " dog", lookup)
    b = encode_text(model, cats(80) + " red", lookup)
    assert a.shape == (1, 154, 768)
    assert torch.equal(a[:, :77], b[:, :77])  # the first chunk is the same
    assert not torch.equal(a[:, 77:], b[:, 77:])  # the word in the second chunk counts


def test_positive_and_negative_are_padded_with_empty_chunks(model, lookup):
    cond = encode_prompts(model, cats(160), "ugly", lookup)
    assert cond.prompt_embeds.shape == cond.negative_prompt_embeds.shape == (1, 231, 768)
    empty = encode_text(model, "", lookup)
    assert torch.equal(cond.negative_prompt_embeds[:, :77], encode_text(model, "ugly", lookup))
    assert torch.equal(cond.negative_prompt_embeds[:, 77:154], empty)
    assert torch.equal(cond.negative_prompt_embeds[:, 154:], empty)
    assert cond.budget["count"] == 160 and cond.budget["negative"]["count"] == 1


def test_unknown_name_is_an_error_before_encoding(model, lookup):
    with pytest.raises(PromptError, match="did you mean <zzzz1234>"):
        encode_prompts(model, "cat", "<zzzz123>", lookup)


def test_embedding_of_another_width_is_refused(model):
    lookup = StaticLookup([make_embedding("wide", torch.zeros(1, 1024))])
    with pytest.raises(PromptError, match="1024 wide but the model's text encoder is 768"):
        encode_text(model, "<wide>", lookup)


# --- emphasis -------------------------------------------------------------------------------------------


def test_weight_one_is_bit_identical_to_plain(model, lookup):
    assert torch.equal(
        encode_text(model, "a (cat:1.0) on a mat", lookup), encode_text(model, "a cat on a mat", lookup)
    )


def _encode(model, lookup, prompt: str, *, restore_mean: bool = True) -> torch.Tensor:
    chunks, _ = chunk_prompt(prompt, model.tokenizer, lookup)
    with torch.no_grad():
        return encode_chunks(
            model.text_encoder, chunk_inputs(chunks, model.tokenizer), restore_mean=restore_mean
        )


def test_weight_scales_only_its_positions_then_the_mean_is_restored(model, lookup):
    plain = _encode(model, lookup, "a cat on a mat")
    scaled = _encode(model, lookup, "a (cat:1.5) on a mat", restore_mean=False)
    others = [i for i in range(77) if i != 2]  # BOS, a, [cat], on, ...
    assert torch.equal(scaled[0, others], plain[0, others])
    assert torch.equal(scaled[0, 2], plain[0, 2] * 1.5)
    restored = _encode(model, lookup, "a (cat:1.5) on a mat")
    assert torch.allclose(restored.mean(), plain.mean(), rtol=1e-6, atol=1e-7)
    assert torch.allclose(restored, scaled * (plain.mean() / scaled.mean()), rtol=1e-6, atol=1e-7)


def test_embedding_takes_the_weight_of_its_segment(model, lookup):
    plain = _encode(model, lookup, "a <bad-hands-5>")
    scaled = _encode(model, lookup, "a (<bad-hands-5>:0.5)", restore_mean=False)
    assert torch.equal(scaled[0, 2:4], plain[0, 2:4] * 0.5)
    assert torch.equal(scaled[0, :2], plain[0, :2])


# --- the model is never changed -------------------------------------------------------------------------


def test_using_embeddings_changes_neither_tokenizer_nor_encoder(model, zzzz):
    before = {k: v.clone() for k, v in model.text_encoder.state_dict().items()}
    vocab = (len(model.tokenizer), model.tokenizer.vocab_size, model.tokenizer.get_vocab())
    lookup = StaticLookup([zzzz])
    encode_prompts(model, "a <zzzz1234> by monet", "zzzz1234", lookup)
    lookup.add(make_embedding("other", torch.randn(3, 768)))
    encode_prompts(model, "<other> " + cats(80), "", lookup)
    lookup.remove("zzzz1234")
    encode_text(model, "<other>", lookup)
    assert (len(model.tokenizer), model.tokenizer.vocab_size, model.tokenizer.get_vocab()) == vocab
    after = model.text_encoder.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


# --- the trainer's entry point --------------------------------------------------------------------------


def test_encode_chunks_is_differentiable_in_the_splice_vectors(model, zzzz):
    lookup = StaticLookup([make_embedding("learned", torch.zeros(2, 768))])
    param = torch.nn.Parameter(torch.randn(2, 768) * 0.01)
    chunks, _ = chunk_prompt("a photo of <learned>, (red:1.2)", model.tokenizer, lookup)
    inputs = chunk_inputs(chunks, model.tokenizer, overrides={"learned": param})
    z = encode_chunks(model.text_encoder, inputs)
    assert z.requires_grad
    # autograd.grad, not backward(): nothing accumulates in the shared model's parameters
    (grad,) = torch.autograd.grad(z.pow(2).mean(), [param])
    assert grad.shape == (2, 768) and grad.abs().sum() > 0


def test_overrides_equal_stored_vectors_when_equal(model, zzzz):
    lookup = StaticLookup([zzzz])
    chunks, _ = chunk_prompt("a <zzzz1234>", model.tokenizer, lookup)
    with torch.no_grad():
        stored = encode_chunks(model.text_encoder, chunk_inputs(chunks, model.tokenizer))
        override = {"ZZZZ1234": zzzz.vectors[SINGLE].clone()}
        given = encode_chunks(model.text_encoder, chunk_inputs(chunks, model.tokenizer, overrides=override))
    assert torch.equal(stored, given)


def test_chunk_input_framing(model):
    ci = empty_chunk(model.tokenizer)
    assert isinstance(ci, ChunkInput) and ci.ids.shape == (77,)
    assert ci.ids[:3].tolist() == [49406, 49407, 49407] and ci.weights is None
    z = encode_chunks(model.text_encoder, [ci, ci])
    assert join_chunks(z).shape == (1, 154, 768)


def test_emphasis_skips_mean_restoration_when_the_mean_is_zero():
    """A1111 divides by the weighted chunk's mean; at ~0 that quotient is noise (zeros or inf). Skipped."""
    z = torch.randn(77, 8)
    z = z - z.mean(dim=-1, keepdim=True)  # every position centred, as an untrained layer norm leaves it
    z.requires_grad_(True)
    weights = torch.ones(77)
    weights[5] = 1.5
    out = emphasis(z, weights)
    assert torch.isfinite(out).all()
    assert torch.equal(out[5], z[5] * 1.5) and torch.equal(out[4], z[4])
    (grad,) = torch.autograd.grad(out.pow(2).sum(), [z])
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_emphasis_restores_a_meaningful_mean():
    z = torch.randn(77, 8) + 0.5
    weights = torch.ones(77)
    weights[3] = 1.3
    out = emphasis(z, weights)
    assert torch.allclose(out.mean(), z.mean(), atol=1e-6) and not torch.equal(out[3], z[3] * 1.3)
