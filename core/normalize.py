"""Text normalisation before tokenization, as A1111's tokenizer stack does it.

A1111 tokenizes with transformers' slow ``CLIPTokenizer``, which (with ``ftfy`` installed, as it always is
there) runs ``ftfy.fix_text`` on each piece of text, then collapses whitespace runs to one space and
strips the ends. The fast tokenizer sdrepl loads does neither, so without this step a pasted prompt can
count and encode differently: full-width punctuation (``1girl，solo，smile``, common in Chinese and
Japanese prompts) would not be commas (and not take part in the comma backtrack), HTML entities
(``&amp;``) and typographic quotes or ligatures (``“”``, ``ﬁ``) would cost bytes-level tokens, and
control characters would be encoded.

:func:`normalize_text` is applied to each text piece inside :class:`sdrepl.core.budget.TokenCache`, the
one tokenization path of the budget, the conditioning and ``!create``'s init text; after the prompt
parser (full-width brackets are text, as in A1111, not emphasis).
"""

from __future__ import annotations

import functools
import re

import ftfy

#: Python's ``\s``, which is what the slow tokenizer's ``whitespace_clean`` collapses.
_SPACES = re.compile(r"\s+")


@functools.lru_cache(maxsize=4096)
def normalize_text(text: str) -> str:
    """``ftfy.fix_text`` (its default fixes), then whitespace runs -> one space, ends stripped."""
    # plain ASCII without entities or control characters has nothing for ftfy to fix: skip its cost
    plain = text.isascii() and "&" not in text and not _has_controls(text)
    return _SPACES.sub(" ", text if plain else ftfy.fix_text(text)).strip()


def _has_controls(text: str) -> bool:
    return any(ord(c) < 32 and c not in "\t\n\r" or ord(c) == 127 for c in text)
