"""Values are checked where they are set (issue 11, item 9) and small CLI promises (item 10, 11).

Each test names the behaviour a user saw fail before: ``!set negative <nonesuch>`` accepted and every
later line failing, ``!tokens`` alone counting nothing silently, ``--keep-alive 500ms`` refused,
``sdrepl --help`` not naming the subcommands, ``sdrepl stop`` without a daemon failing, progress of a
second-order sampler ending at 7/4.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from sdrepl.config import parse_duration
from sdrepl.daemon.client import RemoteError
from sdrepl.repl.session import Session


def execute(session: Session, line: str):
    return asyncio.run(session.execute(line))


def unknown_name(params):
    if "<nonesuch>" in params["negative"]:
        raise RemoteError("PromptError", "tokens: no loaded embedding is called 'nonesuch'; did you mean bad-hands-5?")
    return {"count": 0, "limit": 75}


def test_set_negative_with_an_unknown_embedding_is_refused_when_set(make_fake):
    fake = make_fake({"tokens": unknown_name})
    session = Session(fake)
    result = execute(session, "!set negative blurry <nonesuch>")
    assert not result.ok and result.error["type"] == "UsageError"
    assert "nonesuch" in result.error["message"] and "unchanged" in result.error["message"]
    assert session.defaults.negative == ""
    assert execute(session, "!set negative blurry <bad-hands-5>").ok
    assert session.defaults.negative == "blurry <bad-hands-5>"


def test_set_negative_empty_needs_no_daemon(make_fake):
    fake = make_fake({"tokens": unknown_name})
    assert execute(Session(fake), '!set negative ""').ok
    assert "tokens" not in fake.types()


@pytest.mark.parametrize("line", ["!tokens", "!tokens   ", "!tokens --steps 3"])
def test_tokens_without_a_prompt_says_so(fake, line):
    result = execute(Session(fake), line)
    assert not result.ok and "needs a prompt" in result.error["message"]
    assert "tokens" not in fake.types()


def test_set_n_beyond_the_shared_limit_is_refused_when_set(fake):
    result = execute(Session(fake), "!set n 65")
    assert not result.ok and "from 1 to 64" in result.error["message"]
    assert execute(Session(fake), "!set n 30").ok


@pytest.mark.parametrize(("text", "seconds"), [("500ms", 0.5), ("1m30s", 90.0), ("2h", 7200.0), ("1s500ms", 1.5)])
def test_keep_alive_units(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


def _sdrepl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdrepl", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_the_subcommands():
    out = _sdrepl("--help")
    assert out.returncode == 0
    for name in ("serve", "status", "stop", "convert"):
        assert f"sdrepl {name} " in out.stdout


def test_stop_without_a_daemon_is_success(tmp_path):
    out = _sdrepl("stop", "--socket", str(tmp_path / "none.sock"))
    assert out.returncode == 0 and "no daemon running" in out.stdout


def test_model_switches_the_daemons_model_and_remembers_it(make_fake, tmp_path):
    from types import SimpleNamespace

    fake = make_fake({"model": lambda p: {"model": {"model": p["model"], "family": "sd2", "device": "cpu",
                                                    "dtype": "fp32", "native_size": 64},
                                          "embeddings": {"loaded": 0, "skipped": 3}}})
    fake.settings = SimpleNamespace(model="tiny")
    session = Session(fake, cwd=tmp_path)
    result = execute(session, "!model tiny-sd2")
    assert result.ok and fake.calls[-1] == ("model", {"model": "tiny-sd2"})
    assert result.text == "model switched: tiny-sd2 (sd2, cpu fp32, native 64px); embeddings 0 loaded, 3 skipped"
    assert fake.settings.model == "tiny-sd2"  # an auto-started daemon comes back with it
    (tmp_path / "m.safetensors").write_bytes(b"")
    execute(session, "!model m.safetensors")
    assert fake.calls[-1] == ("model", {"model": str(tmp_path / "m.safetensors")})  # paths: the user's folder
    shown = execute(session, "!model")
    assert shown.ok and shown.text.startswith("model tiny (sd1, cpu fp32")
