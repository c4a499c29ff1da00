"""Tokenizing and chunking a parsed prompt: the token budget the toolbar shows, and the chunks the encoder
encodes (one routine for both, so what the toolbar says is what the model gets).

The rules (``shared/spec/prompt-language.md`` §3) are AUTOMATIC1111's ``tokenize_line``:
75-token chunks; an embedding's N vectors cost N tokens and never straddle two chunks; when a full chunk
meets one more token that is not a comma and the last comma lies in the chunk's last ``comma_window``
tokens, what follows that comma moves to the next chunk; ``BREAK`` closes the chunk at once (even an empty
one, as in A1111); a closed chunk counts 75, the last one its real length; ``limit = 75 * max(1,
ceil(count / 75))``. Unlike A1111, embeddings moved by the comma backtrack move with their tokens.

This runs on every keystroke, so text is never sent to the tokenizer as a whole: CLIP's BPE never crosses
whitespace, so a piece of text tokenizes as the concatenation of its words, and both pieces and words are
cached per tokenizer. Each piece is first normalised as A1111's tokenizer does it
(:func:`sdrepl.core.normalize.normalize_text`: ftfy, then whitespace), here and only here, so the budget,
the conditioning and init texts all see the same tokens.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from sdrepl.core.embedding import Embedding
from sdrepl.core.errors import PromptError
from sdrepl.core.normalize import normalize_text
from sdrepl.core.prompt import (
    BreakPiece,
    EmbeddingLookup,
    EmbeddingPiece,
    ParsedPrompt,
    PromptOptions,
    parse_prompt,
)

#: Real tokens per chunk (77 with BOS and EOS).
CHUNK = 75
#: The id written where an embedding's vectors go; the encoder overwrites those rows, so any id works
#: except BOS/EOS (the EOS position matters to pooled outputs). A1111 uses 0 as well.
PLACEHOLDER = 0


# --- cached tokenization --------------------------------------------------------------------------------


class TokenCache:
    """Tokenization of text pieces for one tokenizer, cached by the piece string and by word."""

    WORDS_MAX = 1 << 16

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._words: dict[str, tuple[int, ...]] = {}
        self.piece_ids = functools.lru_cache(maxsize=4096)(self._piece_ids)
        self.decode = functools.lru_cache(maxsize=1024)(self._decode)
        ids = tokenizer(",", add_special_tokens=False)["input_ids"]
        self.comma = ids[0] if len(ids) == 1 else None

    def _piece_ids(self, text: str) -> tuple[int, ...]:
        words = [w for w in normalize_text(text).split(" ") if w]
        known = self._words
        parts = [known.get(w) for w in words]
        missing = list(dict.fromkeys(w for w, ids in zip(words, parts, strict=True) if ids is None))
        if missing:  # one batched call for every new word (a pasted prompt), usually none or one
            batch = self.tokenizer(missing, add_special_tokens=False)["input_ids"]
            encoded = {w: tuple(ids) for w, ids in zip(missing, batch, strict=True)}
            if len(known) + len(encoded) > self.WORDS_MAX:
                self._words = {}  # rebind, never clear: another thread may be reading the old dict
            self._words.update(encoded)
            parts = [ids if ids is not None else encoded[w] for w, ids in zip(words, parts, strict=True)]
        return tuple(i for ids in parts for i in ids)

    def _decode(self, ids: tuple[int, ...]) -> str:
        return self.tokenizer.decode(list(ids)).strip()


#: Where a tokenizer's cache lives: on the tokenizer itself, so it dies with it. A process-wide table would
#: keep every tokenizer it ever saw alive (a keep-alive reload makes a new one each time: +20 MB a cycle).
_CACHE_ATTR = "_sdrepl_token_cache"


def token_cache(tokenizer: Any) -> TokenCache:
    """The cache of ``tokenizer`` (held by the tokenizer, so it is freed with it)."""
    cache = getattr(tokenizer, _CACHE_ATTR, None)
    if not isinstance(cache, TokenCache) or cache.tokenizer is not tokenizer:
        cache = TokenCache(tokenizer)
        setattr(tokenizer, _CACHE_ATTR, cache)
    return cache


def tokenize_text(text: str, tokenizer: Any) -> list[int]:
    """Token ids of plain text, without BOS/EOS (the same as ``tokenizer(text).input_ids[1:-1]``)."""
    return list(token_cache(tokenizer).piece_ids(text))


# --- chunking -------------------------------------------------------------------------------------------


@dataclass
class Chunk:
    """Up to 75 positions of one CLIP chunk, before BOS/EOS/padding are added."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    #: (offset in ``tokens``, embedding piece): the piece's vectors replace tokens[offset:offset+N].
    splices: list[tuple[int, EmbeddingPiece]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    def split_at(self, at: int) -> Chunk:
        """Cut this chunk at ``at`` and return the tail as a new chunk (splices move with their tokens)."""
        tail = Chunk(self.tokens[at:], self.weights[at:], [(o - at, p) for o, p in self.splices if o >= at])
        del self.tokens[at:], self.weights[at:]
        self.splices = [(o, p) for o, p in self.splices if o < at]
        return tail


class _Chunker:
    """A1111's ``tokenize_line`` loop, over our pieces."""

    def __init__(self, comma: int | None, window: int) -> None:
        self.comma = comma
        self.window = window
        self.chunks: list[Chunk] = []
        self.chunk = Chunk()
        self.count = 0
        self.last_comma = -1

    def close(self, last: bool = False) -> None:
        self.count += len(self.chunk) if last else CHUNK
        self.chunks.append(self.chunk)
        self.chunk = Chunk()
        self.last_comma = -1

    def _before_token(self, token: int) -> None:
        """What happens before a token (or an embedding, whose name starts with no comma) is appended."""
        chunk = self.chunk
        if token == self.comma:
            self.last_comma = len(chunk)
        elif (
            self.window
            and len(chunk) == CHUNK
            and self.last_comma != -1
            and len(chunk) - self.last_comma <= self.window
        ):
            tail = chunk.split_at(self.last_comma + 1)
            self.close()
            self.chunk = tail
        if len(self.chunk) == CHUNK:
            self.close()

    def add_tokens(self, tokens: tuple[int, ...], weight: float) -> None:
        for token in tokens:
            self._before_token(token)
            self.chunk.tokens.append(token)
            self.chunk.weights.append(weight)

    def add_embedding(self, piece: EmbeddingPiece) -> None:
        n = piece.embedding.num_vectors
        if n > CHUNK:
            raise PromptError(f"{piece.written} has {n} vectors; a CLIP chunk holds at most {CHUNK}")
        self._before_token(-1)
        if len(self.chunk) + n > CHUNK:
            self.close()
        self.chunk.splices.append((len(self.chunk), piece))
        self.chunk.tokens += [PLACEHOLDER] * n
        self.chunk.weights += [piece.weight] * n

    def finish(self) -> list[Chunk]:
        if len(self.chunk) or not self.chunks:
            self.close(last=True)
        return self.chunks


def chunk_parsed(parsed: ParsedPrompt, tokenizer: Any, comma_window: int = 20) -> tuple[list[Chunk], int]:
    """Chunk a parsed prompt; return the chunks and the token count the budget shows."""
    cache = token_cache(tokenizer)
    chunker = _Chunker(cache.comma, max(0, int(comma_window)))
    for piece in parsed.pieces:
        if isinstance(piece, BreakPiece):
            chunker.close()
        elif isinstance(piece, EmbeddingPiece):
            chunker.add_embedding(piece)
        else:
            chunker.add_tokens(cache.piece_ids(piece.text), piece.weight)
    chunks = chunker.finish()
    return chunks, chunker.count


# --- the budget -----------------------------------------------------------------------------------------


def limit_for(count: int) -> int:
    """``75 * max(1, ceil(count / 75))``."""
    return CHUNK * max(1, -(-count // CHUNK))


@dataclass
class Budget:
    """What the toolbar and ``!tokens`` show for one prompt."""

    count: int
    limit: int
    chunks: int
    embeddings: list[str]
    bare: list[str]
    chunk_texts: list[str]

    def describe(self) -> dict[str, Any]:
        """JSON-safe: ``count``, ``limit``, ``chunks``, ``embeddings``, ``bare``, ``chunk_texts``."""
        return {
            "count": self.count,
            "limit": self.limit,
            "chunks": self.chunks,
            "embeddings": list(self.embeddings),
            "bare": list(self.bare),
            "chunk_texts": list(self.chunk_texts),
        }

    def label(self) -> str:
        """``count/limit``, e.g. ``12/75``."""
        return f"{self.count}/{self.limit}"


def chunk_text(chunk: Chunk, cache: TokenCache) -> str:
    """A chunk as readable text: its tokens decoded, embeddings as ``<name>``."""
    parts: list[str] = []
    pos = 0
    for offset, piece in chunk.splices:
        if offset > pos:
            parts.append(cache.decode(tuple(chunk.tokens[pos:offset])))
        parts.append(f"<{piece.name}>")
        pos = offset + piece.embedding.num_vectors
    if pos < len(chunk):
        parts.append(cache.decode(tuple(chunk.tokens[pos:])))
    return " ".join(p for p in parts if p)


def chunk_prompt(
    text: str, tokenizer: Any, lookup: EmbeddingLookup, options: PromptOptions | None = None
) -> tuple[list[Chunk], Budget]:
    """Parse and chunk ``text``: the chunks for the encoder and the budget for the user, from one pass."""
    options = options or PromptOptions()
    parsed = parse_prompt(text, lookup, bare_names=options.bare_names, emphasis=options.emphasis)
    chunks, count = chunk_parsed(parsed, tokenizer, options.comma_window)
    cache = token_cache(tokenizer)
    budget = Budget(
        count=count,
        limit=limit_for(count),
        chunks=len(chunks),
        embeddings=list(parsed.embeddings),
        bare=list(parsed.bare),
        chunk_texts=[chunk_text(c, cache) for c in chunks],
    )
    return chunks, budget


def count_tokens(
    text: str, tokenizer: Any, lookup: EmbeddingLookup, options: PromptOptions | None = None
) -> Budget:
    """The token budget of one prompt; raises :class:`PromptError` for an unknown ``<name>``."""
    return chunk_prompt(text, tokenizer, lookup, options)[1]


def prompt_budget(
    prompt: str, negative: str, tokenizer: Any, lookup: EmbeddingLookup, options: PromptOptions | None = None
) -> dict[str, Any]:
    """The JSON of ``!tokens``: the prompt's budget with the negative prompt's under ``"negative"``."""
    result = count_tokens(prompt, tokenizer, lookup, options).describe()
    result["negative"] = count_tokens(negative or "", tokenizer, lookup, options).describe()
    return result


def embeddings_in(chunks: list[Chunk]) -> list[Embedding]:
    """The distinct embeddings spliced into ``chunks``, in order."""
    seen: dict[str, Embedding] = {}
    for chunk in chunks:
        for _, piece in chunk.splices:
            seen.setdefault(piece.embedding.qualified, piece.embedding)
    return list(seen.values())
