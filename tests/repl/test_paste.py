"""A paste is one entry (issue 11, item 2): A1111 parameters become one generation line, with a notice.

The A1111 block below is what the PNG Info tab of AUTOMATIC1111 1.9 shows for a hires-fixed, ADetailer'd
picture: its Hires. fix settings become ``--hires`` options, its ADetailer settings cannot be honoured and
must be named, never dropped silently; ``!fetch`` of the same text says the same.
"""

from __future__ import annotations

import asyncio

from PIL import Image

from sdrepl.core.pnginfo import png_text_chunks
from sdrepl.repl.paste import paste_entry
from sdrepl.repl.session import Session

A1111_BLOCK = """masterpiece, a red fox in the snow, <bad-hands-5>
looking at the viewer
Negative prompt: blurry, lowres
Steps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 64x64, Model hash: \
6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Hires upscale: 2, Hires upscaler: Latent, \
ADetailer model: face_yolov8n.pt, Version: v1.9.4"""


def test_a_parameters_block_becomes_one_line_with_its_settings(fake):
    pasted = paste_entry(A1111_BLOCK.replace("\n", "\r\n"))
    assert pasted.text.startswith('"""\nmasterpiece, a red fox in the snow, <bad-hands-5>\nlooking at the viewer\n')
    for option in ("--neg blurry, lowres", "--steps 2", "--cfg 6.5", "--seed 1234", "--size 64x64",
                   "--sampler DPM++ 2M Karras", "--hires 2 --hires-denoise 0.45 --hires-upscaler latent"):
        assert option in pasted.text
    assert "ADetailer model" in pasted.notice
    for name in ("Denoising strength", "Hires upscale", "Hires upscaler"):
        assert name not in pasted.notice
    assert "Model hash" not in pasted.notice and "Version" not in pasted.notice
    result = asyncio.run(Session(fake).execute(pasted.text))  # Enter: one generation with those settings
    assert result.ok and fake.types() == ["generate"]
    sent = fake.calls[0][1]
    assert sent["prompt"] == "masterpiece, a red fox in the snow, <bad-hands-5>\nlooking at the viewer"
    assert (sent["negative"], sent["steps"], sent["cfg"], sent["seed"], sent["sampler"], sent["width"]) == (
        "blurry, lowres", 2, 6.5, 1234, "DPM++ 2M Karras", 64)
    assert (sent["hires"], sent["hires_denoise"], sent["hires_upscaler"]) == (2.0, 0.45, "latent")


def test_a_one_line_prompt_block_stays_one_line():
    pasted = paste_entry("a cat\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 64x64")
    assert pasted.text == "a cat --steps 2 --cfg 7 --seed 5 --size 64x64 --sampler Euler"
    assert "left out" not in pasted.notice


def test_other_multiline_pastes_become_one_prompt_block():
    pasted = paste_entry("a tall tree\non a hill\n")
    assert pasted.text == '"""\na tall tree\non a hill\n"""' and "one prompt" in pasted.notice


def test_pasted_commands_and_blocks_stay_as_they_are():
    assert paste_entry("!set steps 3\n!embeddings").text == "!set steps 3\n!embeddings"
    block = '"""\na cat\n"""'
    assert paste_entry(block).text == block
    assert paste_entry("a cat --steps 3").text == "a cat --steps 3"


def test_fetch_names_the_unsupported_fields_too(fake, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png", pnginfo=png_text_chunks(A1111_BLOCK))
    result = asyncio.run(Session(fake, cwd=tmp_path).execute("!fetch a.png"))
    assert result.ok and result.edit_buffer == paste_entry(A1111_BLOCK).text
    assert result.result["unsupported"] == ["ADetailer model"]
    assert result.text.splitlines()[-1] == "note: not supported by sdrepl, left out: ADetailer model"
