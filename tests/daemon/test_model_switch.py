"""``model`` (protocol v2, the REPL's ``!model``): switch the daemon's model; every client is told; a bad
model is refused as ``--model`` refuses it and the daemon keeps serving its model."""

from __future__ import annotations

import shutil

import pytest
from daemon_testing import EventLog, make_daemon, run, short_dir

from sdrepl.daemon.client import RemoteError

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def daemon(fixtures_dir):
    root = short_dir("sdr-ms-")
    proc = make_daemon(root)
    shutil.copy(fixtures_dir / "a1111" / "bad-hands-5.pt", proc.embeddings / "bad-hands-5.pt")
    try:
        yield proc.start(cwd=root)
    finally:
        proc.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_switch_the_model_and_every_client_is_told(daemon):
    async def scenario() -> None:
        async with daemon.client(client="a") as a, daemon.client(client="b") as b:
            seen = EventLog(b)
            reply = await a.request("model", model="tiny-sd2")
            assert reply["model"]["model"] == "tiny-sd2" and reply["model"]["encoders"] == {"text_encoder": 1024}
            assert reply["embeddings"] == {"loaded": 0, "skipped": 1}  # bad-hands-5 is SD 1.x (768 wide)
            loading = await seen.wait_for(lambda e: e["event"] == "model" and e["state"] == "unloading")
            assert "asked by client a" in loading["message"]
            ready = await seen.wait_for(lambda e: e["event"] == "model" and e["state"] == "ready")
            assert ready["model"]["model"] == "tiny-sd2"
            await seen.wait_for(lambda e: e["event"] == "embeddings" and "bad-hands-5" in e["change"]["removed"])
            result = await b.request("generate", prompt="a cat", steps=2, width=64, height=64, seed=1)
            assert result["images"]

            with pytest.raises(RemoteError) as info:
                await a.request("model", model="/nope/model.safetensors")
            assert info.value.type_name == "ModelError" and "/nope/model.safetensors" in info.value.message
            status = await b.request("status")
            assert status["state"] == "ready" and status["model"]["model"] == "tiny-sd2"  # the old one is back

            back = await a.request("model", model="tiny")
            assert back["embeddings"]["loaded"] == 1
            assert (await b.request("tokens", prompt="<bad-hands-5>"))["embeddings"] == ["bad-hands-5"]

    run(scenario(), timeout=300)
