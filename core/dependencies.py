"""Dependency versions that matter for safety, checked at start-up (daemon and ``sdrepl convert``).

Embedding files are pickles from strangers, opened with ``torch.load(weights_only=True)`` behind sdrepl's
own inspection (:mod:`sdrepl.core.formats.pickle_scan`). Below torch 2.6 ``weights_only`` can be bypassed
to run code (CVE-2025-32434); below 2.10 a crafted file can corrupt memory inside it (CVE-2026-24747).
pyproject.toml requires :data:`MIN_TORCH`; this check catches an environment that has an older torch
anyway (installed with ``--no-deps``, a system package, a conda pin) with a message saying what to do.
The version is read from the package metadata, so the check costs no torch import.
"""

from __future__ import annotations

import re
from importlib import metadata

#: The oldest torch whose safe loader has no known bypass or memory corruption.
MIN_TORCH = (2, 10)


def _parse(version: str) -> tuple[int, int] | None:
    found = re.match(r"\s*(\d+)\.(\d+)", version)
    return (int(found.group(1)), int(found.group(2))) if found else None


def installed_torch_version() -> str | None:
    """The installed torch's version string (``2.13.0+cpu``), or None when torch is not installed."""
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def torch_problem(version: str | None = None) -> str | None:
    """Why the installed torch (or ``version``) is unsafe to open embedding files with, or None."""
    version = installed_torch_version() if version is None else version
    wanted = ".".join(map(str, MIN_TORCH))
    if version is None:
        return f"torch is not installed; install torch>={wanted} (see README, installation)"
    parsed = _parse(version)
    if parsed is None or parsed < MIN_TORCH:
        return (f"torch {version} is too old to open embedding files safely: its weights_only loader can be made "
                f"to run code (CVE-2025-32434, below 2.6) or corrupt memory (CVE-2026-24747, below 2.10); "
                f"upgrade with: pip install 'torch>={wanted}'")
    return None
