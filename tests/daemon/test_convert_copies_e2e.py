"""``!convert`` through a real daemon: the copy written beside the original is the same embedding (one entry,
two files), no collision warning reaches the clients, the original stays the file served, and removing the
copy says which file went while the embedding stays."""

from __future__ import annotations

import pytest
from daemon_testing import DaemonProcess, EventLog, run

pytestmark = pytest.mark.e2e


def _warnings(events: EventLog, start: int) -> list[str]:
    return [w for e in events.events[start:] if e["event"] == "embeddings" for w in e["change"]["warnings"]]


def test_convert_copy_is_one_entry_with_two_files_and_no_collision(daemon: DaemonProcess) -> None:
    original = daemon.embeddings / "bad-hands-5.pt"

    async def scenario() -> None:
        async with daemon.client() as c:
            events = EventLog(c)
            before = await c.request("show", name="bad-hands-5")
            assert before["path"] == str(original)
            mark = events.mark()
            written = (await c.request("convert", name="bad-hands-5", to="safetensors"))["path"]
            event = await events.wait_for(lambda e: e["event"] == "embeddings" and e["change"]["files_added"],
                                          timeout=30, start=mark)
            assert event["change"]["files_added"] == [{"path": written, "name": "bad-hands-5",
                                                       "entry": str(original)}]
            assert event["change"]["added"] == [] and event["change"]["removed"] == []

            listed = await c.request("embeddings")
            entries = [e for e in listed["embeddings"] if e["name"].lower() == "bad-hands-5"]
            assert len(entries) == 1, entries
            assert entries[0]["path"] == str(original) and entries[0]["files"] == [str(original), written]
            assert not [w for w in listed["warnings"] if "bad-hands-5" in w]
            assert _warnings(events, mark) == []

            after = await c.request("show", name="bad-hands-5")
            assert (after["path"], after["sha256"], after["norms"]) == (before["path"], before["sha256"],
                                                                        before["norms"])
            assert (await c.request("tokens", prompt="a <bad-hands-5>"))["embeddings"] == ["bad-hands-5"]

            mark = events.mark()
            (daemon.embeddings / "bad-hands-5.safetensors").unlink()
            event = await events.wait_for(lambda e: e["event"] == "embeddings" and e["change"]["files_removed"],
                                          timeout=30, start=mark)
            assert event["change"]["files_removed"] == [{"path": written, "name": "bad-hands-5",
                                                         "entry": str(original)}]
            assert event["change"]["removed"] == []
            listed = await c.request("embeddings")
            (entry,) = [e for e in listed["embeddings"] if e["name"].lower() == "bad-hands-5"]
            assert entry["files"] == [str(original)]

    run(scenario())
