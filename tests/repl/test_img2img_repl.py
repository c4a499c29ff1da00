"""img2img and hires fix in the REPL, against the fake daemon: the options (InvokeAI's too), their rules,
what a line sends (the path anchored to the session folder; sent as an upload to a remote daemon), the
rendering, and ``!fetch``'s reading of A1111's fields."""

from __future__ import annotations

import asyncio

import pytest

from sdrepl.core.errors import UsageError
from sdrepl.repl import render
from sdrepl.repl.actions import fetch_line, unsupported_fields, unsupported_notice
from sdrepl.repl.parse import parse_generation
from sdrepl.repl.session import Session


@pytest.mark.parametrize(("text", "init", "strength"), [
    ("a fox --init pics/a b.png --strength 0.6", "pics/a b.png", 0.6),
    ("a fox -I pics/a.png -f 0.6", "pics/a.png", 0.6),
    ("a fox -I pics/a.png -f0.6 -s 20", "pics/a.png", 0.6),
    ("a fox --init_img pics/a.png --denoising-strength .25", "pics/a.png", 0.25),
    ("a fox --init pics/a.png", "pics/a.png", None),
])
def test_img2img_spellings(text, init, strength):
    line = parse_generation(text)
    assert (line.prompt, line.init, line.strength) == ("a fox", init, strength)


def test_hires_options():
    line = parse_generation("a castle --hires 1.5 --hires-steps 10 --hires-denoise 0.4 --hires-upscaler Lanczos")
    assert (line.hires, line.hires_steps, line.hires_denoise, line.hires_upscaler) == (1.5, 10, 0.4, "lanczos")


@pytest.mark.parametrize(("text", "needle"), [
    ("a fox --strength 0.5", "give the picture too, --init IMAGE"),
    ("a fox -f 0.5", "give the picture too"),
    ("a fox --hires-steps 5", "--hires-steps set(s) hires fix: give the scale too"),
    ("a fox --init a.png --hires 2", "does not combine with --init"),
])
def test_rules_are_said_on_the_line(text, needle):
    with pytest.raises(UsageError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        parse_generation(text)


def test_a_line_sends_the_path_from_the_session_folder(fake, tmp_path):
    result = asyncio.run(Session(fake, cwd=tmp_path).execute("a fox --init pics/a.png -f 0.3 --steps 4"))
    assert result.ok
    sent = fake.calls[-1][1]
    assert sent["init"] == str(tmp_path / "pics" / "a.png") and sent["strength"] == 0.3
    assert "hires" not in sent
    assert result.result["init"] == str(tmp_path / "pics" / "a.png")


def test_a_remote_session_uploads_the_picture(fake, tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    fake.remote = True
    fake.replies["upload_begin"] = {"upload": "upload:9", "limits": {"files": 1, "file_bytes": 1 << 20,
                                                                    "bytes": 1 << 20, "chunk_bytes": 4}}
    fake.replies["upload_chunk"] = {"bytes": 0, "files": 0}
    fake.replies["upload_end"] = {"data": "upload:9", "files": 1, "bytes": 18}
    result = asyncio.run(Session(fake, cwd=tmp_path).execute("a fox --init a.png"))
    assert result.ok, result.error
    assert [t for t in fake.types() if t.startswith("upload")][:2] == ["upload_begin", "upload_chunk"]
    assert fake.calls[0][1] == {"kind": "init"}
    assert fake.calls[-1][1]["init"] == "upload:9" and result.result["init"] == str(tmp_path / "a.png")
    missing = asyncio.run(Session(fake, cwd=tmp_path).execute("a fox --init gone.png"))
    assert not missing.ok and "no such file here" in missing.error["message"]


def test_the_line_says_img2img_and_hires():
    text = render.generation({"images": [{"path": "/o/1-2.png", "seed": 2}], "init": "/p/fox.png",
                              "strength": 0.5, "tokens": {"count": 2, "limit": 75}})
    assert "img2img 0.5 from fox.png" in text
    text = render.generation({"images": [{"path": "/o/1-2.png", "seed": 2}], "tokens": {"count": 2, "limit": 75},
                              "hires": {"scale": 2.0, "steps": 20, "denoise": 0.7, "upscaler": "latent",
                                        "width": 1024, "height": 1024}})
    assert "hires 2x latent -> 1024x1024" in text


def parsed(extra: dict) -> dict:
    return {"prompt": "a fox", "negative": "", "steps": 20, "cfg": 7.0, "seed": 1, "width": 512, "height": 512,
            "sampler": "Euler a", "clip_skip": 1, "extra": extra}


def test_fetch_reads_a1111s_fields_back():
    p = parsed({"Denoising strength": "0.45", "Hires upscale": "2", "Hires steps": "12", "Hires upscaler": "Latent"})
    assert fetch_line(p).endswith("--hires 2 --hires-steps 12 --hires-denoise 0.45 --hires-upscaler latent")
    assert unsupported_fields(p) == []
    p = parsed({"Denoising strength": "0.75"})  # an img2img picture
    assert fetch_line(p).endswith("--strength 0.75") and unsupported_fields(p) == ["Init image"]
    assert "add --init IMAGE" in unsupported_notice(unsupported_fields(p))


def test_fetch_names_what_it_cannot_honour_and_escapes_it():
    p = parsed({"Denoising strength": "0.3", "Hires upscale": "2", "Hires upscaler": "R-ESRGAN 4x+\x1b[2J"})
    assert fetch_line(p).endswith("--hires 2 --hires-denoise 0.3")
    assert unsupported_fields(p) == ["Hires upscaler R-ESRGAN 4x+??2J"]
    p = parsed({"Hires upscale": "lots", "Denoising strength": "0.3"})
    assert "--hires" not in fetch_line(p) and sorted(unsupported_fields(p)) == ["Denoising strength",
                                                                               "Hires upscale"]
    p = parsed({"Hires upscale": "9"})  # beyond the limit: left out, named
    assert "--hires" not in fetch_line(p) and unsupported_fields(p) == ["Hires upscale"]


def test_a_hires_fix_to_a_fixed_size_is_not_mistaken_for_img2img():
    p = parsed({"Denoising strength": "0.5", "Hires resize-1": "1024", "Hires resize-2": "768",
                "Hires upscaler": "Latent"})
    assert "--strength" not in fetch_line(p) and "--hires" not in fetch_line(p)
    assert sorted(unsupported_fields(p)) == ["Denoising strength", "Hires resize-1", "Hires resize-2",
                                             "Hires upscaler"]
