"""The REPL's LoRA surface: completion after <lora:, toolbar weights, events as notifications, !show lora:
parsing, and a scripted --json session against a real daemon (!loras shape, generation, !fetch)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_testing import make_daemon, short_dir
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document

from sdrepl.core.errors import UsageError
from sdrepl.repl.commands import parse_show
from sdrepl.repl.completion import make_completer
from sdrepl.repl.state import Budget, ReplState
from sdrepl.repl.toolbar import toolbar_text

LORAS = [{"name": "style", "rank": 8, "layout": "kohya", "base": "SD 1.x", "path": "/l/style.safetensors"},
         {"name": "stylish", "rank": 4, "layout": "lycoris", "base": "SD 1.x", "path": "/l/stylish.safetensors"}]


def _complete(text: str, after: str = ""):
    completer = make_completer(lambda: [{"name": "emb"}], get_networks=lambda: {"lora": LORAS, "hypernet": []})
    doc = Document(text + after, cursor_position=len(text))
    return list(completer.get_completions(doc, CompleteEvent(completion_requested=True)))


def test_completion_after_lora_tag_with_menu():
    found = _complete("a cat <lora:sty")
    assert [c.text for c in found] == ["style:1>", "stylish:1>"]
    assert found[0].display_meta_text == "rank 8 · kohya · SD 1.x · style.safetensors"
    assert [c.text for c in _complete("<lyco:stylis", ":0.5>")] == ["stylish"]
    assert _complete("<hypernet:sty") == []


def test_show_completes_lora_names():
    assert "lora:style" in [c.text for c in _complete("!show lora:s")]


def test_toolbar_lists_active_loras_and_weights():
    state = ReplState()
    state.set_budget(Budget("a <lora:style:0.8>", "", {"count": 2, "limit": 75, "negative": {"count": 0},
                                                       "loras": [{"name": "style", "te": 0.8, "unet": 0.8},
                                                                 {"name": "x", "te": 0.5, "unet": 1.0}]}))
    text = toolbar_text(state)
    assert "tokens 2/75" in text and "lora style:0.8 lora x:0.5/1" in text


def test_lora_events_become_notifications_and_completions():
    state = ReplState()
    lines = state.apply_event({"event": "loras", "change": {"added": ["new"], "removed": [], "updated": [],
                                                            "skipped": [{"path": "/l/bad.safetensors",
                                                                         "reason": "0 of 4 keys match"}]}})
    assert lines == ["LoRAs new: <lora:new>", "skipped bad.safetensors: 0 of 4 keys match"]
    assert [n["name"] for n in state.loras] == ["new"]
    state.apply_event({"event": "loras", "change": {"removed": ["new"]}})
    assert state.loras == []


def test_parse_show():
    assert parse_show("lora:style") == "lora:style"
    assert parse_show("<lora:folder/style>") == "lora:folder/style"
    assert parse_show("bad-hands-5") == "bad-hands-5"
    with pytest.raises(UsageError):
        parse_show("lora:")


@pytest.mark.e2e
@pytest.mark.slow
def test_scripted_json_session():
    from lora_files import kohya_file

    from sdrepl.core.tiny import build_tiny

    root = short_dir("sdl-")
    proc = make_daemon(root)
    (root / "loras").mkdir()
    kohya_file(root / "loras" / "one.safetensors", build_tiny("tiny"), seed=1)
    (root / "loras" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    try:
        proc.start(cwd=root)
        script = ("!loras\n!show lora:one\n!tokens a cat <lora:one:0.7>\n"
                  "a cat <lora:one:0.7> --steps 2 --size 64x64 --seed 3\na cat <lora:onne>\n!hypernetworks\n")
        done = subprocess.run([sys.executable, "-m", "sdrepl", *proc.settings.daemon_args(), "--json"], input=script,
                              text=True, capture_output=True, cwd=root, timeout=240)
        out = [json.loads(line) for line in done.stdout.splitlines()]
        assert len(out) == 6, done.stderr
        loras, show, tokens, gen, bad, hyper = out
        assert hyper["hypernetworks"] == [] and hyper["skipped"] == []
        assert [n["name"] for n in loras["loras"]] == ["one"]
        assert set(loras["loras"][0]) >= {"name", "path", "format", "rank", "base", "keys", "keys_matched", "hash"}
        assert [Path(s["path"]).name for s in loras["skipped"]] == ["broken.safetensors"]
        assert show["lora"]["rank"] == 4 and show["lora"]["groups"]
        assert tokens["tokens"]["loras"] == [{"name": "one", "te": 0.7, "unet": 0.7}]
        assert gen["loras"] == [{"name": "one", "te": 0.7, "unet": 0.7}]
        assert not bad["ok"] and "did you mean one" in bad["error"]["message"]
        image = gen["images"][0]["path"]
        fetched = subprocess.run([sys.executable, "-m", "sdrepl", *proc.settings.daemon_args(), "--json"],
                                 input=f"!fetch {image}\n", text=True, capture_output=True, cwd=root, timeout=120)
        line = json.loads(fetched.stdout.splitlines()[0])
        assert "<lora:one:0.7>" in json.dumps(line), line
    finally:
        proc.stop()
        shutil.rmtree(root, ignore_errors=True)
