"""``!mix NEW = EXPR [--overwrite] [--format safetensors|pt]``: embedding arithmetic (``core/mix.py``).

The expression is parsed here first, so a typo is answered at once with its column and what was expected;
the daemon parses it again, evaluates it with the loaded embeddings and the model's token table, and
writes ``NEW`` into the watched embeddings folder.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from sdrepl.core.display import visible
from sdrepl.core.errors import UsageError
from sdrepl.core.mix import parse
from sdrepl.repl.actions import Outcome, Started

if TYPE_CHECKING:
    from sdrepl.repl.session import Session

USAGE = "!mix NEW = EXPR [--overwrite] [--format safetensors|pt]"
HELP = ('Writes a new embedding NEW computed from others, usable at once as <NEW>: weighted sums '
        '(0.5*<a> + 0.5*<b>, <a> - 0.3*<b>), concatenation by juxtaposition (<a> <b>: the vectors of both, so '
        'it costs as many tokens as both), slices of the vectors (<a>[0:2], <a>[-1]), scaling (1.2*<a>, <a>/2), '
        'parentheses, and "text" as a term (the token embeddings of that text, one vector per token). SDXL pairs '
        'are mixed per encoder. An existing name is kept unless --overwrite.')

_OPTION = re.compile(r"\s+(--overwrite|--format\s+(\S+))\s*$")


def parse_mix(args: str) -> dict[str, Any]:
    from sdrepl.repl.commands import _embedding_name

    text = " " + args
    params: dict[str, Any] = {}
    while (match := _OPTION.search(text)) is not None:
        if match.group(1) == "--overwrite":
            params["overwrite"] = True
        else:
            if match.group(2) not in ("safetensors", "pt"):
                raise UsageError(f"!mix --format {visible(match.group(2))}: choose safetensors or pt")
            params["format"] = match.group(2)
        text = text[:match.start()]
    head, eq, expression = text.strip().partition("=")
    if not eq:
        raise UsageError(f"!mix needs NEW = EXPR (no '=' found); usage: {USAGE}")
    params["name"] = _embedding_name(head, USAGE)
    params["expression"] = expression.strip()
    parse(params["expression"])  # the daemon parses again; this answers typos without a round trip
    return {"name": params.pop("name"), "expression": params.pop("expression"), **params}


async def run_mix(session: Session, params: dict[str, Any], started: Started) -> Outcome:
    reply = await session.client.request("mix", **params)
    emb = reply.get("embedding") or {}
    text = (f"mixed <{visible(emb.get('name', params['name']))}>: {emb.get('vectors', '?')} vector(s) "
            f"= {visible(params['expression'])} -> {visible(reply.get('path', '?'))}")
    return Outcome(reply, text)
