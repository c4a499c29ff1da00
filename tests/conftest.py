"""Fixtures shared by every test folder: where the shared reference files are, and the tiny model.

The reference files (real embeddings, the CLIP tokenizer) live in ``../shared`` beside the checkout, as on
the developers' machines and in CI; ``SDREPL_SHARED`` points elsewhere when needed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SDREPL_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures" / "embeddings"
A1111 = FIXTURES / "a1111"
BIRB = FIXTURES / "diffusers" / "birb-style" / "learned_embeds.bin"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"the shared fixtures are missing: expected them at {FIXTURES} (set SDREPL_SHARED)")
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_model():
    """The built-in ``tiny`` model on the CPU in fp32, loaded once per test session. Do not mutate it."""
    from sdrepl.core.models import load_model

    return load_model("tiny", device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def tokenizer():
    from sdrepl.core.tiny import load_tokenizer

    return load_tokenizer()
