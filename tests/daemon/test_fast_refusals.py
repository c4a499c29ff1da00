"""Mistakes a user makes on the command line are answered before torch is imported (seconds saved).

Time-independent evidence: the refusal happens in a process that never imported torch, diffusers or
transformers (``sys.modules`` checked after ``main`` returned).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import sys
from sdrepl.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
print("RESULT", code, ",".join(heavy) or "none", flush=True)
"""


@pytest.mark.parametrize("extra", [[], ["--detach"]])
@pytest.mark.parametrize("model", ["/missing/model.safetensors", "./nope", "~/no-such-model.ckpt"])
def test_serve_with_a_missing_model_path_says_so_without_importing_torch(tmp_path: Path, model: str,
                                                                         extra: list[str]) -> None:
    sock = tmp_path / "d.sock"
    done = subprocess.run([sys.executable, "-c", PROBE, "serve", *extra, "--model", model, "--socket", str(sock)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.stdout.strip().splitlines()[-1] == "RESULT 2 none", done
    assert done.stderr.strip() == (f"sdrepl: --model {model}: no such file or folder; expected tiny, tiny-sd2, "
                                   "tiny-sdxl, a diffusers model folder, a .safetensors/.ckpt checkpoint, or a hub "
                                   "id such as stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert not sock.parent.joinpath("d.sock.log").exists()  # nothing was started


def test_the_loader_gives_the_same_answer(tmp_path: Path) -> None:
    from sdrepl.core.errors import ModelError
    from sdrepl.core.model_spec import check_model_path
    from sdrepl.core.models import load_model

    spec = str(tmp_path / "gone.safetensors")
    with pytest.raises(ModelError) as fast:
        check_model_path(spec)
    with pytest.raises(ModelError) as slow:
        load_model(spec, "cpu", "fp32")
    assert str(fast.value) == str(slow.value)
    check_model_path("tiny")
    check_model_path("stable-diffusion-v1-5/stable-diffusion-v1-5")  # a hub id is not a path


def test_convert_of_a_missing_file_says_so_without_importing_torch(tmp_path: Path) -> None:
    missing = tmp_path / "gone.pt"
    done = subprocess.run([sys.executable, "-c", PROBE, "convert", str(missing), "--to", "safetensors"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.stdout.strip().splitlines()[-1] == "RESULT 2 none", done
    assert done.stderr.strip() == f"sdrepl: {missing}: no such file"
