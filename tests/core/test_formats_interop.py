"""Interoperability: what sdrepl writes loads with diffusers' own ``load_textual_inversion``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdrepl.core.embedding import SINGLE
from sdrepl.core.formats import write_embedding

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_pipe():
    from sdrepl.core.models import load_model

    return load_model("tiny", device="cpu", dtype="fp32").pipe


def token_rows(pipe, token: str, count: int) -> torch.Tensor:
    """The text encoder's embedding rows of ``token`` and its diffusers continuation tokens ``token_1``..."""
    names = [token] + [f"{token}_{i}" for i in range(1, count)]
    ids = pipe.tokenizer.convert_tokens_to_ids(names)
    assert pipe.tokenizer.unk_token_id not in ids, f"tokens missing from the tokenizer: {names}"
    return pipe.text_encoder.get_input_embeddings().weight[ids].detach()


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_diffusers_output_loads_with_diffusers_without_naming_the_token(tiny_pipe, tmp_path: Path, suffix: str) -> None:
    name = f"sdrepl-interop{suffix.replace('.', '-')}"
    vectors = torch.randn(3, 768, generator=torch.Generator().manual_seed(5))
    path = write_embedding(tmp_path / f"concept{suffix}", {SINGLE: vectors}, "diffusers", name=name)
    tiny_pipe.load_textual_inversion(str(path))
    assert f"<{name}>" in tiny_pipe.tokenizer.get_vocab()
    assert torch.equal(token_rows(tiny_pipe, f"<{name}>", 3), vectors)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_a1111_and_emb_params_outputs_load_with_diffusers(tiny_pipe, tmp_path: Path, fmt: str) -> None:
    vectors = torch.randn(2, 768, generator=torch.Generator().manual_seed(6))
    path = write_embedding(tmp_path / f"style.{fmt}", {SINGLE: vectors}, fmt, name="style")
    token = f"<sdrepl-{fmt}>"
    tiny_pipe.load_textual_inversion(str(path), token=token)
    assert torch.equal(token_rows(tiny_pipe, token, 2), vectors)
