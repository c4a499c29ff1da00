"""status text for remote clients and several workers (issue 16): where the daemon's copies are, listeners,
workers and which one trains."""

from __future__ import annotations

from sdrepl.core.status_text import format_status


def test_remote_and_worker_lines() -> None:
    text = format_status({"outputs": "/srv/out", "remote_client": True, "listen": ["0.0.0.0:7860"],
                          "workers": [{"index": 0, "device": "cuda:0", "running": "train"},
                                      {"index": 1, "device": "cuda:1", "running": None}]})
    assert "outputs /srv/out (the daemon's copies; yours are sent to this machine)" in text
    assert "listening:  tls://0.0.0.0:7860" in text
    assert "workers:    0:cuda:0 running train; 1:cuda:1 idle" in text


def test_local_single_device_status_unchanged() -> None:
    text = format_status({"outputs": "/o", "listen": [], "workers": None})
    assert "listening" not in text and "workers" not in text and text.rstrip().endswith("outputs /o")
