"""img2img and hires fix end to end: scripted ``--json`` sessions against a real daemon on ``tiny``.

A first session makes an img2img picture (``--init``/``--strength`` and InvokeAI's ``-I``/``-f``) and a
hires-fixed one; a second ``!fetch``es both, runs the fetched lines again (the same pixels: the metadata
round trip is complete but for the init picture, which the notice names), pastes the parameters text, and
feeds bad init pictures and out-of-range values: each a clear error, and the daemon keeps serving.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdrepl.core.pnginfo import read_png_parameters
from sdrepl.repl.paste import paste_entry

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def session(live: dict, script: str) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "sdrepl", *live["options"], "--json"], input=script, text=True,
                          capture_output=True, cwd=live["root"], env=live["env"], timeout=300)
    objects = [json.loads(line) for line in done.stdout.splitlines()]
    assert objects, done.stderr
    return objects


def pixels(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def png_declaring(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_img2img_and_hires_from_a_script_round_trip_through_fetch(live_daemon):
    root: Path = live_daemon["root"]
    pics = root / "pics"
    pics.mkdir(exist_ok=True)
    x = np.linspace(0, 255, 48, dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(x, (40, 1))] * 3, axis=2)).save(pics / "init.png")  # 48x40
    (pics / "notes.png").write_text("not a picture")
    (pics / "huge.png").write_bytes(png_declaring(60_000, 60_000))

    first = session(live_daemon, "\n".join([
        "a red fox --steps 4 --seed 3 --init pics/init.png --strength 0.5",
        "a red fox -I pics/init.png -f 0.5 -s 4 -S 3",
        "a red fox --steps 2 --seed 3 --size 32x32 --hires 2 --hires-steps 3 --hires-denoise 0.5 "
        "--hires-upscaler lanczos",
        "a red fox --steps 2 --seed 4 --size 32x32 --hires 1.5",
    ]) + "\n")
    assert all(o["ok"] for o in first), first
    img2img, invoke, hires, latent = first
    assert img2img["init"] == str(pics / "init.png") and img2img["strength"] == 0.5
    path = img2img["images"][0]["path"]
    assert Image.open(path).size == (48, 40)  # no size: the init picture's
    assert np.array_equal(pixels(path), pixels(invoke["images"][0]["path"]))  # -I/-f: the same request
    assert hires["hires"] == {"scale": 2.0, "steps": 3, "denoise": 0.5, "upscaler": "lanczos", "width": 64,
                              "height": 64}
    assert Image.open(hires["images"][0]["path"]).size == (64, 64)
    assert Image.open(latent["images"][0]["path"]).size == (48, 48)

    hires_path, latent_path = hires["images"][0]["path"], latent["images"][0]["path"]
    fetched = session(live_daemon, f"!fetch {path}\n!fetch {hires_path}\n!fetch {latent_path}\n")
    assert all(o["ok"] for o in fetched), fetched
    line_img2img, line_hires, line_latent = (o["command"] for o in fetched)
    assert "--strength 0.5" in line_img2img and "--init" not in line_img2img
    assert fetched[0]["unsupported"] == ["Init image"]
    assert line_hires.endswith("--hires 2 --hires-steps 3 --hires-denoise 0.5 --hires-upscaler lanczos")
    assert line_latent.endswith("--hires 1.5 --hires-denoise 0.7 --hires-upscaler latent")
    assert fetched[1]["unsupported"] == [] and fetched[2]["unsupported"] == []
    assert paste_entry(read_png_parameters(hires_path)).text == line_hires  # a pasted parameters text too

    again = session(live_daemon, "\n".join([
        f"{line_img2img} --init pics/init.png",
        line_hires,
        line_img2img,  # --strength without --init: said at once
        "a cat --init pics/missing.png",
        "a cat --init pics/notes.png",
        "a cat --init pics/huge.png",
        "a cat --init pics",
        "a cat --init pics/init.png --strength 1.5",
        "a cat --hires 5",
        "a cat --size 4096x512 --hires 4",
        "a cat --init pics/init.png --hires 2",
        "!status",
    ]) + "\n")
    assert [o["ok"] for o in again] == [True, True] + [False] * 9 + [True], again
    assert np.array_equal(pixels(again[0]["images"][0]["path"]), pixels(path))  # made again from its metadata
    assert np.array_equal(pixels(again[1]["images"][0]["path"]), pixels(hires_path))
    errors = [(o["error"]["type"], o["error"]["message"]) for o in again[2:11]]
    assert errors[0][0] == "UsageError" and "--init IMAGE" in errors[0][1]
    assert errors[1][0] == "InitImageError" and "missing.png: no such file" in errors[1][1]
    assert errors[2][0] == "InitImageError" and "notes.png: not a picture" in errors[2][1]
    assert errors[3][0] == "InitImageError" and "huge.png: its header declares" in errors[3][1]
    assert errors[4][0] == "InitImageError" and "a folder" in errors[4][1]
    assert "--strength '1.5'" in errors[5][1] and "from 0 to 1" in errors[5][1]
    assert "--hires '5'" in errors[6][1] and "from 1 to 4" in errors[6][1]
    assert errors[7][0] == "BadRequest" and "use a scale up to 2.00" in errors[7][1]
    assert errors[8][0] == "UsageError" and "does not combine with --init" in errors[8][1]
    assert again[-1]["status"]["state"] == "ready"
