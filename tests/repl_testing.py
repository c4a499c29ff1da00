"""Driving the interactive REPL in a real pseudo-terminal (pexpect): one launcher for every e2e test.

Each REPL test used to build its own environment and spawn call; a change to what the REPL needs (an
environment variable, the banner) then had to be made in five places. :func:`repl_env` is the clean
environment (no ``SDREPL_*`` of the developer's shell, state and history in the test's folder, no
cursor-position requests that a pty never answers), :func:`spawn_repl` starts ``python -m sdrepl`` and
waits for its first prompt, :func:`close_repl` ends it with Ctrl-D (killing it if it does not go).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PROMPT = "sd> "
BANNER = "sdrepl · model tiny"


def repl_env(tmp: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The REPL's environment for a test rooted at ``tmp`` (``base``: the environment to start from)."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("SDREPL_")}
    env.update(XDG_STATE_HOME=str(tmp / "state"), XDG_DATA_HOME=str(tmp / "data"),
               SDREPL_HISTORY=str(tmp / "history"), TOKENIZERS_PARALLELISM="false", TERM="xterm",
               PYTHONUNBUFFERED="1", PROMPT_TOOLKIT_NO_CPR="1", OMP_NUM_THREADS="1")
    return env


def spawn_repl(args: list[str], env: Mapping[str, str], cwd: Path, *, log: Path | None = None,
               encoding: str | None = "utf-8", banner: str | None = BANNER, timeout: float = 60) -> Any:
    """``python -m sdrepl ARGS`` in a 40x160 pty, after its banner and first prompt (``banner=None``: the
    prompt only). ``encoding=None`` gives a bytes child; ``log`` appends what the screen got (post-mortems)."""
    import pexpect

    child = pexpect.spawn(sys.executable, ["-m", "sdrepl", *args], env=dict(env), cwd=str(cwd),
                          dimensions=(40, 160), encoding=encoding, timeout=timeout,
                          **({"codec_errors": "replace"} if encoding else {}))
    if log is not None:
        child.logfile_read = open(log, "a" if encoding else "ab")  # noqa: SIM115 - closed by close_repl
    try:
        if banner is not None:
            child.expect_exact(banner if encoding else banner.encode())
        child.expect_exact(PROMPT if encoding else PROMPT.encode())
    except BaseException:
        close_repl(child)
        raise
    return child


def close_repl(child: Any) -> None:
    """Ctrl-D, wait for the REPL to end (10 s), else kill it; close the screen log."""
    import pexpect

    if child.isalive():
        child.sendcontrol("d")
        try:
            child.expect(pexpect.EOF, timeout=10)
        except pexpect.TIMEOUT:
            child.terminate(force=True)
    if child.logfile_read is not None:
        child.logfile_read.close()
