"""The ``sdrepl`` command: parses arguments into :class:`Settings` and hands over to one entry point.

``sdrepl`` (the REPL, or a scripted session when stdin is not a terminal), ``sdrepl serve``,
``sdrepl status``, ``sdrepl stop`` and ``sdrepl convert``. A user's mistake ends with one line on
stderr and exit status 2, never a stack trace.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from sdrepl import __version__
from sdrepl.config import add_connect_option, add_serve_options, add_shared_options, settings_from_args
from sdrepl.core.errors import SdreplError

COMMANDS = ("serve", "status", "stop", "convert")
#: One line per subcommand, listed by ``sdrepl --help``.
SUMMARIES = {
    "serve": "run the daemon (foreground; --detach for background)",
    "status": "is a daemon up: model, device, memory, embeddings, queue, training job",
    "stop": "stop the daemon gracefully (a training job saves a checkpoint first)",
    "convert": "convert an embedding file between formats, without a daemon",
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    prog = "sdrepl" if command is None else f"sdrepl {command}"
    descriptions = {
        None: "The sdrepl REPL: interactive on a terminal, a scripted session when stdin is a pipe or file.",
        "serve": "Run the daemon in the foreground (logs to stderr).",
        "status": "Is a daemon up, and what is it doing.",
        "stop": "Stop the daemon gracefully (a training job saves a resumable checkpoint first).",
    }
    epilog = None
    if command is None:
        epilog = ("commands:\n" + "\n".join(f"  sdrepl {name:<8} {SUMMARIES[name]}" for name in COMMANDS)
                  + "\n\n`sdrepl COMMAND --help` for a command's options.")
    parser = argparse.ArgumentParser(prog=prog, description=descriptions[command], epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"sdrepl {__version__}")
    add_shared_options(parser)
    if command in (None, "status", "stop"):
        add_connect_option(parser)
    if command is None:
        parser.add_argument("--json", action="store_true", help="scripted: one JSON object per executed line")
        parser.add_argument("--fail-fast", action="store_true", help="scripted: stop at the first failing line")
        parser.add_argument("--script", default=None, metavar="FILE",
                            help="run the lines of FILE as a scripted session instead of reading stdin")
    elif command == "serve":
        parser.add_argument("--detach", action="store_true", help="run in the background; log beside the socket")
        add_serve_options(parser)
    elif command == "status":
        parser.add_argument("--json", action="store_true", help="print the status as one JSON object")
    return parser


def quiet_libraries() -> None:
    """transformers and diffusers talk at import and load time (missing torchvision, progress bars): noise
    for a REPL user and in a daemon log. A user who sets these variables keeps their own choice."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: Sequence[str] | None = None) -> int:
    quiet_libraries()
    args = list(sys.argv[1:] if argv is None else argv)
    command = args.pop(0) if args and args[0] in COMMANDS else None
    if command == "convert":  # works on files alone: no daemon, none of the shared options
        from sdrepl.core.convert import main as convert_main

        return convert_main(args)
    parser = build_parser(command)
    try:
        ns = parser.parse_args(args)
    except SystemExit as exc:  # argparse already printed the usage error
        return 0 if exc.code in (0, None) else 2
    try:
        settings = settings_from_args(ns)
        if command == "serve":
            from sdrepl.daemon.lifecycle import serve_command

            return serve_command(settings, detach=ns.detach)
        if command == "status":
            from sdrepl.daemon.lifecycle import status_command

            return status_command(settings, as_json=ns.json)
        if command == "stop":
            from sdrepl.daemon.lifecycle import stop_command

            return stop_command(settings)
        from sdrepl.repl.main import run_repl

        return run_repl(settings, json_mode=ns.json, fail_fast=ns.fail_fast, script=ns.script)
    except SdreplError as exc:
        print(f"sdrepl: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
