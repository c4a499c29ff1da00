"""``!inspect`` end to end: a scripted ``--json`` session against a real daemon on ``tiny``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sdrepl.core.formats import read_embedding, write_embedding

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def sdrepl(live: dict, *args: str, stdin: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdrepl", *live["options"], *args], input=stdin, text=True,
                          capture_output=True, cwd=live["root"], env=live["env"], timeout=timeout)


def test_inspect_an_untrained_tree_embedding_and_a_log_folder(live_daemon):
    root = live_daemon["root"]
    done = sdrepl(live_daemon, "--json", stdin="!create treeish --init tree --vectors 2\n!inspect <treeish>\n")
    create, inspect = (json.loads(line) for line in done.stdout.splitlines())
    assert create["ok"] and inspect["ok"], done.stdout + done.stderr
    vectors = inspect["vectors"]
    assert len(vectors) == 2
    assert vectors[0]["nearest"][0] == {"token": "tree", "id": vectors[0]["nearest"][0]["id"], "cosine": 1.0}
    assert len(vectors[0]["nearest"]) == 5 and all(0 <= v["percentile"] <= 100 for v in vectors)
    assert inspect["similarity"][0][1] == 1.0 and inspect["vocabulary"]["tokens"] == 49408

    # a log folder as !train writes it: snapshots treeish-10 (tree) and treeish-20 (tree scaled x100: huge)
    tree = read_embedding(live_daemon["embeddings"] / "treeish.safetensors").vectors
    snaps = root / "log" / "embeddings"
    snaps.mkdir(parents=True)
    write_embedding(snaps / "treeish-10.safetensors", tree, name="treeish", step=10)
    write_embedding(snaps / "treeish-20.safetensors", {k: v * 100 for k, v in tree.items()}, name="treeish", step=20)
    (snaps / "treeish-30.safetensors").write_bytes(b"not a file")
    done = sdrepl(live_daemon, "--json", stdin="!inspect treeish --log log --top 2\n!inspect nosuch\n")
    logged, missing = (json.loads(line) for line in done.stdout.splitlines())
    assert logged["ok"], logged
    assert [len(v["nearest"]) for v in logged["vectors"]] == [2, 2]
    steps = logged["checkpoints"]
    assert [s["step"] for s in steps] == [10, 20]
    assert steps[0]["vectors"][0]["nearest"]["token"] == "tree" and not steps[0]["vectors"][0]["huge"]
    assert steps[1]["vectors"][0]["huge"] and steps[1]["vectors"][0]["cosine_to_previous"] == 1.0
    assert [s["path"].endswith("treeish-30.safetensors") for s in logged["skipped"]] == [True]
    assert not missing["ok"] and "nosuch" in missing["error"]["message"]

    text = sdrepl(live_daemon, stdin="!inspect treeish --log log\n")
    assert "vector 0: norm" in text.stdout and "nearest: tree 1.000" in text.stdout
    assert "step 20:" in text.stdout and "HUGE" in text.stdout and "\x1b" not in text.stdout
    assert torch.equal(read_embedding(snaps / "treeish-10.safetensors").vectors["text_encoder"], tree["text_encoder"])
