"""Driving the interactive REPL in a real terminal: pexpect's pty, or a private tmux server (what the screen
really shows); one launcher each for every e2e test.

Each REPL test used to build its own environment and spawn call; a change to what the REPL needs (an
environment variable, the banner) then had to be made in five places. :func:`repl_env` is the clean
environment (no ``SDREPL_*`` of the developer's shell, state and history in the test's folder, no
cursor-position requests that a pty never answers), :func:`spawn_repl` starts ``python -m sdrepl`` and
waits for its first prompt, :func:`close_repl` ends it with Ctrl-D (killing it if it does not go).
:class:`Tmux` runs the REPL in a tmux pane whose contents (``capture-pane``) a test waits on.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
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


@contextlib.contextmanager
def repl_daemon(prefix: str, prepare: Callable[[Any], None] | None = None) -> Iterator[SimpleNamespace]:
    """A daemon for interactive REPL tests in a short temporary folder (Unix socket paths are limited):
    ``prepare(proc)`` puts files in place before it starts; yields what the REPL tests use (``args``, the
    REPL's ``env``, ``tmp``, ``proc``, its ``socket``, ``embeddings`` and ``outputs`` folders)."""
    from daemon_testing import make_daemon, short_dir

    tmp = short_dir(prefix)
    proc = make_daemon(tmp)
    if prepare is not None:
        prepare(proc)
    proc.env = repl_env(tmp)
    try:
        proc.start(cwd=tmp)
        yield SimpleNamespace(proc=proc, socket=proc.socket, embeddings=proc.embeddings, outputs=proc.outputs,
                              env=proc.env, args=proc.settings.daemon_args(), tmp=tmp)
    finally:
        proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)


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


class Tmux:
    """One REPL (``python -m sdrepl ARGS`` with ``env``, in ``tmp``) in a private tmux server of a
    ``width`` x ``height`` pane; :meth:`screen` is the pane as the user sees it."""

    def __init__(self, tmp: Path, name: str, args: list[str], env: Mapping[str, str], *, width: int = 150,
                 height: int = 40) -> None:
        self.socket = str(tmp / f"tmux-{name}")
        script = tmp / f"{name}.sh"
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items() if k.isidentifier())
        command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "sdrepl", *args])
        script.write_text(f"{exports}cd {shlex.quote(str(tmp))}\nexec {command}\n")
        self.tmux("new-session", "-d", "-s", name, "-x", str(width), "-y", str(height),
                  f"bash {shlex.quote(str(script))}")

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", self.socket, *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p")

    def keys(self, *keys: str, literal: bool = False) -> None:
        self.tmux("send-keys", *(["-l"] if literal else []), *keys)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 90.0) -> str:
        """The first screen ``predicate`` accepts (polled every 50 ms); fails with the last screen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if predicate(screen):
                return screen
            time.sleep(0.05)
        raise AssertionError(f"the screen never matched; it shows:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True, timeout=30)
