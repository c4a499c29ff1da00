"""Fixtures of the daemon tests: a real daemon per module (see ``daemon_testing.py`` for the helpers)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_testing import DaemonProcess, make_daemon, short_dir


@pytest.fixture(scope="module")
def daemon(fixtures_dir: Path) -> Iterator[DaemonProcess]:
    """One real daemon per test module, with two fixture embeddings already in its folder."""
    root = short_dir()
    proc = make_daemon(root)
    shutil.copy(fixtures_dir / "a1111" / "bad-hands-5.pt", proc.embeddings)
    shutil.copy(fixtures_dir / "a1111" / "EasyNegative.safetensors", proc.embeddings)
    try:
        yield proc.start()
    finally:
        proc.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def A1111(fixtures_dir: Path) -> Path:  # named as the constant in tests/conftest.py
    return fixtures_dir / "a1111"


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    root = short_dir()
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


