"""A real daemon under load and abuse: concurrent clients, bad messages, killed clients, a soak, cancel."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_testing import DaemonProcess, EventLog, daemon_env, raw_exchange, run
from PIL import Image

from sdrepl.core.pnginfo import parse_parameters, read_png_parameters
from sdrepl.daemon.client import DaemonClient, RemoteError, request_sync

pytestmark = pytest.mark.e2e

TINY = {"width": 64, "height": 64, "steps": 2}


def pixels(path: str) -> bytes:
    with Image.open(path) as im:
        return im.convert("RGB").tobytes()


def test_two_clients_generate_at_once(daemon: DaemonProcess) -> None:
    async def scenario() -> None:
        async with daemon.client(client="a") as a, daemon.client(client="b") as b:
            ra, rb = await asyncio.gather(
                a.request("generate", prompt="a red house", seed=11, **TINY),
                b.request("generate", prompt="a blue boat <bad-hands-5>", seed=22, **TINY))
        assert ra["images"][0]["seed"] == 11 and rb["images"][0]["seed"] == 22
        assert ra["images"][0]["path"] != rb["images"][0]["path"]
        assert parse_parameters(read_png_parameters(ra["images"][0]["path"]))["prompt"] == "a red house"
        assert parse_parameters(read_png_parameters(rb["images"][0]["path"]))["prompt"] == "a blue boat <bad-hands-5>"
        assert rb["tokens"]["embeddings"] == ["bad-hands-5"]

    run(scenario())



def test_bad_messages_get_error_replies_and_the_daemon_stays_up(daemon: DaemonProcess) -> None:
    lines = [
        b"{nope",
        b"[1, 2]",
        b'{"type": "ping"}',
        b'{"id": 1.5, "type": "ping"}',
        b'{"id": "u", "type": "frobnicate"}',
        b'{"id": "p", "type": "generate", "prompt": 3}',
        b'{"id": "w", "type": "generate", "prompt": "x", "width": 65}',
        b'{"id": "s", "type": "generate", "prompt": "x", "sampler": "Euler z"}',
        b'{"id": "e", "type": "tokens", "prompt": "a <no-such-thing>"}',
        b'{"id": "g", "type": "generate", "prompt": "x", "negative": "<bad-handz-5>"}',
        b'{"id": "t", "type": "tokens", "prompt": "x", "typo": 1}',
        b'{"id": "ok", "type": "ping"}',
    ]
    replies = raw_exchange(daemon.socket, lines, len(lines))
    by_id: dict = {}
    nulls = []
    for reply in replies:
        (nulls.append(reply) if reply["id"] is None else by_id.setdefault(reply["id"], reply))
    assert len(nulls) == 4 and all(r["error"]["type"] == "BadRequest" for r in nulls)
    assert {r["error"]["message"].split(";")[0] for r in nulls} >= {"a request has no \"id\""}

    def error(rid: str) -> tuple[str, str]:
        assert by_id[rid]["ok"] is False, by_id[rid]
        return by_id[rid]["error"]["type"], by_id[rid]["error"]["message"]

    assert error("u")[0] == "UnknownRequest" and "generate" in error("u")[1]
    assert error("p") == ("BadRequest", "generate: parameter 'prompt' must be a string, got an integer (3)")
    assert error("w")[0] == "BadRequest" and "'width' must be a multiple of 8" in error("w")[1]
    assert error("s")[0] == "SamplerError" and "Euler a" in error("s")[1]
    assert error("e")[0] == "PromptError" and "<no-such-thing>" in error("e")[1]
    assert error("t")[0] == "BadRequest" and "'typo'" in error("t")[1]
    assert error("g")[0] == "PromptError" and "bad-hands-5" in error("g")[1]  # with a "did you mean"
    assert by_id["ok"] == {"id": "ok", "type": "reply", "ok": True, "result": {}}
    assert request_sync(daemon.socket, "ping") == {}


def test_overlong_line_and_duplicate_id(daemon: DaemonProcess) -> None:
    huge = b'{"id": 1, "type": "tokens", "prompt": "' + b"a" * (16 * 1024 * 1024 + 10) + b'"}'
    gen = b'{"id": "d", "type": "generate", "prompt": "x", "steps": 2, "width": 64, "height": 64}'
    replies = raw_exchange(daemon.socket, [huge, gen, gen, b'{"id": 2, "type": "ping"}'], 4)
    assert replies[0]["id"] is None and "longer than the protocol's" in replies[0]["error"]["message"]
    dup = [r for r in replies if r["id"] == "d"]
    assert sorted(r["ok"] for r in dup) == [False, True]
    assert "already in use" in next(r for r in dup if not r["ok"])["error"]["message"]
    assert any(r["id"] == 2 and r["ok"] for r in replies)


CLIENT_SCRIPT = """
import asyncio, sys
from pathlib import Path
from sdrepl.daemon.client import DaemonClient

