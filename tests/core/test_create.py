"""Initialising a new embedding's vectors from text (spec §4): vector i = init token floor(i * len / N)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sdrepl.core.create import create_embedding_vectors
from sdrepl.core.embedding import CLIP_G, CLIP_L, SINGLE
from sdrepl.core.errors import UsageError


@pytest.fixture(scope="module")
def table(tiny_model) -> torch.Tensor:
    return tiny_model.text_encoder.get_input_embeddings().weight.detach()


def rows(tiny_model, table, words: list[str]) -> torch.Tensor:
    ids = [tiny_model.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words]
    return table[ids].float().cpu()


@pytest.mark.parametrize(
    ("init", "n", "expected"),
    [
        ("tree", 1, ["tree"]),
        ("tree", 4, ["tree"] * 4),  # a short text is spread over the vectors
        ("red cat", 3, ["red", "red", "cat"]),  # indices 0, floor(2/3)=0, floor(4/3)=1
        ("red cat", 2, ["red", "cat"]),
        ("a photo of a tree", 2, ["a", "of"]),  # indices 0, floor(5/2)=2
        ("a photo of a tree", 5, ["a", "photo", "of", "a", "tree"]),
        ("a photo of a tree", 1, ["a"]),
    ],
)
def test_vector_i_is_the_init_token_at_floor_i_len_over_n(init, n, expected, tiny_model, table):
    vectors = create_embedding_vectors(tiny_model, init, n)
    assert list(vectors) == [SINGLE]
    assert torch.equal(vectors[SINGLE], rows(tiny_model, table, expected))


@pytest.mark.parametrize("init", ["", "   "])
def test_empty_init_text_gives_zeros(init, tiny_model):
    vectors = create_embedding_vectors(tiny_model, init, 3)[SINGLE]
    assert vectors.shape == (3, 768) and not vectors.any()


def test_result_is_a_cpu_float32_copy(tiny_model, table):
    before = table.clone()
    vectors = create_embedding_vectors(tiny_model, "tree", 2)[SINGLE]
    assert (vectors.device.type, vectors.dtype, vectors.shape) == ("cpu", torch.float32, (2, 768))
    vectors += 1  # the model's table is not shared
    assert torch.equal(table, before)


def test_tokenizer_and_text_encoder_form(tiny_model):
    by_model = create_embedding_vectors(tiny_model, "a tree", 2)
    by_parts = create_embedding_vectors(
        tiny_model.tokenizer, "a tree", 2, text_encoder=tiny_model.text_encoder
    )
    assert torch.equal(by_model[SINGLE], by_parts[SINGLE])


def test_no_bos_or_eos(tiny_model, table):
    vectors = create_embedding_vectors(tiny_model, "tree", 3)[SINGLE]
    special = table[[49406, 49407]].float()
    assert not any(torch.equal(v, s) for v in vectors for s in special)


@pytest.mark.parametrize("n", [0, 76, -1])
def test_vector_count_out_of_range(n, tiny_model):
    with pytest.raises(UsageError, match="1 to 75 vectors"):
        create_embedding_vectors(tiny_model, "tree", n)


def test_two_text_encoders_give_a_pair(tiny_model):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    second = CLIPTextModel(config)
    pipe = SimpleNamespace(
        tokenizer=tiny_model.tokenizer,
        text_encoder=tiny_model.text_encoder,
        tokenizer_2=tiny_model.tokenizer,
        text_encoder_2=second,
    )
    vectors = create_embedding_vectors(SimpleNamespace(pipe=pipe), "tree", 2)
    assert {k: tuple(v.shape) for k, v in vectors.items()} == {CLIP_L: (2, 768), CLIP_G: (2, 32)}


def test_needs_a_text_encoder(tiny_model):
    with pytest.raises(TypeError, match="text_encoder="):
        create_embedding_vectors(tiny_model.tokenizer, "tree", 1)
