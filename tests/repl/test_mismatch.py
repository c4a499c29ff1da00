"""Client options the running daemon cannot honour get a notice naming both values and how to switch."""

from __future__ import annotations

from pathlib import Path

from sdrepl.config import Settings
from sdrepl.repl.mismatch import option_notices

STATUS = {"socket": "/run/sd.sock", "outputs": "/srv/outputs", "keep_alive_s": None,
          "embeddings": {"folders": ["/srv/embeddings"]}, "model": {"model": "tiny", "device": "cpu", "dtype": "fp32"}}


def settings(**changes) -> Settings:
    base = dict(socket=Path("/run/sd.sock"), embeddings=[Path("/srv/embeddings")], outputs=Path("/srv/outputs"))
    return Settings(**{**base, **changes})


def test_matching_options_say_nothing():
    assert option_notices(settings(), STATUS) == []
    assert option_notices(settings(device="auto", dtype="auto"), STATUS) == []


def test_each_differing_option_is_named_with_both_values_and_the_way_to_switch():
    lines = option_notices(settings(embeddings=[Path("/home/me/emb")], outputs=Path("/home/me/out"), device="cuda",
                                    dtype="fp16", keep_alive=300.0), STATUS)
    assert len(lines) == 4  # --outputs is honoured per client: no notice
    expected = [("--embeddings /srv/embeddings, not /home/me/emb"), ("--device cpu, not cuda"),
                ("--dtype fp32, not fp16"), ("--keep-alive forever, not 300s")]
    for line, fragment in zip(lines, expected, strict=True):
        assert fragment in line and "`sdrepl stop` and start again to switch" in line


def test_cuda_matches_the_first_cuda_device():
    status = {**STATUS, "model": {"device": "cuda:0", "dtype": "fp16"}}
    assert option_notices(settings(device="cuda", dtype="fp16"), status) == []
