"""``!inspect NAME [--log DIR] [--top N]``: parse, ask the daemon, render (``daemon/inspect_handlers.py``).

The JSON result is the daemon's reply as it is (``"vectors": [{"norm", "percentile", "huge", "nearest":
[{"token", "cosine"}]}]``, ``"similarity"``, and ``"checkpoints"`` with ``--log``); the human text is one
line per vector, the similarity matrix when there are several, and per snapshot one line per vector.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdrepl.core.display import visible
from sdrepl.core.errors import UsageError
from sdrepl.repl.actions import Outcome, Started
from sdrepl.repl.parse import Option, split_options, to_int, to_text

if TYPE_CHECKING:
    from sdrepl.repl.session import Session

USAGE = "!inspect NAME [--log DIR] [--top N]"
HELP = ("Per vector of an embedding: the nearest vocabulary tokens by cosine similarity (top 5, or --top N), "
        "its norm and that norm's percentile among the model's token embeddings (vectors above twice the largest "
        "token norm are flagged HUGE: over-trained), and the cosine similarity between its vectors. --log DIR (a "
        "training log folder, as !train writes) adds how each vector moved across the run's snapshots "
        "NAME-STEP: norm, nearest token and cosine to the previous snapshot. SDXL embeddings are measured per "
        "encoder.")

OPTIONS = (
    Option("log", ("--log",), to_text, "DIR"),
    Option("top", ("--top",), to_int(1, 50), "N"),
)


def parse_inspect(args: str) -> dict[str, Any]:
    from sdrepl.repl.commands import _embedding_name

    head, values = split_options(args, OPTIONS, where="!inspect")
    name = _embedding_name(head, USAGE, qualified=True)
    return {"name": name, **values}


async def run_inspect(session: Session, params: dict[str, Any], started: Started) -> Outcome:
    request = dict(params)
    if "log" in request:
        path = Path(os.path.expanduser(request["log"]))
        path = path if path.is_absolute() else Path(session.cwd) / path
        if not path.is_dir():
            raise UsageError(f"!inspect --log {visible(request['log'])}: no such folder ({visible(str(path))})")
        request["log"] = str(path.resolve())
    reply = await session.client.request("inspect", **request)
    return Outcome(reply, render_inspect(reply))


def _near(nearest: list[dict[str, Any]]) -> str:
    return ", ".join(f"{visible(n.get('token', '?'))} {n.get('cosine', 0):.3f}" for n in nearest) or "(zero vector)"


def _vector_lines(report: dict[str, Any], indent: str = "") -> list[str]:
    lines = []
    for i, row in enumerate(report.get("vectors", [])):
        flag = "  HUGE" if row.get("huge") else ""
        lines.append(f"{indent}vector {i}: norm {row.get('norm', 0):.4g} (p{row.get('percentile', 0):.1f}){flag}"
                     f"  nearest: {_near(row.get('nearest', []))}")
    matrix = report.get("similarity") or []
    if len(matrix) > 1:
        lines.append(f"{indent}similarity between vectors:")
        for i, line in enumerate(matrix):
            lines.append(f"{indent}  {i:>2}: " + " ".join(f"{v:6.3f}" for v in line))
    for snap in report.get("checkpoints", []) or []:
        parts = []
        for i, v in enumerate(snap.get("vectors", [])):
            near = v.get("nearest") or {}
            moved = v.get("cosine_to_previous")
            parts.append(f"v{i} norm {v.get('norm', 0):.4g}{' HUGE' if v.get('huge') else ''} "
                         f"~{visible(near.get('token', '-'))}"
                         + (f" moved {1 - moved:.3f}" if isinstance(moved, (int, float)) else ""))
        lines.append(f"{indent}step {snap.get('step', '?')}: " + "; ".join(parts))
    return lines


def render_inspect(reply: dict[str, Any]) -> str:
    vocab = reply.get("vocabulary") or {}
    lines = [f"<{visible(reply.get('name', '?'))}> {visible(reply.get('path', ''))}"]
    if vocab:
        lines.append(f"vocabulary: {vocab.get('tokens', '?')} tokens, median norm {vocab.get('median_norm', 0):.4g}, "
                     f"max {vocab.get('max_norm', 0):.4g}")
    encoders = reply.get("encoders")
    if isinstance(encoders, dict):
        for key, report in encoders.items():
            lines.append(f"{visible(key)}:")
            lines.extend(_vector_lines(report, "  "))
    else:
        lines.extend(_vector_lines(reply))
    for skip in reply.get("skipped", []) or []:
        lines.append(f"skipped {visible(skip.get('path', '?'))}: {visible(skip.get('reason', '?'))}")
    return "\n".join(lines)
