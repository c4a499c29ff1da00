"""Hostile clients and hostile file names against a real daemon: every line gets a reply or a documented close.

Each test is one attack of issue 10: a line of 100,000 ``[``, lone surrogates in an id and in a prompt,
a file name that is not UTF-8 (listed, escaped reversibly, events still flowing), and a client that
sends but never reads (its unread output is bounded; in-process, with small limits, so it is fast).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
from daemon_testing import DaemonProcess, EventLog, raw_exchange, run

from sdrepl.daemon.client import request_sync

pytestmark = pytest.mark.e2e



def test_deeply_nested_line_gets_bad_request_and_the_connection_stays(daemon: DaemonProcess) -> None:
    bomb, ping = b"[" * 100_000, b'{"id": "after", "type": "ping"}'
    first, second = raw_exchange(daemon.socket, [bomb, ping], 2)
    assert first["id"] is None and first["error"]["type"] == "BadRequest"
    assert "too deeply" in first["error"]["message"]
    assert second == {"id": "after", "type": "reply", "ok": True, "result": {}}


def test_lone_surrogate_in_an_id_is_bad_request(daemon: DaemonProcess) -> None:
    first, second = raw_exchange(daemon.socket, [b'{"id": "a\\ud800", "type": "ping"}', b'{"id": 2, "type": "ping"}'], 2)
    assert first["id"] is None and first["error"]["type"] == "BadRequest"
    assert "lone surrogate" in first["error"]["message"]
    assert second["id"] == 2 and second["ok"]


@pytest.mark.parametrize("request_type", ["tokens", "generate"])
def test_lone_surrogate_in_a_prompt_is_bad_request(daemon: DaemonProcess, request_type: str) -> None:
    line = json.dumps({"id": "s", "type": request_type, "prompt": "a cat \udcff"}).encode()
    [reply] = raw_exchange(daemon.socket, [line], 1)
    assert reply["id"] == "s" and reply["error"]["type"] == "BadRequest", reply
    assert "'prompt' holds a lone surrogate" in reply["error"]["message"]


def test_a_file_name_that_is_not_utf8_is_listed_escaped_and_events_keep_flowing(daemon: DaemonProcess,
                                                                                 A1111: Path) -> None:
    raw_name = b"bad\xffname.pt"
    target = os.fsencode(daemon.embeddings) + b"/" + raw_name

    async def scenario() -> None:
        async with daemon.client(client="watcher") as c:
            events = EventLog(c)
            shutil.copy(A1111 / "bad-artist.pt", target)
            await events.wait_for(lambda e: e.get("event") == "embeddings"
                                  and "bad\udcffname" in e["change"]["added"])
            listing = await c.request("embeddings")
            [entry] = [e for e in listing["embeddings"] if e["name"] == "bad\udcffname"]
            assert os.fsencode(entry["path"]) == target  # reversible: the real bytes come back
            shown = await c.request("show", name="bad\udcffname")
            assert shown["vectors"] == entry["vectors"]
            mark = events.mark()
            shutil.copy(A1111 / "bad-artist.pt", daemon.embeddings / "after-bad-name.pt")
            await events.wait_for(lambda e: e.get("event") == "embeddings"
                                  and "after-bad-name" in e["change"]["added"], start=mark)

    try:
        run(scenario(), timeout=60)
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with raw:  # on the wire: one valid JSON line, the byte as the escape \udcff
            raw.settimeout(10)
            raw.connect(str(daemon.socket))
            raw.sendall(b'{"id": 1, "type": "embeddings"}\n')
            data = b""
            while not data.endswith(b"\n"):
                data += raw.recv(1 << 16)
        assert b"bad\\udcffname" in data
        data.decode("utf-8")  # valid UTF-8 (ASCII, in fact)
        assert request_sync(daemon.socket, "embeddings")["version"] >= 1
    finally:
        for path in (target, os.fsencode(daemon.embeddings / "after-bad-name.pt")):
            if os.path.exists(path):
                os.unlink(path)


def test_a_client_that_never_reads_is_disconnected_and_memory_stays_bounded(monkeypatch) -> None:
    """In-process server with small limits: 400 requests whose replies are never read."""
    from sdrepl.config import Settings
    from sdrepl.daemon import server as server_mod
    from sdrepl.daemon.context import DaemonContext
    from sdrepl.daemon.registry import HANDLERS, handler
    from sdrepl.daemon.server import DaemonServer
    from sdrepl.daemon.worker import DeviceWorker

    limit = 256 * 1024
    monkeypatch.setattr(server_mod, "OUTPUT_LIMIT", limit, raising=False)
    monkeypatch.setattr(server_mod, "PAUSE_READING", 64 * 1024, raising=False)
    monkeypatch.setattr(server_mod, "EVENT_BACKLOG_LIMIT", 64 * 1024)
    big = "x" * 32 * 1024

    @handler("_test_big")
    async def big_reply(ctx, params, req):
        return {"blob": big}

    folder = Path(tempfile.mkdtemp(prefix="sdu-", dir="/tmp"))
    sock = folder / "u.sock"
    peak = 0

    async def scenario() -> None:
        nonlocal peak
        ctx = DaemonContext(Settings(socket=sock), library=None, worker=DeviceWorker(),  # type: ignore[arg-type]
                            loop=asyncio.get_running_loop())
        server = DaemonServer(ctx)
        await server.listen(sock)
        import sdrepl.daemon.handlers  # noqa: F401  (ping)

        reader, writer = await asyncio.open_unix_connection(str(sock))
        writer.transport.pause_reading()  # this client never reads
        writer.write(b"".join(b'{"id": %d, "type": "_test_big"}\n' % i for i in range(400)))
        await writer.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while server.connections and loop.time() < deadline:
            for conn in server.connections:
                peak = max(peak, conn.writer.transport.get_write_buffer_size())
            await asyncio.sleep(0.01)
        assert not server.connections, "the slow reader was never disconnected"
        r2, w2 = await asyncio.open_unix_connection(str(sock))  # the daemon still serves others
        w2.write(b'{"id": 1, "type": "ping"}\n')
        assert json.loads(await asyncio.wait_for(r2.readline(), 5))["ok"] is True
        w2.close()
        writer.close()
        server.stop_accepting()
        await server.close_connections()

    try:
        asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        HANDLERS.pop("_test_big", None)
        shutil.rmtree(folder, ignore_errors=True)
    assert peak <= limit + 64 * 1024, peak  # the limit plus one reply
