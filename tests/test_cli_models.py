"""Bad ``--model`` / ``--device`` input fails before the daemon does anything: one clear line, exit 2.

Each case runs twice: at the unit level (``load_model`` raises ModelError/DeviceError with a one-line
message naming what was given and what was expected), and as a user runs it
(``python -m sdrepl serve --model X --socket ...``: exit status 2, one ``sdrepl:`` line, no traceback).
The subprocesses start together, so the cases cost about one interpreter start-up.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fixture_paths import A1111

from sdrepl.core.checkpoint_export import export_single_file, pipeline_to_ldm
from sdrepl.core.errors import DeviceError, ModelError, SamplerError
from sdrepl.core.models import load_model
from sdrepl.core.samplers import make_scheduler, sampler_names

EMBEDDING = A1111 / "EasyNegative.safetensors"
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING) ")


@dataclass(frozen=True)
class Case:
    """One bad input: how to make it under a folder, the options it gives, and what the error must say."""

    make: Callable[[Path, object], list[str]]
    expected: tuple[str, ...]
    error: type = ModelError


def random_bytes(name: str) -> Callable[[Path, object], list[str]]:
    def make(base: Path, _tiny) -> list[str]:
        (base / name).write_bytes(random.Random(name).randbytes(4096))
        return ["--model", str(base / name)]
    return make


def folder_without_model(base: Path, _tiny) -> list[str]:
    (base / "notmodel").mkdir()
    (base / "notmodel" / "readme.txt").write_text("not a model")
    return ["--model", str(base / "notmodel")]


def truncated_checkpoint(base: Path, tiny_model) -> list[str]:
    whole = export_single_file(tiny_model, base / "whole.safetensors").read_bytes()
    (base / "half.safetensors").write_bytes(whole[: len(whole) // 2])
    return ["--model", str(base / "half.safetensors")]


def edited_checkpoint(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path, object], list[str]]:
    """The tiny model exported, then damaged by ``edit`` (wrong keys, shapes, missing parts)."""

    def make(base: Path, tiny_model) -> list[str]:
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in pipeline_to_ldm(tiny_model.pipe).items()}
        edit(state)
        save_file(state, base / "edited.safetensors")
        return ["--model", str(base / "edited.safetensors")]
    return make


def drop(prefix: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(state: dict[str, torch.Tensor]) -> None:
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
    return edit


def replace(key: str, value: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda state: state.__setitem__(key, value)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> list[str]:
    from safetensors.torch import save_file

    save_file(tensors, path)
    return ["--model", str(path)]


def embedding_as_model(base: Path, _tiny) -> list[str]:
    if not EMBEDDING.is_file():
        pytest.skip(f"shared fixture missing: {EMBEDDING}")
    return ["--model", str(EMBEDDING)]


#: The cases a user most often meets also run through ``sdrepl serve`` (each costs an interpreter start).
SERVED = ("missing-file", "folder-not-a-model", "random-safetensors", "truncated-checkpoint", "cuda-without-cuda")
CASES = {
    "missing-file": Case(lambda base, _: ["--model", str(base / "missing.safetensors")],
                         ("missing.safetensors", "no such file or folder", "expected")),
    "folder-not-a-model": Case(folder_without_model, ("notmodel", "not a diffusers model", "model_index.json")),
    "random-safetensors": Case(random_bytes("x.safetensors"), ("x.safetensors", "not a safetensors file", "expected")),
    "random-ckpt": Case(random_bytes("x.ckpt"), ("x.ckpt", "corrupt", "expected")),
    "truncated-checkpoint": Case(truncated_checkpoint, ("half.safetensors", "truncated")),
    "embedding-as-model": Case(embedding_as_model, ("EasyNegative.safetensors", "textual-inversion embedding")),
    "empty-file": Case(lambda base, _: [(base / "e.ckpt").write_bytes(b""), "--model", str(base / "e.ckpt")][1:],
                       ("e.ckpt", "empty", "expected")),
    "unknown-suffix": Case(random_bytes("m.gguf"), ("m.gguf", "unknown checkpoint type", ".safetensors or .ckpt")),
    "lora-as-model": Case(lambda base, _: save_tensors(base / "l.safetensors", {
        "lora_unet_down_blocks_0_attentions_0.lora_down.weight": torch.zeros(4, 8)}), ("l.safetensors", "LoRA")),
    "unet-only": Case(edited_checkpoint(drop("cond_stage_model.")), ("no text encoder", "expected a full")),
    "no-vae": Case(edited_checkpoint(drop("first_stage_model.")), ("an SD 1.x checkpoint without VAE weights",)),
    "missing-weight": Case(edited_checkpoint(drop("model.diffusion_model.out.2.")), ("lacks some UNet weights",)),
    "missing-text-weight": Case(edited_checkpoint(drop("cond_stage_model.transformer.text_model.final_layer_norm.")),
                                ("lacks 2 text encoder weights", "final_layer_norm")),
    "wrong-shape": Case(edited_checkpoint(replace("model.diffusion_model.out.2.weight", torch.zeros(4, 32, 1, 1))),
                        ("UNet weights do not fit", "edited.safetensors")),
    "inpainting": Case(edited_checkpoint(replace("model.diffusion_model.input_blocks.0.0.weight",
                                                 torch.zeros(32, 9, 3, 3))), ("9 input channels", "expected 4")),
    "unknown-size": Case(edited_checkpoint(replace("model.diffusion_model.input_blocks.0.0.weight",
                                                   torch.zeros(48, 4, 3, 3))), ("unknown size", "conv_in 48")),
    "cuda-without-cuda": Case(lambda base, _: ["--model", "tiny", "--device", "cuda"],
                              ("--device cuda", "no CUDA device", "--device cpu"), DeviceError),
}
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def params(names=tuple(CASES)):
    return [pytest.param(name, marks=no_cuda if name.startswith("cuda") else ()) for name in names]


def assert_one_clear_line(message: str, expected: tuple[str, ...]) -> None:
    assert "\n" not in message and len(message) < 400, message
    for text in expected:
        assert text in message, f"{text!r} not in {message!r}"


@pytest.mark.parametrize("name", params())
def test_load_model_says_what_is_wrong(name, tmp_path, tiny_model):
    case = CASES[name]
    args = case.make(tmp_path, tiny_model)
    options = dict(zip(args[::2], args[1::2], strict=True))
    with pytest.raises(case.error) as info:
        load_model(options["--model"], device=options.get("--device", "cpu"), dtype="auto")
    assert_one_clear_line(str(info.value), case.expected)


class Payload:
    """A class a malicious pickle could name; it must never be constructed."""

    def __reduce__(self):
        return (print, ("this must not run",))


def test_pickle_with_code_is_refused(tmp_path):
    torch.save({"state_dict": {"w": Payload()}}, tmp_path / "evil.ckpt")
    with pytest.raises(ModelError) as info:
        load_model(str(tmp_path / "evil.ckpt"), device="cpu")
    assert_one_clear_line(str(info.value), ("evil.ckpt", "refused", "weights_only=True", "print"))


def test_unknown_sampler_lists_the_valid_ones(tiny_model):
    with pytest.raises(SamplerError) as info:
        make_scheduler("euler_z", tiny_model.pipe.scheduler.config)
    assert_one_clear_line(str(info.value), ("'euler_z'", *sampler_names()))


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model) -> dict[str, subprocess.CompletedProcess]:
    """Every case through ``python -m sdrepl serve``, all started at once."""
    base = tmp_path_factory.mktemp("serve")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SDREPL_CACHE_DIR": str(base / "cache"),
           "TOKENIZERS_PARALLELISM": "false"}
    running = {}
    for name in SERVED:
        case = CASES[name]
        if name.startswith("cuda") and torch.cuda.is_available():
            continue
        folder = base / name
        folder.mkdir()
        args = case.make(folder, tiny_model)
        command = [sys.executable, "-m", "sdrepl", "serve", *args, "--socket", str(folder / "s.sock")]
        running[name] = (subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          env=env, stdin=subprocess.DEVNULL), folder)
    results = {}
    for name, (proc, folder) in running.items():
        out, err = proc.communicate(timeout=180)
        results[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err), folder)
    return results


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("name", params(SERVED))
def test_serve_fails_with_one_line_and_status_2(name, served):
    result, folder = served[name]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("sdrepl: ")]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(errors) == 1, result.stderr
    assert all(line in errors or LOG_LINE.match(line) for line in lines), result.stderr
    assert_one_clear_line(errors[0], CASES[name].expected)
    assert not (folder / "s.sock").exists()
