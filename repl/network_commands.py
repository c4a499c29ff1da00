"""``!loras``, ``!hypernetworks`` and ``!show lora:NAME``: what the REPL says about LoRA files.

Each executor sends one request and renders its reply; the JSON result is the reply's own shape
(``"loras": [{"name", "path", "format", "rank", "base", "keys", "keys_matched", "hash"}], "skipped"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdrepl.core.display import visible
from sdrepl.repl.actions import Outcome, Started
from sdrepl.repl.render import table

if TYPE_CHECKING:
    from sdrepl.repl.session import Session

#: ``!show lora:NAME`` (and ``!show <lora:NAME>``) shows a LoRA instead of an embedding.
LORA_PREFIX = "lora:"


def _skipped_lines(result: dict[str, Any]) -> list[str]:
    skipped = result.get("skipped") or []
    lines = [f"skipped {len(skipped)} file(s):"] if skipped else []
    lines += [f"  {visible(Path(str(s.get('path'))).name)}: {visible(s.get('reason', 'no reason given'))}"
              for s in skipped]
    return lines + [f"warning: {visible(w)}" for w in result.get("warnings") or []]


def render_loras(result: dict[str, Any]) -> str:
    loras = result.get("loras") or []
    lines: list[str] = []
    if loras:
        rows = [[visible(n.get("name")), visible(n.get("layout") or "-"), str(n.get("rank") or "-"),
                 visible(n.get("base") or "-"), f"{n.get('keys_matched', '?')}/{n.get('keys', '?')}",
                 visible(Path(str(n.get("path") or "-")).name), visible(n.get("hash") or "-")]
                for n in loras]
        lines += table(rows, ["name", "layout", "rank", "base", "keys", "file", "hash"])
        for n in loras:
            for w in n.get("warnings") or []:
                lines.append(f"note {visible(n.get('name'))}: {visible(w)}")
    else:
        folders = ", ".join(map(visible, result.get("folders") or [])) or "the LoRA folder"
        lines.append(f"no LoRAs loaded (put .safetensors LoRA files in {folders})")
    return "\n".join(lines + _skipped_lines(result))


def render_hypernetworks(result: dict[str, Any]) -> str:
    nets = result.get("hypernetworks") or []
    lines: list[str] = []
    if nets:
        rows = [[visible(n.get("name")), "+".join(map(str, n.get("widths") or [])),
                 visible(n.get("activation") or "-"), "-" if n.get("step") is None else str(n["step"]),
                 visible(Path(str(n.get("path") or "-")).name), visible(n.get("hash") or "-")] for n in nets]
        lines += table(rows, ["name", "widths", "activation", "step", "file", "hash"])
    else:
        lines.append("no hypernetworks loaded")
    return "\n".join(lines + _skipped_lines(result))


def render_lora(info: dict[str, Any]) -> str:
    """One LoRA: identity, key accounting per module group, metadata, training tags summarised."""
    lines = [f"{'name:':<14} {visible(info.get('name'))}",
             f"{'file:':<14} {visible(info.get('path'))}",
             f"{'layout:':<14} {visible(info.get('format'))} ({', '.join(map(visible, info.get('algos') or []))})",
             f"{'rank / alpha:':<14} {info.get('rank') or '-'} / {info.get('alpha') if info.get('alpha') is not None else '-'}",
             f"{'base model:':<14} {visible(info.get('base') or '-')}",
             f"{'keys:':<14} {info.get('keys_matched')} of {info.get('keys')} match this model",
             f"{'hash:':<14} {visible(info.get('hash'))} (addnet {visible(info.get('sha256_addnet') or '-')})"]
    if info.get("embeddings"):
        lines.append(f"{'embeddings:':<14} " + ", ".join(f"<{visible(e)}>" for e in info["embeddings"]))
    groups = info.get("groups") or {}
    if groups:
        lines.append("keys per module group:")
        lines += [f"  {visible(g):<28} {n}" for g, n in groups.items()]
    for reason in info.get("unmatched") or []:
        lines.append(f"  unmatched: {visible(reason)}")
    tags = info.get("tags") or []
    if tags:
        lines.append("training tags: " + ", ".join(f"{visible(t['tag'])} ({t['count']})" for t in tags[:12]))
    meta = info.get("metadata") or {}
    for key in sorted(meta)[:40]:
        value = str(meta[key])
        lines.append(f"  {visible(key)}: {visible(value if len(value) <= 100 else value[:97] + '...')}")
    for w in info.get("warnings") or []:
        lines.append(f"warning: {visible(w)}")
    return "\n".join(lines)


async def run_loras(session: Session, _: None, started: Started) -> Outcome:
    reply = await session.client.request("loras")
    result = {"loras": reply.get("loras", []), "skipped": reply.get("skipped", []),
              "warnings": reply.get("warnings", [])}
    return Outcome(result, render_loras({**result, "folders": reply.get("folders")}))


async def run_hypernetworks(session: Session, _: None, started: Started) -> Outcome:
    reply = await session.client.request("hypernetworks")
    result = {"hypernetworks": reply.get("hypernetworks", []), "skipped": reply.get("skipped", []),
              "warnings": reply.get("warnings", [])}
    return Outcome(result, render_hypernetworks(result))


async def run_show_lora(session: Session, name: str, started: Started) -> Outcome:
    reply = await session.client.request("show_lora", name=name)
    return Outcome({"lora": reply}, render_lora(reply))