async def main():
    c = await DaemonClient.connect(Path(sys.argv[1]), client="doomed")
    seen = asyncio.Event()
    c.add_event_listener(lambda e: e.get("event") == "progress" and seen.set())
    c.start("generate", prompt="long", steps=400, width=64, height=64, seed=1)
    c.start("generate", prompt="queued", steps=400, width=64, height=64, seed=2)
    await seen.wait()
    print("running", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_client_killed_mid_request_leaves_the_daemon_serving(daemon: DaemonProcess) -> None:
    proc = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, str(daemon.socket)], stdout=subprocess.PIPE,
                            env=daemon_env(), text=True)
    try:
        assert proc.stdout.readline().strip() == "running"
        status = request_sync(daemon.socket, "status")
        assert status["queue"] == {"pending": 1, "running": "generate"}
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # its running generation stops at the next step, the queued one is dropped
        if request_sync(daemon.socket, "status")["queue"] == {"pending": 0, "running": None}:
            break
        time.sleep(0.05)
    assert request_sync(daemon.socket, "status")["queue"] == {"pending": 0, "running": None}
    result = request_sync(daemon.socket, "generate", timeout=60, prompt="after", seed=3, **TINY)
    assert result["images"][0]["seed"] == 3


def test_cancel_a_running_generation(daemon: DaemonProcess) -> None:
    async def scenario() -> None:
        async with daemon.client() as c:
            events = EventLog(c)
            rid, future = c.start("generate", prompt="slow", steps=400, seed=1, width=64, height=64)
            await events.wait_for(lambda e: e["event"] == "progress" and e["request"] == rid, timeout=30)
            assert await c.cancel(rid) is True
            with pytest.raises(RemoteError) as info:
                await future
            assert info.value.type_name == "Cancelled"
            assert await c.cancel(rid) is False  # no longer in flight
            assert (await c.request("status"))["queue"]["running"] is None

    run(scenario())


def test_a_second_clients_queued_request_learns_its_position(daemon: DaemonProcess) -> None:
    """Protocol v2: a generate waiting behind another client's gets ``progress`` with ``queued``, then
    steps; its ``total_s`` includes the wait."""
    async def scenario() -> None:
        async with daemon.client(client="a") as a, daemon.client(client="b") as b:
            events_a, events_b = EventLog(a), EventLog(b)
            rid_a, slow = a.start("generate", prompt="slow", steps=400, seed=1, width=64, height=64)
            await events_a.wait_for(lambda e: e["event"] == "progress" and e["request"] == rid_a, timeout=30)
            rid_b, queued = b.start("generate", prompt="next", seed=2, **TINY)
            first = await events_b.wait_for(lambda e: e["event"] == "progress", timeout=30)
            assert first["request"] == rid_b and first["step"] == 0 and first["queued"] == 1
            await asyncio.sleep(0.3)
            assert await a.cancel(rid_a)
            with pytest.raises(RemoteError):
                await slow
            result = await queued
            assert result["queued_s"] >= 0.2 and result["total_s"] >= result["queued_s"]
            steps = [e for e in events_b.events if e["event"] == "progress" and e["step"]]
            assert steps[-1]["step"] == steps[-1]["total"] == 2 and "queued" not in steps[-1]

    run(scenario())


def test_a_client_names_its_own_outputs_folder(daemon: DaemonProcess, tmp_path: Path) -> None:
    """Protocol v2: ``generate`` ``outputs`` writes where the client asked, if it may write there."""
    async def scenario() -> None:
        async with daemon.client() as c:
            mine = tmp_path / "my outputs"
            result = await c.request("generate", prompt="a cat", seed=3, outputs=str(mine), **TINY)
            assert Path(result["images"][0]["path"]).parent.parent == mine
            for bad, fragment in ((str(daemon.embeddings / "pics"), "inside the watched folder"),
                                  ("relative/out", "absolute path"), ("/proc/sdrepl-no", "cannot")):
                with pytest.raises(RemoteError) as info:
                    await c.request("generate", prompt="a cat", outputs=bad, **TINY)
                assert info.value.type_name == "BadRequest" and fragment in info.value.message

    run(scenario())


