"""A1111 ``parameters`` text: written as A1111 writes it, read back from ours and from A1111's own."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from sdrepl.core.pnginfo import (
    PngInfoError,
    build_parameters,
    parse_parameters,
    png_text_chunks,
    quote,
    read_png_parameters,
)

BASE = dict(prompt="a portrait of <cat-toy>, oil", negative="EasyNegative, blurry", steps=20, sampler="Euler a",
            cfg=7.0, seed=1234, width=512, height=768, model_hash="abcdef1234", model="tiny")


def test_layout_matches_a1111() -> None:
    text = build_parameters(**BASE, ti_hashes={"cat-toy": "0123456789ab", "EasyNegative": "ba9876543210"})
    assert text == (
        "a portrait of <cat-toy>, oil\n"
        "Negative prompt: EasyNegative, blurry\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: abcdef1234, "
        'Model: tiny, TI hashes: "cat-toy: 0123456789ab, EasyNegative: ba9876543210"'
    )


def test_no_negative_line_when_empty_and_clip_skip_only_when_not_one() -> None:
    text = build_parameters(**{**BASE, "negative": ""}, clip_skip=2)
    assert "Negative prompt" not in text
    assert text.endswith("Model: tiny, Clip skip: 2")


@pytest.mark.parametrize("value, expected", [("Euler a", "Euler a"), ("a, b", '"a, b"'), ("x: y", '"x: y"'),
                                              ('say "hi", ok', '"say \\"hi\\", ok"')])
def test_quote(value: str, expected: str) -> None:
    assert quote(value) == expected


def test_round_trip() -> None:
    text = build_parameters(**{**BASE, "prompt": "line one\nline two", "negative": "bad\nworse", "cfg": 6.5},
                            clip_skip=2, ti_hashes={"sub/cat-toy": "0123456789ab"})
    parsed = parse_parameters(text)
    assert parsed == {
        "prompt": "line one\nline two", "negative": "bad\nworse", "steps": 20, "sampler": "Euler a", "cfg": 6.5,
        "seed": 1234, "width": 512, "height": 768, "model_hash": "abcdef1234", "model": "tiny", "clip_skip": 2,
        "ti_hashes": {"sub/cat-toy": "0123456789ab"}, "extra": {},
    }


def test_parses_real_a1111_text() -> None:
    """As A1111 1.6 writes it: Lora hashes and Version extras, quoted values with commas."""
    text = ("masterpiece, 1girl, (smile:1.2)\nNegative prompt: EasyNegative, bad-hands-5\n"
            "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 3912345678, Size: 512x768, "
            "Model hash: 7f96a1a9ca, Model: anything-v5, Clip skip: 2, "
            'TI hashes: "EasyNegative: c74b4e810b03, bad-hands-5: aa7651be154c", '
            'Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.6.0')
    parsed = parse_parameters(text)
    assert parsed["prompt"] == "masterpiece, 1girl, (smile:1.2)"
    assert parsed["negative"] == "EasyNegative, bad-hands-5"
    assert (parsed["steps"], parsed["sampler"], parsed["cfg"], parsed["seed"]) == (28, "DPM++ 2M Karras", 6.5,
                                                                                  3912345678)
    assert (parsed["width"], parsed["height"], parsed["clip_skip"]) == (512, 768, 2)
    assert parsed["ti_hashes"] == {"EasyNegative": "c74b4e810b03", "bad-hands-5": "aa7651be154c"}
    assert parsed["extra"] == {"Lora hashes": "add_detail: 7c6bad76eb54", "Version": "v1.6.0"}


def test_prompt_only_text_has_no_parameters() -> None:
    parsed = parse_parameters("just a prompt")
    assert parsed["prompt"] == "just a prompt" and parsed["steps"] is None and parsed["ti_hashes"] == {}


def test_png_round_trip(tmp_path: Path) -> None:
    text = build_parameters(**{**BASE, "prompt": "ünïcödé ☃"})
    path = tmp_path / "p.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=png_text_chunks(text))
    assert read_png_parameters(path) == text
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert read_png_parameters(plain) is None


@pytest.mark.parametrize("content", [None, b"not an image"])
def test_unreadable_file_is_a_clear_error(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "x.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(PngInfoError, match=r"x\.png: (no such file|not a readable image)"):
        read_png_parameters(path)



def test_fetch_never_blocks_on_a_fifo(tmp_path: Path) -> None:
    import os
    import threading

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []
    thread = threading.Thread(target=lambda: outcome.append(pytest.raises(PngInfoError, read_png_parameters, fifo).value),
                              daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive() and "FIFO" in str(outcome[0])


def test_fetch_reads_a_huge_picture_without_decoding_it(tmp_path: Path) -> None:
    import os
    import re

    from attack_corpus import png, text_chunk

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")

    def kib(key: str) -> int:
        return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1))

    huge = tmp_path / "huge.png"
    # 164 megapixels after the text: decoding (what Pillow's load() did) would cost ~500 MB
    huge.write_bytes(png(12800, 12800, chunks=(text_chunk(b"tEXt", b"parameters\x00a cat\nSteps: 2"),)))
    before = kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the current RSS
    assert read_png_parameters(huge) == "a cat\nSteps: 2"
    assert kib("VmHWM") - before < 50 * 1024  # KiB
