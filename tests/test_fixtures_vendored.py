"""The vendored fixtures are the published files, byte for byte (their sums as the shared folder lists
them), and the suite does not need anything outside the repository."""

from __future__ import annotations

import hashlib

from fixture_paths import VENDORED


def test_vendored_fixtures_match_their_published_sums():
    lines = (VENDORED / "SHA256SUMS").read_text().split("\n")
    checked = 0
    for line in filter(None, lines):
        digest, name = line.split(maxsplit=1)
        path = VENDORED / name.strip().lstrip("*")
        assert path.is_file(), f"missing vendored fixture {name}"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"{name} differs from its published sum"
        checked += 1
    assert checked >= 13
