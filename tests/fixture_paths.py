"""Where the reference files are: ``tests/fixtures`` in this repository (vendored from the shared
reference folder, see its README), or ``$SDREPL_SHARED/fixtures`` when that variable names another copy.
Test modules import these names (the root conftest puts this folder on ``sys.path``, since pytest runs in
importlib mode)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENDORED = REPO / "tests" / "fixtures"
SHARED = Path(os.environ["SDREPL_SHARED"]) if os.environ.get("SDREPL_SHARED") else None
ROOT = SHARED / "fixtures" if SHARED is not None else VENDORED
FIXTURES = ROOT / "embeddings"
LORA_FIXTURES = ROOT / "lora"
A1111 = FIXTURES / "a1111"
BIRB = FIXTURES / "diffusers" / "birb-style" / "learned_embeds.bin"
