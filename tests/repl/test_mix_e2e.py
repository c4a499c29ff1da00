"""``!mix`` end to end: a scripted ``--json`` session against a real daemon on ``tiny``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sdrepl.core.embedding import SINGLE
from sdrepl.core.formats import read_embedding

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SCRIPT = """\
!mix same = 1*<bad-hands-5>
!mix both = <bad-hands-5> <EasyNegative>
!tokens <both>
!mix half = 0.5*<bad-hands-5> + 0.5*<bad-hands-5>[::-1]
!mix words = "red fox" <bad-hands-5>[1]
!mix same = 2*<bad-hands-5>
!mix same = 2*<bad-hands-5> --overwrite
!mix bad = 0.5*<bad-hands-5> + <EasyNegative>
!mix typo = 0.5*<bad-hands-5> +
a <words> cat --steps 2 --size 64x64
"""


def sdrepl(live: dict, *args: str, stdin: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdrepl", *live["options"], *args], input=stdin, text=True,
                          capture_output=True, cwd=live["root"], env=live["env"], timeout=timeout)


def test_mix_writes_usable_embeddings(live_daemon):
    folder = live_daemon["embeddings"]
    hands = read_embedding(folder / "bad-hands-5.pt").vectors[SINGLE]
    easy = read_embedding(folder / "EasyNegative.safetensors").vectors[SINGLE]
    done = sdrepl(live_daemon, "--json", stdin=SCRIPT)
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == 10, done.stdout + done.stderr
    same, both, tokens, half, words, refused, replaced, bad, typo, picture = rows
    assert same["ok"] and same["embedding"]["name"] == "same" and same["embedding"]["vectors"] == hands.shape[0]
    assert same["embedding"]["path"] == str(folder / "same.safetensors")
    assert both["embedding"]["vectors"] == hands.shape[0] + easy.shape[0]
    assert tokens["tokens"]["count"] == hands.shape[0] + easy.shape[0]
    assert half["ok"], half
    assert words["ok"], words
    assert half["ok"] and words["ok"] and words["embedding"]["vectors"] == 3  # red, fox, one vector
    assert not refused["ok"] and "--overwrite" in refused["error"]["message"]
    assert replaced["ok"]
    assert not bad["ok"] and "same number of vectors" in bad["error"]["message"]
    assert not typo["ok"] and "column" in typo["error"]["message"] and "expected" in typo["error"]["message"]
    assert picture["ok"] and picture["tokens"]["embeddings"] == ["words"], picture

    assert torch.equal(read_embedding(folder / "both.safetensors").vectors[SINGLE], torch.cat([hands, easy]))
    assert torch.equal(read_embedding(folder / "half.safetensors").vectors[SINGLE],
                       0.5 * hands + 0.5 * hands.flip(0))
    assert torch.equal(read_embedding(folder / "same.safetensors").vectors[SINGLE], 2 * hands)


def test_one_times_an_embedding_is_bit_identical_and_loads_in_diffusers(live_daemon):
    folder = live_daemon["embeddings"]
    done = sdrepl(live_daemon, "--json", stdin="!mix ident = 1*<EasyNegative>\n")
    assert json.loads(done.stdout)["ok"], done.stdout + done.stderr
    original = read_embedding(folder / "EasyNegative.safetensors").vectors[SINGLE]
    mixed = read_embedding(folder / "ident.safetensors").vectors[SINGLE]
    assert mixed.dtype == original.dtype and torch.equal(mixed, original)

    from sdrepl.core.models import load_model

    pipe = load_model("tiny", device="cpu", dtype="fp32").pipe
    pipe.load_textual_inversion(str(folder / "ident.safetensors"), token="<ident>")
    names = ["<ident>"] + [f"<ident>_{i}" for i in range(1, original.shape[0])]
    rows = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids(names)]
    assert torch.equal(rows.detach(), original)
