"""A daemon listening on 127.0.0.1 with TLS and a secret (issue 16): real processes, loopback only.

A client with the connection file generates, lists embeddings, gets events and writes the picture into
its own outputs folder; a client without the secret, with a wrong one, with a wrong certificate, or
speaking plain TCP is refused before any request runs, and the daemon keeps serving the others.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_testing import DaemonProcess, EventLog, daemon_env, make_daemon, run, short_dir
from PIL import Image

from sdrepl.daemon import protocol
from sdrepl.daemon.auth import endpoint_from_file
from sdrepl.daemon.client import DaemonClient, DaemonUnavailable, RemoteError, request_sync
from sdrepl.daemon.tls import client_context

GEN = {"prompt": "a red cube", "steps": 2, "width": 64, "height": 64, "seed": 11}



@pytest.fixture(scope="module")
def remote(fixtures_dir: Path) -> Iterator[DaemonProcess]:
    root = short_dir()
    proc = make_daemon(root, extra_args=["--listen", "127.0.0.1:0", "--max-queue", "1"])
    shutil.copy(fixtures_dir / "a1111" / "EasyNegative.safetensors", proc.embeddings)
    try:
        proc.start(cwd=root)  # where default training logs go
        proc.wait_remote()
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(root, ignore_errors=True)


def endpoint(proc: DaemonProcess):
    return endpoint_from_file(proc.settings.remote_connection_file)


def still_serves(proc: DaemonProcess) -> None:
    """The daemon answers a good remote client (and its Unix socket) after a refusal."""
    assert request_sync(endpoint(proc), "status", timeout=10.0)["pid"] == proc.proc.pid
    assert request_sync(proc.socket, "ping", timeout=5.0) == {}


def test_connection_file_is_private_and_pins_the_certificate(remote: DaemonProcess) -> None:
    path = remote.settings.remote_connection_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = json.loads(path.read_text())
    assert data["host"] == "127.0.0.1" and data["port"] > 0 and data["transport"] == "tls"
    assert data["fingerprint"].startswith("sha256:") and len(data["key"]) >= 32
    assert f"--connect {path}" in remote.log()  # serve says where the file is


def test_remote_client_generates_lists_and_gets_events(remote: DaemonProcess, A1111: Path) -> None:
    async def scenario() -> None:
        client = await DaemonClient.connect(endpoint(remote), timeout=10.0)
        try:
            events = EventLog(client)
            assert client.remote
            listing = await client.request("embeddings")
            assert "EasyNegative" in [e["name"] for e in listing["embeddings"]]
            request_id, future = client.start("generate", **GEN)
            result = await future
            await events.wait_for(lambda e: e.get("event") == "progress" and e.get("request") == request_id)
            status = await client.request("status")
            assert status["remote_client"] is True and status["outputs"] == str(remote.outputs)
            assert status["listen"] and status["listen"][0].startswith("127.0.0.1:")
            shutil.copy(A1111 / "bad-hands-5.pt", remote.embeddings / "remote-added.pt")
            await events.wait_for(lambda e: e.get("event") == "embeddings", timeout=15.0)
        finally:
            await client.close()
        daemon_file = Path(result["images"][0]["path"])
        assert daemon_file.is_relative_to(remote.outputs) and daemon_file.exists()

    run(scenario())


def test_scripted_session_writes_the_picture_locally(remote: DaemonProcess, short_tmp: Path) -> None:
    """`sdrepl --connect FILE --json`: the picture lands in the client's own ./outputs, same name rule."""
    env = {k: v for k, v in daemon_env().items() if not k.startswith("SDREPL_")}
    lines = "a blue sphere --steps 2 --size 64x64 --seed 7\n!embeddings\n"
    proc = subprocess.run([sys.executable, "-m", "sdrepl", "--connect", str(remote.settings.remote_connection_file),
                           "--json", "--socket", str(short_tmp / "none.sock")], input=lines, capture_output=True,
                          text=True, timeout=120, cwd=short_tmp, env=env)
    assert proc.returncode == 0, proc.stderr
    first, second = (json.loads(line) for line in proc.stdout.splitlines())
    assert first["ok"] and second["ok"], proc.stdout
    image = first["images"][0]
    local = Path(image["path"])
    assert local.is_relative_to(short_tmp / "outputs") and local.name.endswith("-7.png")
    assert Path(image["daemon_path"]).is_relative_to(remote.outputs)
    assert local.read_bytes() == Path(image["daemon_path"]).read_bytes()
    with Image.open(local) as picture:
        assert picture.size == (64, 64) and "a blue sphere" in picture.info["parameters"]
    assert not (short_tmp / "none.sock").exists()  # no local daemon was started


