"""Live reload through a real daemon: files copied, written in pieces, renamed, deleted, overwritten, and
dropped into folders made after the daemon started. Each change must reach clients as an ``embeddings``
event, and the trigger must be usable (or gone) as soon as the event arrives."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from itertools import pairwise
from pathlib import Path

import pytest
from daemon_testing import DaemonProcess, EventLog, run
from PIL import Image

from sdrepl.daemon.client import DaemonClient, RemoteError

pytestmark = pytest.mark.e2e


def sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def changed(name: str, key: str):
    return lambda e: e["event"] == "embeddings" and name in e["change"][key]


async def tokens_ok(c: DaemonClient, name: str) -> dict:
    return await c.request("tokens", prompt=f"a photo of <{name}>")


async def tokens_unknown(c: DaemonClient, name: str) -> str:
    with pytest.raises(RemoteError) as info:
        await c.request("tokens", prompt=f"a photo of <{name}>")
    assert info.value.type_name == "PromptError"
    return info.value.message


def test_copy_in_rename_delete(daemon: DaemonProcess, A1111: Path) -> None:
    async def scenario() -> None:
        async with daemon.client() as c:
            events = EventLog(c)
            shutil.copy(A1111 / "bad-artist.pt", daemon.embeddings / "copied.pt")
            event = await events.wait_for(changed("copied", "added"))
            assert event["version"] >= 1
            assert (await tokens_ok(c, "copied"))["count"] == 3 + 2

            mark = events.mark()
            os.rename(daemon.embeddings / "copied.pt", daemon.embeddings / "renamed.pt")
            await events.wait_for(changed("renamed", "added"), start=mark)
            await events.wait_for(changed("copied", "removed"), start=mark)
            assert (await tokens_ok(c, "renamed"))["embeddings"] == ["renamed"]
            assert "<copied>" in await tokens_unknown(c, "copied")

            mark = events.mark()
            (daemon.embeddings / "renamed.pt").unlink()
            await events.wait_for(changed("renamed", "removed"), start=mark)
            await tokens_unknown(c, "renamed")

    run(scenario())


@pytest.mark.parametrize("mode", ["reopen", "one-handle"])
def test_file_written_in_pieces_is_loaded_once_complete(daemon: DaemonProcess, A1111: Path, mode: str) -> None:
    """Three pieces with pauses longer than the watcher's quiet period: never left broken at the end."""
    data = (A1111 / "eyeliner2.pt").read_bytes()
    name = f"pieces-{mode}"
    path = daemon.embeddings / f"{name}.pt"
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]

    async def scenario() -> None:
        async with daemon.client() as c:
            events = EventLog(c)
            if mode == "reopen":  # each piece appended by a new open/close (a close after every piece)
                for a, b in pairwise(cut):
                    with open(path, "ab") as fh:
                        fh.write(data[a:b])
                    time.sleep(0.35)
            else:  # one open handle, flushed piece by piece; the only close comes at the end
                with open(path, "wb") as fh:
                    for a, b in pairwise(cut):
                        fh.write(data[a:b])
                        fh.flush()
                        time.sleep(0.35)
            await events.wait_for(changed(name, "added"), timeout=10)
            time.sleep(0.3)
            listing = await c.request("embeddings")
            adds = [e for e in events.events if e["event"] == "embeddings" and name in e["change"]["added"]]
            assert len(adds) == 1
            loaded = {e["name"]: e for e in listing["embeddings"]}
            assert loaded[name]["hash"] == sha12(A1111 / "eyeliner2.pt") and loaded[name]["vectors"] == 3
            assert str(path) not in [s["path"] for s in listing["skipped"]]
            assert (await tokens_ok(c, name))["count"] == 3 + 3

    run(scenario())


