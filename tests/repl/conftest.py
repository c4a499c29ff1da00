"""Fixtures of the REPL tests: a fake daemon client for unit tests, and a real daemon for end-to-end tests.

:class:`FakeClient` speaks the client API (``request``, ``start``, ``cancel``, ``add_event_listener``)
without a socket: it records every request and answers from a table of canned replies (a dict, an
exception to raise, or a callable of the parameters), so each test states exactly what the daemon says.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from daemon_testing import make_daemon, short_dir

from sdrepl.daemon.client import RemoteError
from sdrepl.daemon.generation import parse_job
from sdrepl.daemon.protocol import BadRequest

TOKENS = {"count": 5, "limit": 75, "chunks": 1, "embeddings": ["bad-hands-5"], "bare": [],
          "chunk_texts": ["a photo of <bad-hands-5>"],
          "negative": {"count": 0, "limit": 75, "chunks": 1, "embeddings": [], "bare": [], "chunk_texts": [""]}}


def generate_reply(params: dict[str, Any]) -> dict[str, Any]:
    """A picture per ``n``, after the daemon's own parameter validation (``core.limits``: one table)."""
    try:
        parse_job({k: v for k, v in params.items() if k != "outputs"})
    except BadRequest as exc:
        raise RemoteError("BadRequest", str(exc)) from None
    seed = 1234 if params.get("seed") is None else params["seed"]
    return {"images": [{"path": f"/out/2026-11-22/{i + 1:05d}-{seed + i}.png", "seed": seed + i}
                       for i in range(params.get("n", 1))],
            "tokens": TOKENS, "elapsed_s": 0.8}


DEFAULT_REPLIES: dict[str, Any] = {
    "generate": generate_reply,
    "tokens": lambda p: {**TOKENS, "prompt_seen": p["prompt"], "negative_seen": p["negative"]},
    "embeddings": {"embeddings": [
        {"name": "bad-hands-5", "qualified": "bad-hands-5", "vectors": 2, "width": 768, "format": "a1111-pt",
         "path": "/emb/bad-hands-5.pt", "hash": "0123456789abcdef", "step": 1419, "checkpoint": None,
         "init_text": None}],
        "skipped": [{"path": "/emb/sd2.pt", "reason": "width 1024 does not fit this model (768)"}],
        "warnings": ["two files are called x"], "version": 3},
    "show": lambda p: {"name": p["name"], "vectors": 2, "width": 768, "norms": [0.41, 0.39]},
    "status": {"pid": 1, "version": "0.1.0", "state": "ready", "uptime_s": 5.0,
               "model": {"model": "tiny", "family": "sd1", "device": "cpu", "dtype": "fp32",
                         "native_size": [64, 64]},
               "memory": {"rss_mb": 500.0}, "embeddings": {"loaded": 1, "skipped": 1},
               "queue": {"pending": 0, "running": None}, "training": None},
    "reload": {"change": {"added": ["cat"], "updated": [], "removed": [], "skipped": [], "unskipped": [],
                          "warnings": []}, "version": 4},
    "create": lambda p: {"embedding": {"name": p["name"], "vectors": p.get("vectors", 1)},
                         "path": f"/emb/{p['name']}.safetensors"},
    "convert": lambda p: {"path": f"/emb/{p['name']}.{p['to']}"},
    "preprocess": lambda p: {"written": 3, "skipped": [{"path": "x.txt", "reason": "not a picture"}],
                             "dst": p["dst"]},
    "train": lambda p: ({"job": {"name": p["name"], "state": "done", "step": 10, "total": 10},
                         "embedding": {"name": p["name"], "path": f"/emb/{p['name']}.safetensors", "steps": 10,
                                       "final_loss": 0.1}}
                        if p.get("wait") else {"job": {"name": p["name"], "state": "starting", "step": 0,
                                                       "total": 3000}}),
    "train_status": {"job": None},
    "train_pause": {"job": {"name": "cat", "state": "paused", "step": 5, "total": 10}},
    "train_resume": {"job": {"name": "cat", "state": "running", "step": 5, "total": 10}},
    "train_stop": {"job": {"name": "cat", "state": "stopping", "step": 5, "total": 10}},
}


