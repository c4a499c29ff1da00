"""``bench/gpu.py --dry-run``: the prepared device benchmark's pieces run on the CPU at tiny sizes and write
their JSON and markdown, so the device run (a later task with a GPU) does not fail on a typo."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a real daemon and two tiny trainers: ~30 s on 2 cores

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def gpu_bench():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["bench_gpu"]
    sys.path.remove(str(BENCH))


def test_generation_and_daemon_pieces_write_json_and_markdown(gpu_bench, tmp_path):
    plan = gpu_bench.Plan.make(dry=True)
    # A budget too small for compiling: the eager figures, the daemon round trip, and compile recorded as skipped.
    report = gpu_bench.run(plan, 3.0, tmp_path, ["sd15"])
    names = [r.name for r in report.rows]
    assert "diffusers eager, batch 1" in names and "sdrepl eager, batch 2" in names
    daemon = [r for r in report.rows if r.section == "daemon"]
    assert daemon and daemon[0].value is not None and daemon[0].value > 0, daemon
    assert any("skipped: time budget" in r.note for r in report.rows)
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["environment"]["dry_run"] is True and len(data["rows"]) == len(report.rows)
    table = (tmp_path / "gpu.md").read_text()
    assert "| SD 1.5 64px 2 steps fp32 | sdrepl eager, batch 1 |" in table


def test_training_piece_compares_with_the_diffusers_style_loop(gpu_bench, tmp_path):
    plan = dataclasses.replace(gpu_bench.Plan.make(dry=True), train_batches=(1,), train_steps=1)
    report = gpu_bench.Report(plan, 600.0)
    gpu_bench.training(report)
    (row,) = [r for r in report.rows if r.name == "steps/s, batch 1"]
    assert row.value > 0 and row.reference > 0 and row.ratio == pytest.approx(row.value / row.reference)


def test_without_cuda_and_without_dry_run_it_says_so(gpu_bench, capsys, monkeypatch):
    monkeypatch.setattr(gpu_bench.torch.cuda, "is_available", lambda: False)
    assert gpu_bench.main([]) == 0
    assert "--dry-run" in capsys.readouterr().out
