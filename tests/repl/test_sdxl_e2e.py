"""SDXL from the user's side: ``echo "a photo of <pair-emb> --steps 2" | sdrepl --model tiny-sdxl``.

The session starts its own daemon (as a user's first ``sdrepl`` does) on ``tiny-sdxl``, with an SDXL
embedding pair and files an SDXL model must skip in the embeddings folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from daemon_testing import short_dir
from lora_files import lowrank
from PIL import Image
from safetensors.torch import save_file

from sdrepl.config import Settings

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def sdxl_kohya_file(path: Path, pipe) -> None:
    """A kohya SDXL LoRA (``lora_unet_`` / ``lora_te1_`` / ``lora_te2_``) for the attention projections."""
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for prefix, root in (("lora_unet_", pipe.unet), ("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)):
        for name, module in root.named_modules():
            if isinstance(module, torch.nn.Linear) and (".attn" in name or "self_attn" in name):
                down, up = lowrank(tuple(module.weight.shape), 4, gen, std=0.1)
                key = prefix + name.removeprefix("text_model.").replace(".", "_")
                tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
    save_file(tensors, str(path))


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                "XDG_STATE_HOME": str(root / "state")})
    for name in [k for k in env if k.startswith("SDREPL_") and k not in ("SDREPL_SHARED", "SDREPL_CACHE_DIR")]:
        del env[name]
    return env


@pytest.fixture(scope="module")
def xl_session():
    root = short_dir("sdx-")
    emb = root / "embeddings"
    emb.mkdir()
    gen = torch.Generator().manual_seed(7)
    save_file({"clip_l": torch.randn(2, 768, generator=gen) * 0.02, "clip_g": torch.randn(2, 1280, generator=gen) * 0.02},
              str(emb / "pair-emb.safetensors"))
    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(3, 1280)}, str(emb / "uneven.safetensors"))
    torch.save({"string_to_param": {"*": torch.zeros(1, 768)}, "name": "sd1-style"}, emb / "sd1-style.pt")
    loras = root / "loras"
    loras.mkdir()
    from sdrepl.core.models import load_model

    sdxl_kohya_file(loras / "xl-net.safetensors", load_model("tiny-sdxl", device="cpu", dtype="fp32").pipe)
    settings = Settings(socket=root / "d.sock", model="tiny-sdxl", embeddings=[emb], outputs=root / "outputs",
                        device="cpu", dtype="fp32", loras=[loras])
    session = {"root": root, "options": settings.daemon_args(), "env": _env(root), "settings": settings}
    try:
        yield session
    finally:
        subprocess.run([sys.executable, "-m", "sdrepl", "stop", "--socket", str(settings.socket)],
                       env=session["env"], capture_output=True, timeout=60)
        lock = settings.socket.with_name(settings.socket.name + ".lock")
        try:  # the daemon the session started, if stop could not reach it
            pid = int(lock.read_text().strip())
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass
        shutil.rmtree(root, ignore_errors=True)


def sdrepl(session: dict, *args: str, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdrepl", *session["options"], *args], input=stdin, text=True,
                          capture_output=True, cwd=session["root"], env=session["env"], timeout=300)


def test_a_piped_sdxl_prompt_with_a_pair_writes_a_png_with_a1111_metadata(xl_session):
    line = "a photo of <pair-emb> --steps 2 --seed 11\n"
    first = sdrepl(xl_session, "--json", stdin=line)
    assert first.returncode == 0, first.stderr + first.stdout
    second = sdrepl(xl_session, "--json", stdin=line)
    assert second.returncode == 0, second.stderr
    paths = [Path(json.loads(done.stdout)["images"][0]["path"]) for done in (first, second)]
    result = json.loads(first.stdout)
    assert result["tokens"]["count"] == 5 and result["tokens"]["embeddings"] == ["pair-emb"]
    image = Image.open(paths[0])
    assert image.size == (64, 64)  # tiny-sdxl's native size
    text = image.info["parameters"]
    assert text.startswith("a photo of <pair-emb>\n")
    assert "Steps: 2, Sampler: Euler a" in text and "Seed: 11, Size: 64x64" in text
    assert "Model: tiny-sdxl" in text and 'TI hashes: "pair-emb: ' in text
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(paths[1])))  # same prompt, same picture


def test_an_sdxl_session_lists_pairs_and_skips_what_does_not_fit(xl_session):
    done = sdrepl(xl_session, "--json", stdin="!embeddings\n!show pair-emb\n!tokens <pair-emb>, a cat --neg <pair-emb>\n"
                                          "!convert pair-emb --to pt\n!convert pair-emb --to diffusers\n")
    results = [json.loads(line) for line in done.stdout.splitlines()]
    listing, show, tokens, to_pt, to_diffusers = results
    (loaded,) = listing["embeddings"]
    assert loaded["name"] == "pair-emb" and loaded["vectors"] == 2
    reasons = {Path(s["path"]).name: s["reason"] for s in listing["skipped"]}
    assert "clip_l has 2 vectors but clip_g has 3" in reasons["uneven.safetensors"]
    assert "skipped, as A1111 does" in reasons["sd1-style.pt"]
    assert show["ok"] and set(show["embedding"]["norms"]) == {"clip_l", "clip_g"}
    assert tokens["tokens"]["count"] == 5 and tokens["tokens"]["negative"]["count"] == 2
    assert to_pt["ok"] and Path(to_pt["path"]).suffix == ".pt"
    assert not to_diffusers["ok"] and "clip_l" in to_diffusers["error"]["message"]


def test_an_sdxl_lora_in_a_prompt(xl_session):
    done = sdrepl(xl_session, "--json", stdin="a photo of a cat <lora:xl-net:0.8> --steps 2 --seed 11\n"
                                          "a photo of a cat --steps 2 --seed 11\n")
    with_lora, without = (json.loads(line) for line in done.stdout.splitlines())
    assert with_lora["ok"] and without["ok"], done.stdout
    assert with_lora["loras"] == [{"name": "xl-net", "te": 0.8, "unet": 0.8}]
    image = Image.open(with_lora["images"][0]["path"])
    assert "Lora hashes: " in image.info["parameters"] and "xl-net: " in image.info["parameters"]
    assert not np.array_equal(np.asarray(image), np.asarray(Image.open(without["images"][0]["path"])))
