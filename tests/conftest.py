"""Fixtures shared by every test folder: where the shared reference files are, and the tiny model.

The reference files (real embeddings and LoRAs) are vendored in ``tests/fixtures`` (see its README);
``SDREPL_SHARED`` points the suite at another copy of the shared folder when needed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # test modules import fixture_paths (importlib mode)

from fixture_paths import A1111, BIRB, FIXTURES  # noqa: E402,F401

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models are faster on one thread than on two threads fighting over two cores (and over the
# daemon processes the end-to-end tests start, which inherit this).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"the fixtures are missing: expected them at {FIXTURES} (tests/fixtures, or SDREPL_SHARED)")
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