def test_generation_metadata_seeds_and_numbering(daemon: DaemonProcess) -> None:
    async def scenario() -> None:
        async with daemon.client() as c:
            result = await c.request("generate", prompt="a cat, <bad-hands-5>", negative="EasyNegative",
                                     seed=5, n=2, cfg=6.5, sampler="dpmpp_2m", **TINY)
            single = await c.request("generate", prompt="a cat, <bad-hands-5>", negative="EasyNegative",
                                     seed=6, cfg=6.5, sampler="DPM++ 2M", **TINY)
            unset = await c.request("generate", prompt="x", **TINY)
            hands = await c.request("show", name="bad-hands-5")
            easy = await c.request("show", name="easynegative")
        first, second = (Path(i["path"]) for i in result["images"])
        assert [i["seed"] for i in result["images"]] == [5, 6]
        assert first.parent.parent == daemon.outputs and first.name.endswith("-5.png")
        assert int(second.name[:5]) == int(first.name[:5]) + 1 and len(first.name.split("-")[0]) == 5
        meta = parse_parameters(read_png_parameters(second))
        assert meta | {"model_hash": None} == {
            "prompt": "a cat, <bad-hands-5>", "negative": "EasyNegative", "steps": 2, "sampler": "DPM++ 2M",
            "cfg": 6.5, "seed": 6, "width": 64, "height": 64, "model_hash": None, "model": "tiny", "clip_skip": 1,
            "ti_hashes": {"bad-hands-5": hands["hash"], "EasyNegative": easy["hash"]}, "extra": {}}
        assert len(meta["model_hash"]) == 10
        assert pixels(second) == pixels(single["images"][0]["path"])  # picture i of a batch = seed+i alone
        assert unset["random_seed"] is True and unset["images"][0]["seed"] == unset["seed"]
        assert hands["sha256"].startswith(hands["hash"]) and len(hands["norms"]) == 2

    run(scenario())


def test_status_reports_the_daemon(daemon: DaemonProcess) -> None:
    status = request_sync(daemon.socket, "status")
    assert status["pid"] == daemon.proc.pid and status["state"] == "ready" and status["protocol"] == 2
    assert status["model"]["model"] == "tiny" and status["model"]["encoders"] == {"text_encoder": 768}
    assert status["memory"]["rss_mb"] > 0 and status["memory"]["cuda_allocated_mb"] is None
    assert status["embeddings"]["loaded"] >= 2 and status["embeddings"]["folders"] == [str(daemon.embeddings)]
    assert status["keep_alive_s"] is None and status["training"] is None


def test_soak_many_clients_nothing_lost_or_misrouted(daemon: DaemonProcess) -> None:
    """8 clients x 50 pipelined requests; every reply must be the answer to its own request."""
    clients, per_client = 8, 50

    def expected(i: int, j: int) -> tuple[str, dict, object]:
        k = (i * per_client + j) % 40 + 1
        if j in (7, 31):
            return "generate", {"prompt": f"soak {i} {j}", "seed": i * 1000 + j, **TINY}, i * 1000 + j
        kind = ("tokens", "ping", "embeddings", "tokens")[j % 4]
        if kind == "tokens":
            return kind, {"prompt": " ".join(["cat"] * k), "negative": " ".join(["dog"] * (k % 7))}, (k, k % 7)
        return kind, {}, None

    async def one_client(i: int) -> int:
        c = await DaemonClient.connect(daemon.socket, client=f"soak{i}")
        try:
            plan = [expected(i, j) for j in range(per_client)]
            started = [c.start(kind, **params) for kind, params, _ in plan]
            results = await asyncio.gather(*(future for _, future in started))
        finally:
            await c.close()
        assert len({rid for rid, _ in started}) == per_client
        for (kind, _, want), result in zip(plan, results, strict=True):
            if kind == "generate":
                assert result["images"][0]["seed"] == want
                assert parse_parameters(read_png_parameters(result["images"][0]["path"]))["seed"] == want
            elif kind == "tokens":
                assert (result["count"], result["negative"]["count"]) == want
            elif kind == "ping":
                assert result == {}
            else:
                assert "embeddings" in result and "version" in result
        return len(results)

    async def scenario() -> int:
        return sum(await asyncio.gather(*(one_client(i) for i in range(clients))))

    assert run(scenario(), timeout=180) == clients * per_client
    assert request_sync(daemon.socket, "status")["queue"] == {"pending": 0, "running": None}


def test_generations_run_in_the_order_they_were_sent(daemon: DaemonProcess) -> None:
    """The device queue is first come, first served (checks ran in a thread pool once reordered it)."""

    async def scenario() -> list:
        async with await DaemonClient.connect(daemon.socket) as c:
            events = EventLog(c)
            started = [c.start("generate", prompt=f"order {i} <bad-hands-5>", seed=i, **TINY) for i in range(6)]
            await asyncio.gather(*(future for _, future in started))
            firsts = []
            for event in events.events:
                if event["event"] == "progress" and event["step"] and event["request"] not in firsts:
                    firsts.append(event["request"])
            return [rid for rid, _ in started], firsts

    sent, ran = run(scenario())
    assert ran == sent
