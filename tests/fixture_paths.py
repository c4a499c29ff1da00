"""Where the shared reference files are: ``../shared`` beside the checkout (as on the developers'
machines and in CI), or ``SDREPL_SHARED``. Test modules import these names (the root conftest puts this
folder on ``sys.path``, since pytest runs in importlib mode)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SDREPL_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures" / "embeddings"
A1111 = FIXTURES / "a1111"
BIRB = FIXTURES / "diffusers" / "birb-style" / "learned_embeds.bin"