def test_status_over_tls(remote: DaemonProcess) -> None:
    proc = subprocess.run([sys.executable, "-m", "sdrepl", "status", "--json", "--connect",
                           str(remote.settings.remote_connection_file)], capture_output=True, text=True,
                          timeout=60, env=daemon_env())
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["running"] and info["pid"] == remote.proc.pid and info["remote_client"] is True


def test_env_host_token_fingerprint(remote: DaemonProcess) -> None:
    ep = endpoint(remote)
    env = dict(daemon_env(), SDREPL_HOST=f"127.0.0.1:{ep.port}", SDREPL_TOKEN=ep.key, SDREPL_FINGERPRINT=ep.fingerprint)
    proc = subprocess.run([sys.executable, "-m", "sdrepl", "status", "--json"], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 0 and json.loads(proc.stdout)["remote_client"] is True, proc.stderr
    del env["SDREPL_FINGERPRINT"]
    proc = subprocess.run([sys.executable, "-m", "sdrepl", "status"], capture_output=True, text=True, timeout=60,
                          env=env)
    assert proc.returncode == 2 and "SDREPL_FINGERPRINT" in proc.stderr


def raw_tls(port: int) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return client_context().wrap_socket(raw, server_hostname="127.0.0.1")


def replies_then_closed(sock: ssl.SSLSocket | socket.socket, data: bytes) -> list[dict]:
    """Send ``data``, read until the daemon closes the connection (bounded by the socket timeout)."""
    sock.sendall(data)
    framer = protocol.LineFramer()
    messages: list[dict] = []
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            messages += [protocol.decode(line) for line in framer.feed(chunk) if line]
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        sock.close()
    return messages


@pytest.mark.parametrize("hello", [
    {"id": 1, "type": "hello", "protocol": 2},                                  # no secret
    {"id": 1, "type": "hello", "protocol": 2, "token": "not-the-key-" * 4},     # a wrong secret
    {"id": 1, "type": "shutdown"},                                               # a request before the hello
], ids=["no-secret", "wrong-secret", "request-first"])
def test_unauthenticated_clients_are_refused(remote: DaemonProcess, hello: dict) -> None:
    ep = endpoint(remote)
    messages = replies_then_closed(raw_tls(ep.port), protocol.encode(hello) + protocol.encode(
        {"id": 2, "type": "shutdown"}))
    assert [m["error"]["type"] for m in messages] == ["AuthFailed"], messages
    still_serves(remote)


def test_a_long_line_before_the_hello_is_refused(remote: DaemonProcess) -> None:
    """Before authentication a line may be 64 KiB: a longer one is skipped, refused, and the connection closed."""
    ep = endpoint(remote)
    line = protocol.encode({"id": 1, "type": "hello", "protocol": 2, "token": ep.key, "pad": "x" * 100_000})
    messages = replies_then_closed(raw_tls(ep.port), line)
    assert [m["error"]["type"] for m in messages] == ["BadRequest", "AuthFailed"], messages
    still_serves(remote)


def test_wrong_secret_through_the_client(remote: DaemonProcess) -> None:
    bad = dataclasses.replace(endpoint(remote), key="x" * 43)
    with pytest.raises(RemoteError) as info:
        request_sync(bad, "status", timeout=10.0)
    assert info.value.type_name == "AuthFailed"
    still_serves(remote)


def test_wrong_certificate_is_refused_before_the_secret_is_sent(remote: DaemonProcess) -> None:
    bad = dataclasses.replace(endpoint(remote), fingerprint="sha256:" + "ab" * 32)
    with pytest.raises(DaemonUnavailable, match="not the pinned"):
        request_sync(bad, "status", timeout=10.0)

    async def scenario() -> None:
        with pytest.raises(DaemonUnavailable, match="not the pinned"):
            await DaemonClient.connect(bad, timeout=10.0)

    run(scenario())
    still_serves(remote)


def test_plain_tcp_is_refused(remote: DaemonProcess) -> None:
    sock = socket.create_connection(("127.0.0.1", endpoint(remote).port), timeout=10)
    hello = protocol.encode({"id": 1, "type": "hello", "protocol": 2, "token": endpoint(remote).key})
    messages = replies_then_closed(sock, hello + protocol.encode({"id": 2, "type": "shutdown"}))
    assert messages == []
    still_serves(remote)


def test_daemon_paths_are_refused_for_remote_clients(remote: DaemonProcess, short_tmp: Path) -> None:
    async def scenario() -> None:
        async with _remote_client(remote) as client:
            for type_name, params in (("train", {"name": "x", "data": str(short_tmp)}),
                                      ("preprocess", {"src": str(short_tmp), "dst": str(short_tmp / "o")}),
                                      ("picture", {"path": "/etc/passwd"})):
                with pytest.raises(RemoteError) as info:
                    await client.request(type_name, **params)
                assert info.value.type_name in ("RemotePathRefused", "BadRequest")
                assert "daemon" in info.value.message

    run(scenario())


def test_queue_full_at_once_and_nothing_queued_lost(remote: DaemonProcess) -> None:
    """--max-queue 1: one running, one waiting (told its position), the third refused at once."""
    async def scenario() -> None:
        async with _remote_client(remote) as client:
            events = EventLog(client)
            first = client.start("generate", **{**GEN, "steps": 12, "seed": 1})
            second = client.start("generate", **{**GEN, "seed": 2})
            refused_at = time.monotonic()
            with pytest.raises(RemoteError) as info:
                await client.request("generate", **{**GEN, "seed": 3})
            assert info.value.type_name == "QueueFull" and "--max-queue 1" in info.value.message
            assert time.monotonic() - refused_at < 5.0
            results = [await first[1], await second[1]]
            assert [r["seed"] for r in results] == [1, 2]
            assert all(Path(r["images"][0]["path"]).exists() for r in results)
            await events.wait_for(lambda e: e.get("event") == "progress" and e.get("request") == second[0]
                                  and e.get("queued") == 1)
            again = await client.request("generate", **{**GEN, "seed": 4})  # the bound frees again
            assert again["seed"] == 4

    run(scenario())


def test_train_data_is_uploaded_from_a_remote_client(remote: DaemonProcess, short_tmp: Path) -> None:
    """`!train NAME --data DIR` over TLS sends the local folder and trains on it; a daemon path is refused."""
    data = short_tmp / "pictures"
    data.mkdir()
    for i, color in enumerate([(230, 30, 30), (30, 200, 60), (40, 60, 230)]):
        Image.new("RGB", (64, 64), color).save(data / f"{i:03d}-a square.png")
        (data / f"{i:03d}-a square.txt").write_text("a red square")
    (data / ".hidden.png").write_bytes(b"not sent")
    env = {k: v for k, v in daemon_env().items() if not k.startswith("SDREPL_")}
    lines = "!train uploaded --data pictures --steps 2 --wait\n!embeddings\n"
    proc = subprocess.run([sys.executable, "-m", "sdrepl", "--connect", str(remote.settings.remote_connection_file),
                           "--json", "--socket", str(short_tmp / "none.sock")], input=lines, capture_output=True,
                          text=True, timeout=300, cwd=short_tmp, env=env)
    first, second = (json.loads(line) for line in proc.stdout.splitlines())
    assert first["ok"], (first, proc.stderr, remote.log()[-2000:])
    assert Path(first["embedding"]["path"]).is_relative_to(remote.embeddings)
    assert first["job"]["device"] == "cpu"  # training says where it runs
    assert "uploaded" in [e["name"] for e in second["embeddings"]]

    async def scenario() -> None:
        async with _remote_client(remote) as client:
            with pytest.raises(RemoteError) as info:  # another connection's upload is not yours
                await client.request("train", name="x", data="upload:1", steps=2)
            assert info.value.type_name == "BadRequest" and "not an upload of this connection" in info.value.message
            begun = await client.request("upload_begin")
            for name in ("../escape.png", ".hidden.png", "a/b.png", "script.sh"):
                with pytest.raises(RemoteError):
                    await client.request("upload_chunk", upload=begun["upload"], name=name, data="", final=True)

    run(scenario())
    assert not list(short_tmp.parent.glob("escape.png"))


def test_push_lands_in_the_watched_folder_after_checking(remote: DaemonProcess, A1111: Path, short_tmp: Path) -> None:
    from sdrepl.repl.uploads import push_file

    shutil.copy(A1111 / "EasyNegative.safetensors", short_tmp / "pushed-neg.safetensors")
    (short_tmp / "broken.pt").write_bytes(b"PK\x03\x04 not a torch file")

    async def scenario() -> None:
        async with _remote_client(remote) as client:
            events = EventLog(client)
            reply = await push_file(client, short_tmp / "pushed-neg.safetensors", "embedding", False)
            assert Path(reply["path"]) == remote.embeddings / "pushed-neg.safetensors"
            await events.wait_for(lambda e: e.get("event") == "embeddings"
                                  and "pushed-neg" in e["change"]["added"], timeout=15.0)
            with pytest.raises(RemoteError, match="already exists"):  # never overwritten unasked
                await push_file(client, short_tmp / "pushed-neg.safetensors", "embedding", False)
            assert (await push_file(client, short_tmp / "pushed-neg.safetensors", "embedding", True))["overwritten"]
            with pytest.raises(RemoteError, match="not a usable embedding"):
                await push_file(client, short_tmp / "broken.pt", "embedding", False)

    run(scenario())
    assert not (remote.embeddings / "broken.pt").exists()
    env = {k: v for k, v in daemon_env().items() if not k.startswith("SDREPL_")}
    shutil.copy(A1111 / "EasyNegative.safetensors", short_tmp / "typed-push.safetensors")
    proc = subprocess.run([sys.executable, "-m", "sdrepl", "--connect", str(remote.settings.remote_connection_file),
                           "--json"], input="!push typed-push.safetensors\n", capture_output=True, text=True,
                          timeout=120, cwd=short_tmp, env=env)
    (line,) = (json.loads(text) for text in proc.stdout.splitlines())
    assert line["ok"] and (remote.embeddings / "typed-push.safetensors").exists(), (line, proc.stderr)


class _remote_client:
    def __init__(self, proc: DaemonProcess) -> None:
        self.proc = proc

    async def __aenter__(self) -> DaemonClient:
        self.client = await DaemonClient.connect(endpoint(self.proc), timeout=10.0)
        return self.client

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()


def test_listen_refuses_anything_weaker_than_tls(short_tmp: Path) -> None:
    for listen in ("tcp://0.0.0.0:7861", "tcp://127.0.0.1:7861"):
        proc = subprocess.run([sys.executable, "-m", "sdrepl", "serve", "--socket", str(short_tmp / "s.sock"),
                               "--listen", listen], capture_output=True, text=True, timeout=60, env=daemon_env())
        assert proc.returncode == 2 and "plain TCP" in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "sdrepl", "serve", "--socket", str(short_tmp / "s.sock"),
                           "--listen", "0.0.0.0:7861", "--tls-cert", str(short_tmp / "c.pem")],
                          capture_output=True, text=True, timeout=60, env=daemon_env())
    assert proc.returncode == 2 and "--tls-key" in proc.stderr, proc.stderr
    assert not (short_tmp / "s.sock").exists()