def test_overwrite_gives_new_hash_and_new_conditioning(daemon: DaemonProcess, A1111: Path) -> None:
    path = daemon.embeddings / "swap.pt"

    def picture(result: dict) -> bytes:
        with Image.open(result["images"][0]["path"]) as im:
            return im.tobytes()

    async def scenario() -> None:
        async with daemon.client() as c:
            events = EventLog(c)
            shutil.copy(A1111 / "bad-hands-5.pt", path)
            await events.wait_for(changed("swap", "added"))
            before = await c.request("show", name="swap")
            image_before = await c.request("generate", prompt="<swap>", seed=9, width=64, height=64, steps=2)
            time.sleep(0.05)  # a later mtime than the first copy, whatever the clock granularity
            mark = events.mark()
            shutil.copyfile(A1111 / "bad-artist.pt", path)  # same size (7083 bytes), other vectors, in place
            await events.wait_for(changed("swap", "updated"), start=mark)
            after = await c.request("show", name="swap")
            assert (before["hash"], after["hash"]) == (sha12(A1111 / "bad-hands-5.pt"), sha12(A1111 / "bad-artist.pt"))
            assert before["norms"] != after["norms"]
            image_after = await c.request("generate", prompt="<swap>", seed=9, width=64, height=64, steps=2)
            assert picture(image_before) != picture(image_after)

    run(scenario())


def test_folders_made_after_start_are_watched(daemon: DaemonProcess, A1111: Path, fixtures_dir: Path) -> None:
    BIRB = fixtures_dir / "diffusers" / "birb-style" / "learned_embeds.bin"
    async def scenario() -> None:
        async with daemon.client() as c:
            events = EventLog(c)
            sub = daemon.embeddings / "later" / "deeper"
            sub.mkdir(parents=True)  # no pause: a folder's creation scans it, so a file that beats the watch counts
            shutil.copy(A1111 / "bad-prompt.pt", sub / "dropped.pt")
            await events.wait_for(changed("dropped", "added"))
            assert (await tokens_ok(c, "dropped"))["count"] == 3 + 16
            # A folder prepared elsewhere and moved in whole (its files existed before any watch could).
            outside = daemon.root / "staging"
            (outside / "birb").mkdir(parents=True)
            shutil.copy(BIRB, outside / "birb" / "learned_embeds.bin")
            shutil.copy(A1111 / "bad_prompt_version2.pt", outside / "v2.pt")
            mark = events.mark()
            os.rename(outside, daemon.embeddings / "moved-in")
            await events.wait_for(changed("birb-style", "added"), start=mark)
            names = {e["name"] for e in (await c.request("embeddings"))["embeddings"]}
            if "v2" not in names:
                await events.wait_for(changed("v2", "added"), start=mark)
            assert (await tokens_ok(c, "v2"))["count"] == 3 + 8
            # The whole folder removed: everything in it goes.
            mark = events.mark()
            shutil.rmtree(daemon.embeddings / "moved-in")
            await events.wait_for(changed("birb-style", "removed"), start=mark)
            await tokens_unknown(c, "birb-style")

    run(scenario())


def test_broken_file_is_skipped_then_fixed(daemon: DaemonProcess, A1111: Path) -> None:
    path = daemon.embeddings / "fixme.pt"

    async def scenario() -> None:
        async with daemon.client() as c:
            events = EventLog(c)
            path.write_bytes(b"this is not a pickle")
            event = await events.wait_for(lambda e: e["event"] == "embeddings" and any(
                s["path"] == str(path) for s in e["change"]["skipped"]))
            reason = next(s["reason"] for s in event["change"]["skipped"] if s["path"] == str(path))
            assert reason
            mark = events.mark()
            shutil.copyfile(A1111 / "bad-artist.pt", path)
            await events.wait_for(changed("fixme", "added"), start=mark)
            assert str(path) in (await events.wait_for(changed(str(path), "unskipped"), start=mark))["change"][
                "unskipped"]
            listing = await c.request("embeddings")
            assert str(path) not in [s["path"] for s in listing["skipped"]]

    run(scenario())
