"""LoRAs through a real daemon: listing (JSON shapes), tags that cost no tokens, errors, A/B/C/A pictures
bit-identical, PNG metadata, live reload with events, bundled embeddings, a broken file while serving."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from daemon_testing import EventLog, make_daemon, run, short_dir
from fixture_paths import LORA_FIXTURES
from lora_files import hypernetwork_file, kohya_file, kohya_name
from PIL import Image
from safetensors.torch import save_file

from sdrepl.core.pnginfo import parse_parameters, read_png_parameters
from sdrepl.daemon.client import RemoteError

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GEN = {"steps": 2, "width": 64, "height": 64, "seed": 7, "cfg": 5.0}


@pytest.fixture(scope="module")
def daemon():
    from sdrepl.core.tiny import build_tiny

    root = short_dir()
    proc = make_daemon(root)
    loras = root / "loras"
    loras.mkdir()
    pipe = build_tiny("tiny")
    kohya_file(loras / "one.safetensors", pipe, seed=1, metadata={"ss_tag_frequency": '{"1_x": {"cat": 5, "dog": 2}}'})
    kohya_file(loras / "two.safetensors", pipe, seed=2, te=False)
    kohya_file(root / "three.safetensors", pipe, seed=3)  # copied in later
    save_file({"lora_unet_unet_nothing.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_unet_nothing.lora_up.weight": torch.zeros(8, 4)}, str(loras / "nomatch.safetensors"))
    nan = {f"{kohya_name('unet', 'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k')}.lora_down.weight":
           torch.full((4, 768), float("nan")),
           f"{kohya_name('unet', 'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k')}.lora_up.weight":
           torch.zeros(32, 4)}
    save_file(nan, str(loras / "nan.safetensors"))
    shutil.copy(LORA_FIXTURES / "cloneofsimo" / "lora_disney.safetensors", loras / "disney.safetensors")
    shutil.copy(LORA_FIXTURES / "diffusers-attnproc" / "pytorch_lora_weights.safetensors", loras / "sd15.safetensors")
    data = (loras / "one.safetensors").read_bytes()
    (loras / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    import io
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    buf = io.BytesIO()
    torch.save({"x": Evil()}, buf)
    (loras / "evil.pt").write_bytes(buf.getvalue())
    save_file({"lora_unet_x.oft_blocks": torch.zeros(2, 4, 4)}, str(loras / "oft.safetensors"))
    (root / "hypernetworks").mkdir()
    hypernetwork_file(root / "hypernetworks" / "hn.pt", (768, 32, 64))
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(root, ignore_errors=True)


def _pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_listing_shapes_and_skips(daemon):
    async def scenario():
        async with daemon.client() as c:
            out = await c.request("loras")
            by_name = {x["name"]: x for x in out["loras"]}
            assert {"one", "two", "nan", "disney"} <= set(by_name)
            one = by_name["one"]
            assert {"name", "path", "format", "rank", "base", "keys", "keys_matched", "hash"} <= set(one)
            assert (one["format"], one["rank"], one["base"], one["keys"] == one["keys_matched"]) == (
                "safetensors/kohya", 4, "SD 1.x", True)
            assert len(one["hash"]) == 12
            skipped = {Path(s["path"]).name: s["reason"] for s in out["skipped"]}
            assert "0 of 2 keys match this model" in skipped["nomatch.safetensors"]
            assert "truncated" in skipped["truncated.safetensors"]
            assert "refused by the safe loader" in skipped["evil.pt"]
            assert "LyCORIS algorithm OFT" in skipped["oft.safetensors"]
            assert "0 of 256 keys match this model" in skipped["sd15.safetensors"]  # SD 1.5 UNet widths on tiny
            shown = await c.request("show_lora", name="one")
            assert shown["tags"][0] == {"tag": "cat", "count": 5}
            assert sum(shown["groups"].values()) == shown["keys_matched"]
            emb = await c.request("embeddings")
            bundled = {e["name"]: e for e in emb["embeddings"] if e.get("source")}
            assert set(bundled) == {"s1", "s2"} and bundled["s1"]["source"].endswith("disney.safetensors")
            made = await c.request("generate", prompt="a <s1> cat", **GEN)
            ti = parse_parameters(read_png_parameters(made["images"][0]["path"]))["ti_hashes"]
            assert ti == {"s1": by_name["disney"]["hash"]}  # a bundled embedding's hash is its LoRA's
    run(scenario())


def test_tags_cost_no_tokens_and_errors(daemon):
    async def scenario():
        async with daemon.client() as c:
            plain = await c.request("tokens", prompt="a photo of a cat")
            tagged = await c.request("tokens", prompt="a photo <lora:one:0.5> of a cat <lora:two:1:0.3>")
            assert tagged["count"] == plain["count"]
            assert tagged["loras"] == [{"name": "one", "te": 0.5, "unet": 0.5}, {"name": "two", "te": 1.0, "unet": 0.3}]
            with pytest.raises(RemoteError, match="did you mean one"):
                await c.request("tokens", prompt="<lora:onee:1>")
            with pytest.raises(RemoteError, match="negative prompt"):
                await c.request("generate", prompt="a cat", negative="<lora:one:1>", **GEN)
    run(scenario())


def test_a_b_c_a_pictures_and_metadata(daemon):
    async def scenario():
        async with daemon.client() as c:
            a = await c.request("generate", prompt="a cat", **GEN)
            b = await c.request("generate", prompt="a cat <lora:one:1> <lora:two:0.8>", **GEN)
            cc = await c.request("generate", prompt="a cat <lora:one:0.4>", **GEN)
            a2 = await c.request("generate", prompt="a cat", **GEN)
            assert b["loras"] == [{"name": "one", "te": 1.0, "unet": 1.0}, {"name": "two", "te": 0.8, "unet": 0.8}]
            assert a["loras"] == [] and a2["loras"] == []
            pa, pb, pc, pa2 = (_pixels(r["images"][0]["path"]) for r in (a, b, cc, a2))
            assert not np.array_equal(pa, pb) and not np.array_equal(pb, pc)
            assert np.array_equal(pa, pa2)
            params = parse_parameters(read_png_parameters(b["images"][0]["path"]))
            assert params["prompt"] == "a cat <lora:one:1> <lora:two:0.8>"
            hashes = (await c.request("loras"))["loras"]
            expected = ", ".join(f"{n}: {next(x['hash'] for x in hashes if x['name'] == n)}" for n in ("one", "two"))
            assert params["extra"]["Lora hashes"] == expected
    run(scenario())


def test_live_reload_and_broken_file(daemon):
    async def scenario():
        async with daemon.client() as c:
            events = EventLog(c)
            shutil.copy(daemon.root / "three.safetensors", daemon.root / "loras" / "three.safetensors")
            await events.wait_for(lambda e: e["event"] == "loras" and "three" in e["change"]["added"])
            await c.request("tokens", prompt="<lora:three:1>")
            before = next(x["hash"] for x in (await c.request("loras"))["loras"] if x["name"] == "three")
            mark = events.mark()
            shutil.copy(daemon.root / "loras" / "one.safetensors", daemon.root / "loras" / "three.safetensors")
            await events.wait_for(lambda e: e["event"] == "loras" and "three" in e["change"]["updated"], start=mark)
            after = next(x["hash"] for x in (await c.request("loras"))["loras"] if x["name"] == "three")
            assert after != before
            mark = events.mark()
            (daemon.root / "loras" / "three.safetensors").unlink()
            await events.wait_for(lambda e: e["event"] == "loras" and "three" in e["change"]["removed"], start=mark)
            with pytest.raises(RemoteError) as err:
                await c.request("generate", prompt="a cat <lora:nan:1>", **GEN)
            assert "nan.safetensors" in err.value.message and "NaN" in err.value.message
            out = await c.request("loras")
            assert any(Path(s["path"]).name == "nan.safetensors" for s in out["skipped"])
            ok = await c.request("generate", prompt="a cat <lora:one:1>", **GEN)  # still serving
            assert ok["images"]
    run(scenario())


def test_hypernetwork(daemon):
    async def scenario():
        async with daemon.client() as c:
            listed = await c.request("hypernetworks")
            assert [h["name"] for h in listed["hypernetworks"]] == ["hn"] and listed["hypernetworks"][0]["widths"] == [
                32, 64, 768]
            plain = await c.request("generate", prompt="a cat", **GEN)
            hyper = await c.request("generate", prompt="a cat <hypernet:hn:0.5>", **GEN)
            again = await c.request("generate", prompt="a cat", **GEN)
            assert not np.array_equal(_pixels(plain["images"][0]["path"]), _pixels(hyper["images"][0]["path"]))
            assert np.array_equal(_pixels(plain["images"][0]["path"]), _pixels(again["images"][0]["path"]))
            extra = parse_parameters(read_png_parameters(hyper["images"][0]["path"]))["extra"]
            assert (extra["Hypernet"], extra["Hypernet strength"], len(extra["Hypernet hash"])) == ("hn", "0.5", 10)
            with pytest.raises(RemoteError, match="no loaded hypernetwork"):
                await c.request("tokens", prompt="<hypernet:nope:1>")
    run(scenario())