class FakeClient:
    """Records ``(type, params)`` of every request; answers from ``replies`` (see the module docstring)."""

    def __init__(self, replies: dict[str, Any] | None = None) -> None:
        self.replies = {**DEFAULT_REPLIES, **(replies or {})}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.cancelled: list[int] = []
        self.listeners: list[Callable[[dict], None]] = []
        self._ids = 0

    def _answer(self, type_name: str, params: dict[str, Any]) -> Any:
        reply = self.replies.get(type_name)
        if reply is None:
            raise RemoteError("UnknownRequest", f"unknown request type {type_name!r}")
        if isinstance(reply, BaseException):
            raise reply
        return reply(params) if callable(reply) else reply

    def start(self, type_name: str, **params: Any) -> tuple[int, asyncio.Future]:
        self._ids += 1
        self.calls.append((type_name, params))
        future = asyncio.get_running_loop().create_future()
        try:
            future.set_result(self._answer(type_name, params))
        except BaseException as exc:
            future.set_exception(exc)
        return self._ids, future

    async def request(self, type_name: str, **params: Any) -> dict[str, Any]:
        _, future = self.start(type_name, **params)
        return await future

    async def cancel(self, request_id: int) -> bool:
        self.cancelled.append(request_id)
        return True

    def add_event_listener(self, callback: Callable[[dict], None]) -> None:
        self.listeners.append(callback)

    def emit(self, event: dict[str, Any]) -> None:
        for listener in self.listeners:
            listener(event)

    def types(self) -> list[str]:
        return [t for t, _ in self.calls]


@pytest.fixture
def fake() -> FakeClient:
    return FakeClient()


@pytest.fixture
def make_fake() -> Callable[..., FakeClient]:
    """``make_fake({"tokens": RemoteError(...)})``: a FakeClient with some replies replaced."""
    return FakeClient


# -- a real daemon, for the end-to-end tests ------------------------------------------------------------

@pytest.fixture
def repl(daemon):
    """The interactive REPL in a pty (``repl_testing.spawn_repl``) against the test module's own ``daemon``
    fixture (``repl_testing.repl_daemon``); the screen is logged to ``repl-screen.log`` for post-mortems."""
    from repl_testing import close_repl, spawn_repl

    child = spawn_repl(daemon.args, daemon.env, daemon.tmp, log=daemon.tmp / "repl-screen.log")
    try:
        yield child
    finally:
        close_repl(child)


def sdrepl_env(root: Path) -> dict[str, str]:
    """The environment of an ``sdrepl`` subprocess: offline, one thread, its logs under ``root``."""
    env = dict(os.environ)
    env.update({"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                "XDG_STATE_HOME": str(root / "state")})
    for name in [k for k in env if k.startswith("SDREPL_") and k != "SDREPL_SHARED"]:
        del env[name]
    return env


@pytest.fixture(scope="module")
def live_daemon(fixtures_dir):
    """A real ``sdrepl serve`` on ``tiny`` with three A1111 fixtures.

    Yields ``options`` (the shared CLI options that reach it), ``env``, ``root`` (the working folder),
    ``embeddings`` and ``outputs``.
    """
    root = short_dir("sdr-")  # short: Unix socket paths are limited to ~100 bytes
    proc = make_daemon(root)
    for name in ("bad-hands-5.pt", "EasyNegative.safetensors", "bad-prompt.pt"):
        shutil.copy(fixtures_dir / "a1111" / name, proc.embeddings / name)
    proc.env = sdrepl_env(root)
    try:
        proc.start(cwd=root)
        yield {"options": proc.settings.daemon_args(), "env": proc.env, "root": root,
               "embeddings": proc.embeddings, "outputs": proc.outputs}
    finally:
        proc.stop()
        shutil.rmtree(root, ignore_errors=True)
