"""The token budget: the spec's worked examples, a hand-derived table of chunking cases, and speed.

Counts in the table are derived by hand from the rules in ``shared/spec/prompt-language.md`` §3, using
words that are one CLIP token each ("cat", "dog", "red", ","; checked against the tokenizer below).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdrepl.core.budget import CHUNK, Budget, chunk_prompt, count_tokens, prompt_budget, tokenize_text
from sdrepl.core.embedding import SINGLE, Embedding, EmbeddingData
from sdrepl.core.errors import PromptError
from sdrepl.core.normalize import normalize_text
from sdrepl.core.prompt import PromptOptions, StaticLookup


def make_embedding(name: str, vectors: torch.Tensor) -> Embedding:
    return Embedding(name, name, Path(f"/emb/{name}.pt"), EmbeddingData({SINGLE: vectors}, "a1111"), "0" * 64)


def fixture_vectors(folder: Path, file: str) -> torch.Tensor:
    path = folder / "a1111" / file
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)["emb_params"]
    return torch.load(path, weights_only=True, map_location="cpu")["string_to_param"]["*"]


@pytest.fixture(scope="module")
def lookup(fixtures_dir) -> StaticLookup:
    return StaticLookup(
        [
            make_embedding("bad-hands-5", fixture_vectors(fixtures_dir, "bad-hands-5.pt")),  # 2 vectors
            make_embedding("bad-prompt", fixture_vectors(fixtures_dir, "bad-prompt.pt")),  # 16 vectors
            make_embedding("EasyNegative", fixture_vectors(fixtures_dir, "EasyNegative.safetensors")),  # 8
            make_embedding("eyeliner2", torch.zeros(3, 768)),
            make_embedding("wide75", torch.zeros(75, 768)),
        ]
    )


def cats(n: int) -> str:
    return " ".join(["cat"] * n)


# --- the spec's worked examples -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "label"),
    [
        ("a photo of a tree by monet", "7/75"),
        ("a photo of <bad-hands-5>", "5/75"),
        ("<bad-prompt>", "16/75"),
        (cats(76), "76/150"),
    ],
)
def test_spec_examples(prompt, label, tokenizer, lookup):
    assert count_tokens(prompt, tokenizer, lookup).label() == label


def test_fixture_sizes_match_the_spec(lookup):
    assert [lookup.get(n).num_vectors for n in ("bad-hands-5", "bad-prompt", "EasyNegative")] == [2, 16, 8]


# --- the table ------------------------------------------------------------------------------------------

TABLE = [
    # (prompt, options or None, count, chunks)
    ("", None, 0, 1),  # nothing: one empty last chunk, counting its real length 0
    ("cat", None, 1, 1),
    (cats(75), None, 75, 1),  # exactly full; no 76th token ever closes it
    (cats(76), None, 76, 2),  # 76th token closes chunk 1 (75) + 1
    (cats(150), None, 150, 2),  # 75 + 75 (the last chunk is full but not closed)
    (cats(151), None, 151, 3),  # 75 + 75 + 1
    (cats(300), None, 300, 4),
    ("cat, dog, red", None, 5, 1),  # commas are tokens
    ("cat,dog", None, 3, 1),
    ("cat break dog", None, 3, 1),  # lower-case "break" is a word
    # comma backtrack, window 20: a full chunk meets a non-comma while the last comma is at index >= 55
    (cats(60) + ", " + cats(20), None, 95, 2),  # comma at 60; 14 cats after it move: 75 + (14 + 6)
    (cats(60) + ", " + cats(20), PromptOptions(comma_window=0), 81, 2),  # off: 75 + 6
    (cats(60) + ", " + cats(20), PromptOptions(comma_window=5), 81, 2),  # 75 - 60 = 15 > 5: no move
    (cats(50) + ", " + cats(30), None, 81, 2),  # comma at 50: 75 - 50 = 25 > 20: no move, 75 + 6
    (cats(50) + ", " + cats(30), PromptOptions(comma_window=30), 105, 2),  # 25 <= 30: 24 move: 75 + 30
    (cats(55) + ", " + cats(25), None, 100, 2),  # comma at 55: 75 - 55 = 20 <= 20: 19 move: 75 + 25
    (cats(54) + ", " + cats(26), None, 81, 2),  # comma at 54: 21 > 20: no move
    (cats(74) + ", cat", None, 76, 2),  # comma is the 75th token: nothing after it to move; 75 + 1
    (cats(75) + ", cat", None, 77, 2),  # the 76th token is the comma: it starts chunk 2; 75 + 2
    (cats(40) + ", " + cats(20) + ", " + cats(20), None, 95, 2),  # last comma (61) counts: 75 + (13 + 7)
    # BREAK
    ("cat BREAK dog", None, 76, 2),  # chunk 1 closed with 1 token counts 75; + 1
    ("BREAK cat", None, 76, 2),  # as in A1111, a leading BREAK closes an empty chunk
    ("cat BREAK", None, 75, 1),  # closed chunk, nothing after it
    ("cat BREAK BREAK dog", None, 151, 3),  # 75 + 75 (empty) + 1
    (cats(75) + " BREAK dog", None, 76, 2),  # the full chunk is closed by BREAK, not twice
    ("(cat BREAK dog)", None, 76, 2),  # BREAK inside brackets still breaks
    # embeddings cost their vectors and never straddle chunks
    ("<bad-hands-5>", None, 2, 1),
    ("cat <bad-prompt>", None, 17, 1),
    ("embedding:EasyNegative", None, 8, 1),
    ("EasyNegative, bad-hands-5", None, 11, 1),  # bare: 8 + comma + 2
    ("EasyNegative, bad-hands-5", PromptOptions(bare_names=False), 8, 1),  # easy negative , bad - hands - 5
    (cats(67) + " <EasyNegative>", None, 75, 1),  # 67 + 8 = 75: fits exactly
    (cats(68) + " <EasyNegative>", None, 83, 2),  # 68 + 8 > 75: chunk 1 closed (75) + 8
    (cats(70) + " <EasyNegative> dog", None, 84, 2),  # 75 + 8 + 1
    (cats(75) + " <bad-hands-5>", None, 77, 2),  # full chunk: 75 + 2
    ("<wide75>", None, 75, 1),
    ("cat <wide75>", None, 150, 2),  # 1 + 75 > 75: 75 + 75
    ("<wide75> <bad-hands-5>", None, 77, 2),
    ("<bad-prompt> BREAK <bad-prompt>", None, 91, 2),  # 75 + 16
    (cats(60) + ", <bad-hands-5> " + cats(20), None, 97, 2),  # comma at 60, emb at 61-62, 12 cats fill;
    # the 13th cat moves the embedding and 12 cats: 75 + (14 + 8)
    # weights and escapes cost nothing themselves
    ("(cat:1.3) [dog] ((red))", None, 3, 1),
    ("((<eyeliner2>:1.2)) [[cat]]", None, 4, 1),  # 3 + 1
    (r"\(cat\)", None, 3, 1),  # ( cat )
    ("(cat", None, 1, 1),  # the unclosed bracket is not a token
    ("(" + cats(76) + ":0.5)", None, 76, 2),
]


@pytest.mark.parametrize(("prompt", "options", "count", "chunks"), TABLE)
def test_budget_table(prompt, options, count, chunks, tokenizer, lookup):
    budget = count_tokens(prompt, tokenizer, lookup, options)
    assert (budget.count, budget.chunks) == (count, chunks)
    assert budget.limit == 75 * max(1, -(-count // 75))
    assert len(budget.chunk_texts) == chunks


@pytest.mark.parametrize("word", ["cat", "dog", "red", ",", "break"])
def test_table_words_are_single_tokens(word, tokenizer):
    assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1


@pytest.mark.parametrize(
    "prompt",
    [
        p
        for p, o, c, _ in TABLE
        if o is None and c <= 75 and not any(s in p for s in ("<", "BREAK", "embedding:"))
    ],
)
def test_table_agrees_with_the_tokenizer(prompt, tokenizer):
    """Rows without embeddings, BREAK or chunking: the count is what the tokenizer itself gives."""
    budget = count_tokens(prompt, tokenizer, StaticLookup())
    plain = prompt.replace("\\", "").replace("(", " ").replace(")", " ").replace("[", " ").replace("]", " ")
    if prompt.startswith("\\"):
        plain = prompt.replace("\\", "")
    for weight in (":1.3", ":1.2", ":0.5"):
        plain = plain.replace(weight, "")
    assert budget.count == len(tokenizer(plain, add_special_tokens=False)["input_ids"])


def test_backtracked_tokens_and_embeddings_move_to_the_next_chunk(tokenizer, lookup):
    chunks, budget = chunk_prompt(cats(60) + ", <bad-hands-5> " + cats(20), tokenizer, lookup)
    assert [len(c.tokens) for c in chunks] == [61, 22]
    assert chunks[0].splices == [] and chunks[1].splices[0][0] == 0
    assert budget.chunk_texts[0].endswith("cat ,")
    assert budget.chunk_texts[1].startswith("<bad-hands-5> cat")


def test_describe_and_label(tokenizer, lookup):
    budget = count_tokens("EasyNegative, <bad-hands-5> " + cats(70), tokenizer, lookup)
    assert isinstance(budget, Budget)
    assert budget.label() == "81/150"  # 8 + 1 + 2 + 64 cats = 75; 6 cats left
    assert budget.describe() == {
        "count": 81,
        "limit": 150,
        "chunks": 2,
        "embeddings": ["EasyNegative", "bad-hands-5"],
        "bare": ["EasyNegative"],
        "chunk_texts": ["<EasyNegative> , <bad-hands-5> " + cats(64), cats(6)],
    }


def test_prompt_budget_counts_the_negative_separately(tokenizer, lookup):
    # negative: 16 + comma + 70 = 87; the comma (index 16) is too far back to move anything: 75 + 12
    result = prompt_budget("a photo of a tree by monet", "<bad-prompt>, " + cats(70), tokenizer, lookup)
    assert (result["count"], result["limit"], result["chunks"]) == (7, 75, 1)
    negative = result["negative"]
    assert (negative["count"], negative["limit"], negative["embeddings"]) == (87, 150, ["bad-prompt"])
    assert set(result) == {"count", "limit", "chunks", "embeddings", "bare", "chunk_texts", "negative"}
    assert set(negative) == {"count", "limit", "chunks", "embeddings", "bare", "chunk_texts"}


def test_unknown_reference_is_an_error_in_the_budget_too(tokenizer, lookup):
    with pytest.raises(PromptError, match="did you mean <bad-prompt>"):
        prompt_budget("cat", "<bad-promt>", tokenizer, lookup)


def test_embedding_over_75_vectors_is_refused(tokenizer):
    lookup = StaticLookup([make_embedding("huge", torch.zeros(76, 768))])
    with pytest.raises(PromptError, match="76 vectors"):
        count_tokens("<huge>", tokenizer, lookup)


# --- invariants and tokenization ------------------------------------------------------------------------

WORDS = st.sampled_from(
    ["cat", "dog", ",", "BREAK", "<bad-hands-5>", "<bad-prompt>", "(red", ")", "EasyNegative"]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(WORDS, max_size=200), window=st.integers(0, 30))
def test_chunks_never_overflow_and_count_adds_up(words, window, tokenizer, lookup):
    chunks, budget = chunk_prompt(" ".join(words), tokenizer, lookup, PromptOptions(comma_window=window))
    assert all(len(c.tokens) == len(c.weights) <= CHUNK for c in chunks)
    for chunk in chunks:
        for offset, piece in chunk.splices:  # every embedding whole inside one chunk
            assert offset + piece.embedding.num_vectors <= len(chunk.tokens)
    # closed chunks count 75; the last counts its length, or 75 when BREAK closed it
    assert budget.count in (CHUNK * (len(chunks) - 1) + len(chunks[-1].tokens), CHUNK * len(chunks))
    assert budget.limit >= budget.count


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=60))
def test_cached_word_tokenization_equals_the_tokenizer(text, tokenizer):
    # on the text as A1111's tokenizer stack sees it (ftfy, whitespace): the one path adds nothing else
    expected = tokenizer(normalize_text(text), add_special_tokens=False)["input_ids"]
    assert tokenize_text(text, tokenizer) == expected


def test_budget_of_a_300_token_prompt_is_fast(tokenizer, lookup):
    prompt = ", ".join(["red cat"] * 95) + ", <EasyNegative> <bad-hands-5> dog"  # 284 + 10 + 1 = 295 tokens
    count_tokens(prompt, tokenizer, lookup)
    times = []
    for i in range(200):
        edited = prompt + " dog" * (i % 5)  # as if typing: the last piece changes
        start = time.perf_counter()
        count_tokens(edited, tokenizer, lookup)
        times.append(time.perf_counter() - start)
    assert statistics.median(times) < 0.002
