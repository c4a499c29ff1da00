"""The embedding inspector's measures: nearest tokens, norm percentiles, huge flags, similarity, trails."""

from __future__ import annotations

import pytest
import torch

from sdrepl.core.create import create_embedding_vectors
from sdrepl.core.embedding import SINGLE
from sdrepl.core.inspect_embedding import (
    HUGE_FACTOR,
    Vocabulary,
    inspect_vectors,
    percentile,
    similarity,
    trail,
)


class _Tokens:
    """A tokenizer of ``t0``..``tN`` words (what the inspector asks of one)."""

    def convert_ids_to_tokens(self, index: int) -> str:
        return f"t{index}</w>"

    def decode(self, ids: list[int]) -> str:
        return "".join(f"t{i} " for i in ids)


def _vocab(rows: torch.Tensor) -> Vocabulary:
    norms = rows.norm(dim=1).sort().values.tolist()
    return Vocabulary(rows.float(), norms, _Tokens())


def test_percentile_counts_the_share_at_or_below():
    norms = [1.0, 2.0, 3.0, 4.0]
    assert percentile(norms, 0.5) == 0.0
    assert percentile(norms, 2.0) == 50.0
    assert percentile(norms, 2.5) == 50.0
    assert percentile(norms, 4.0) == 100.0
    assert percentile([], 1.0) == 0.0


def test_constructed_vectors_get_their_norms_percentiles_and_huge_flags():
    # a vocabulary of 10 rows along axis 0 with norms 1..10
    rows = torch.zeros(10, 4)
    rows[:, 0] = torch.arange(1, 11, dtype=torch.float32)
    vocab = _vocab(rows)
    vectors = torch.tensor([[0.0, 3.0, 4.0, 0.0],       # norm 5: half the vocabulary is <= 5
                            [0.0, 0.0, 0.0, 25.0],      # norm 25 > 2 x 10: huge
                            [20.0, 0.0, 0.0, 0.0]])     # norm 20 = 2 x max: not above, not huge
    report = inspect_vectors(vectors, vocab)
    got = [(v["norm"], v["percentile"], v["huge"]) for v in report["vectors"]]
    assert got == [(5.0, 50.0, False), (25.0, 100.0, True), (20.0, 100.0, False)]
    assert HUGE_FACTOR == 2.0 and report["vocabulary"]["max_norm"] == 10.0
    assert report["vocabulary"]["median_norm"] == 5.5
    # vector 2 points along axis 0, like every row: cosine 1 with all, orthogonal vectors 0
    assert [n["cosine"] for n in report["vectors"][2]["nearest"]] == [1.0] * 5
    assert report["vectors"][0]["nearest"][0]["cosine"] == 0.0
    assert report["similarity"] == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def test_nearest_tokens_are_ranked_by_cosine_not_by_distance():
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [10.0, 1.0], [-1.0, 0.0]])
    report = inspect_vectors(torch.tensor([[0.9, 0.1]]), _vocab(rows), top=3)
    nearest = report["vectors"][0]["nearest"]
    assert [n["token"] for n in nearest] == ["t2", "t0", "t1"]  # t2 is far away but points the same way
    assert nearest[0]["cosine"] == pytest.approx(9.1 / (0.82 ** 0.5 * 101 ** 0.5), abs=1e-5) and nearest[0]["id"] == 2


def test_a_zero_vector_has_no_nearest_tokens_and_similarity_zero():
    rows = torch.eye(3)
    report = inspect_vectors(torch.zeros(2, 3), _vocab(rows))
    assert [v["nearest"] for v in report["vectors"]] == [[], []]
    assert similarity(torch.zeros(2, 3)) == [[0.0, 0.0], [0.0, 0.0]]


def test_a_vector_of_the_wrong_width_is_refused():
    with pytest.raises(ValueError, match="width 5"):
        inspect_vectors(torch.zeros(1, 5), _vocab(torch.eye(3)))


def test_an_untrained_embedding_from_tree_is_nearest_tree_with_cosine_one(tiny_model):
    pipe = tiny_model.pipe
    vectors = create_embedding_vectors(tiny_model, "tree", 2)[SINGLE]
    report = inspect_vectors(vectors, Vocabulary.of(pipe.tokenizer, pipe.text_encoder))
    first = report["vectors"][0]["nearest"][0]
    assert first["token"] == "tree" and first["cosine"] == 1.0
    assert first["id"] == pipe.tokenizer.convert_tokens_to_ids("tree</w>")
    assert report["vocabulary"]["tokens"] == pipe.text_encoder.get_input_embeddings().weight.shape[0]
    assert 0 < report["vectors"][0]["percentile"] <= 100 and not report["vectors"][0]["huge"]
    assert report["similarity"][0][1] == 1.0  # both vectors are tree's row


def test_trail_follows_snapshots_in_step_order():
    rows = torch.eye(3)
    vocab = _vocab(rows)
    a = torch.tensor([[1.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 3.0, 0.0]])
    steps = trail([(200, b), (100, a)], vocab)
    assert [s["step"] for s in steps] == [100, 200]
    assert steps[0]["vectors"][0]["cosine_to_previous"] is None
    assert steps[1]["vectors"][0]["cosine_to_previous"] == 0.0
    assert steps[1]["vectors"][0]["nearest"]["token"] == "t1" and steps[1]["vectors"][0]["huge"] is True
