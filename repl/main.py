"""``sdrepl`` without a subcommand: find or start the daemon, then run an interactive or scripted session.

Interactive when stdin is a terminal; scripted when it is not, when ``--script FILE`` is given, or with
``--json`` (a JSON stream is for programs, even typed on a terminal). A user's mistake ends with one line
and no traceback; an internal error ends with one line that says where the log with the details is.
Exit status: whatever the session says, 2 when no daemon can be reached or started (interface.md),
130 after Ctrl-C outside a prompt.
"""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import sys
from pathlib import Path
from typing import Any, TextIO

from sdrepl.core.display import VisibleFormatter
from sdrepl.core.errors import SdreplError

log = logging.getLogger("sdrepl.repl")


def log_path() -> Path:
    """``repl.log`` in the user state dir (``~/.local/state/sdrepl/repl.log`` on Linux)."""
    from platformdirs import user_state_dir

    return Path(user_state_dir("sdrepl")) / "repl.log"


class PrivateLogHandler(logging.handlers.RotatingFileHandler):
    """A rotating log file opened as the daemon opens its own (``runtime_dir.open_private``): never through
    a symbolic link, only a regular file of the user's, mode 0600. A link planted at ``repl.log`` (towards
    ``~/.bashrc``, say) would otherwise have every log line appended to its target."""

    def _open(self) -> TextIO:  # type: ignore[override]
        import os

        from sdrepl.daemon.runtime_dir import open_private

        fd = open_private(Path(self.baseFilename), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        return os.fdopen(fd, "a", encoding=self.encoding or "utf-8", errors=self.errors)


def setup_logging() -> Path | None:
    """Send the client side's log to a file, never to the terminal (it would tear the prompt)."""
    logger = logging.getLogger("sdrepl")
    path = log_path()
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename) == path:
            return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = PrivateLogHandler(path, maxBytes=1_000_000, backupCount=2, encoding="utf-8")
    except (OSError, SdreplError):  # unwritable, or a link / not the user's file: run without a log
        return None
    handler.setFormatter(VisibleFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.propagate = False
    return path


def run_repl(settings: Any, *, json_mode: bool = False, fail_fast: bool = False,
             script: str | Path | None = None) -> int:
    """The ``sdrepl`` entry point (called by cli.py with resolved settings); returns the exit status."""
    where = setup_logging()
    scripted = script is not None or json_mode or not sys.stdin.isatty()
    try:
        lines = open_script(script) if script is not None else sys.stdin
    except SdreplError as exc:
        print(f"sdrepl: {exc}", file=sys.stderr)
        return 2
    from sdrepl.daemon.client import DaemonUnavailable

    try:
        ensure_daemon_blocking(settings)
        return asyncio.run(_run(settings, lines, scripted=scripted, json_mode=json_mode, fail_fast=fail_fast))
    except DaemonUnavailable as exc:
        print(unreachable(settings, exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except SdreplError as exc:
        print(f"sdrepl: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        log.exception("the REPL stopped on an internal error")
        details = (f"details in {where}" if where else
                   f"no details: {log_path()} could not be opened (not writable, or a symbolic link)")
        print(f"sdrepl: internal error: {type(exc).__name__}: {exc} ({details})", file=sys.stderr)
        return 1
    finally:
        if script is not None and lines is not sys.stdin:
            lines.close()


def open_script(script: str | Path) -> TextIO:
    from sdrepl.core.errors import UsageError

    path = Path(script).expanduser()
    try:
        return path.open(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--script {script}: no such file; give the path of a file of REPL lines") from None
    except IsADirectoryError:
        raise UsageError(f"--script {script}: is a folder; give the path of a file of REPL lines") from None
    except OSError as exc:
        raise UsageError(f"--script {script}: cannot be read ({exc.strerror})") from None


def unreachable(settings: Any, exc: BaseException) -> str:
    if settings.connect is not None:  # a remote daemon is never started from here
        return f"sdrepl: {exc}"
    return f"sdrepl: no daemon answers at {settings.socket} and none could be started: {exc}"


async def _run(settings: Any, lines: TextIO, *, scripted: bool, json_mode: bool, fail_fast: bool) -> int:
    from sdrepl.repl.connection import Connection

    name = "script" if scripted else "repl"
    client = Connection(settings, client_name=name, connect=lambda: connect(settings, client_name=name))
    client.on_status = print_status
    await client.attach(await connect(settings, client_name=name))
    try:
        if scripted:
            from sdrepl.repl.scripted import run_script

            return await run_script(client, lines, json_mode=json_mode, fail_fast=fail_fast,
                                    out=sys.stdout, err=sys.stderr)
        from sdrepl.repl.interactive import run_interactive

        return await run_interactive(client, settings)
    finally:
        try:
            await client.close()
        except Exception:
            log.exception("closing the daemon connection failed")


def ensure_daemon_blocking(settings: Any) -> None:
    """Start the daemon (and wait for it) before the event loop starts.

    Outside the loop, Ctrl-C during a long model load ends cleanly instead of waiting on a worker thread.
    """
    from sdrepl.daemon.lifecycle import ensure_daemon

    ensure_daemon(settings, on_status=print_status, timeout=300)


async def connect(settings: Any, *, client_name: str) -> Any:
    """Connect to the daemon on ``settings.socket``, saying so when it serves another model than asked."""
    from sdrepl.daemon.client import DaemonClient

    client = await DaemonClient.connect(settings.target, timeout=10.0, events=True, client=client_name)
    if client.remote:  # pictures come back as bytes and land in this machine's outputs folder
        client.local_outputs = settings.outputs
        return client
    serving = (client.hello.get("model") or {}).get("model")
    if serving is not None and not same_model(serving, settings.model):
        print_status(f"the daemon on {settings.socket} serves model {serving}, not {settings.model}; "
                     "`!model NAME` switches it, or run `sdrepl stop` first, or use another --socket")
    try:
        from sdrepl.repl.mismatch import option_notices

        for line in option_notices(settings, await client.request("status")):
            print_status(line)
    except Exception as exc:  # the notices are a courtesy: a daemon that cannot say its status still serves
        log.warning("could not compare the daemon's options: %s", exc)
    return client


def same_model(serving: str, asked: str) -> bool:
    """Whether two ``--model`` values name the same model (paths compared after resolving)."""
    if serving == asked:
        return True
    a, b = Path(serving).expanduser(), Path(asked).expanduser()
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def print_status(text: str) -> None:
    """The daemon's start-up news (``loading model tiny ...``), on stderr so scripted stdout stays clean."""
    print(f"sdrepl: {text}", file=sys.stderr, flush=True)