@pytest.mark.slow
def test_silent_tcp_client_is_disconnected(remote: DaemonProcess) -> None:
    """An unauthenticated connection that sends nothing is closed after the hello timeout."""
    sock = raw_tls(endpoint(remote).port)
    sock.settimeout(60)
    started = time.monotonic()
    try:
        assert sock.recv(100) == b""
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        sock.close()
    assert 8.0 <= time.monotonic() - started < 40.0
    still_serves(remote)


@pytest.mark.slow
def test_stop_over_tls_and_the_key_survives_a_restart(fixtures_dir: Path) -> None:
    """`sdrepl stop --connect FILE`; the file is copied to a laptop once: same key and certificate after."""
    root = short_dir()
    proc = make_daemon(root, extra_args=["--listen", "127.0.0.1:0"])
    try:
        proc.start()
        proc.wait_remote()
        out = subprocess.run([sys.executable, "-m", "sdrepl", "stop", "--connect",
                              str(proc.settings.remote_connection_file)], capture_output=True, text=True,
                             timeout=60, env=daemon_env())
        assert out.returncode == 0 and "stopped" in out.stdout, out.stderr
        assert proc.proc.wait(30) == 0
        before = json.loads(proc.settings.remote_connection_file.read_text())
        proc.start()
        proc.wait_remote()
        deadline = time.monotonic() + 30
        while json.loads(proc.settings.remote_connection_file.read_text())["pid"] != proc.proc.pid:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        after = json.loads(proc.settings.remote_connection_file.read_text())
        assert (after["key"], after["fingerprint"]) == (before["key"], before["fingerprint"])
        assert request_sync(endpoint(proc), "ping", timeout=10.0) == {}
    finally:
        proc.stop()
        shutil.rmtree(root, ignore_errors=True)
