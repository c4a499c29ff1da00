"""Human renderings of results: plain text, no colours, one line per fact, aligned tables.

Scripted sessions print these verbatim and the interactive REPL prints them above the prompt, so they
must read well in a pipe too: no escape codes, no widths that depend on the terminal. Every function
takes the JSON-shaped result a line produced (daemon replies pass through unchanged) and returns text.
Every value that came from a file or a folder (names, paths, reasons, metadata) goes in through
:func:`~sdrepl.core.display.visible`, so it can neither control the terminal nor fake a line.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sdrepl.core.display import visible
from sdrepl.core.status_text import format_duration

SEP = " · "


def budget(tokens: dict[str, Any] | None) -> str:
    """``12/75`` from a tokens result (``?`` when the daemon sent none)."""
    if not tokens:
        return "?"
    return f"{tokens.get('count', '?')}/{tokens.get('limit', '?')}"


def display_path(path: str, cwd: Path | None) -> str:
    """A path as the user would type it: relative to the session folder when it lies inside it."""
    if cwd is None:
        return visible(path)
    try:
        rel = os.path.relpath(path, cwd)
    except ValueError:
        return visible(path)
    return visible(path if rel.startswith("..") else rel)


def generation(result: dict[str, Any], cwd: Path | None = None) -> str:
    """One line per picture: ``outputs/.../00001-1234.png  (seed 1234, 12/75 tokens, 0.8 s)``."""
    tokens = result.get("tokens") or {}
    facts = [f"{budget(tokens)} tokens"]
    negative = tokens.get("negative")
    if negative and negative.get("count"):
        facts.append(f"neg {budget(negative)}")
    elapsed = result.get("total_s", result.get("elapsed_s"))  # total_s includes the time spent queued
    if isinstance(elapsed, (int, float)):
        queued = result.get("queued_s")
        waited = f" incl. {queued:.1f} s queued" if isinstance(queued, (int, float)) and queued >= 0.1 else ""
        facts.append(f"{elapsed:.1f} s{waited}")
    bare = list(tokens.get("bare") or []) + list((negative or {}).get("bare") or [])
    if bare:
        facts.append("bare words as embeddings: " + ", ".join(map(visible, bare)))
    facts += img2img_facts(result)
    lines = []
    for image in result.get("images") or []:
        lines.append(f"{display_path(str(image.get('path')), cwd)}  (seed {image.get('seed')}, {', '.join(facts)})")
    return "\n".join(lines) or "no pictures were made"


def img2img_facts(result: dict[str, Any]) -> list[str]:
    """``img2img 0.5 from fox.png`` / ``hires 2x latent -> 1024x1024`` for a generation's line."""
    facts = []
    if result.get("init") is not None:
        facts.append(f"img2img {result.get('strength')} from {visible(Path(str(result['init'])).name)}")
    hires = result.get("hires")
    if isinstance(hires, dict):
        facts.append(f"hires {hires.get('scale'):g}x {hires.get('upscaler')} -> {hires.get('width')}x"
                     f"{hires.get('height')}")
    return facts


def tokens(result: dict[str, Any]) -> str:
    """``tokens 12/75 · neg 0/75 · embeddings: bad-hands-5``, then chunks and bare-word notes."""
    negative = result.get("negative") or {}
    parts = [f"tokens {budget(result)}", f"neg {budget(negative)}"]
    names = list(result.get("embeddings") or [])
    neg_names = [n for n in negative.get("embeddings") or [] if n not in names]
    if names or neg_names:
        parts.append("embeddings: " + ", ".join(map(visible, names + neg_names)))
    loras = result.get("loras") or []
    if loras:  # extra-network tags cost no tokens: shown beside the count, with their weights
        parts.append("loras: " + ", ".join(
            f"{visible(n.get('name'))}:{n.get('te'):g}" + ("" if n.get("te") == n.get("unet") else f"/{n.get('unet'):g}")
            for n in loras))
    lines = [SEP.join(parts)]
    if result.get("changes") or negative.get("changes"):
        lines.append(f"  the prompt changes during sampling ({result.get('steps', '?')} steps); the count is the "
                     "largest any step uses")
    parts = result.get("parts") or []
    for i, part in enumerate(parts, start=1):
        label = f"AND part {i} (weight {part.get('weight', 1.0):g})" if len(parts) > 1 else \
            f"weight {part.get('weight', 1.0):g} (a trailing :number is the prompt's weight, as in A1111)"
        lines.append(f"  {label}: {budget(part)}  {visible(str(part.get('text', '')).strip())}")
        lines += _schedule_lines(part, "    ")
    if not result.get("parts"):
        lines += _schedule_lines(result, "  ")
    lines += _schedule_lines(negative, "  neg ")
    for label, side in (("", result), ("neg ", negative)):
        chunk_texts = side.get("chunk_texts") or []
        if len(chunk_texts) > 1:
            for i, text in enumerate(chunk_texts, start=1):
                lines.append(f"  {label}chunk {i}: {visible(text)}")
        if side.get("bare"):
            lines.append(f"  {label}bare words taken as embeddings: " + ", ".join(map(visible, side["bare"])))
    return "\n".join(lines)


def _schedule_lines(side: dict[str, Any], indent: str) -> list[str]:
    """``steps 1-11: a fantasy landscape  (4/75)`` per distinct text of a schedule that changes."""
    lines = []
    for entry in side.get("schedule") or []:
        ranges = [f"{a}" if a == b else f"{a}-{b}" for a, b in entry.get("steps") or []]
        shown = ", ".join(ranges[:8]) + (f", ... ({len(ranges)} runs)" if len(ranges) > 8 else "")
        lines.append(f"{indent}steps {shown}: {visible(entry.get('text', ''))}  ({budget(entry)})")
    return lines


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> list[str]:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    out = []
    for row in [header, *rows]:
        cells = [str(c).ljust(widths[i]) if i < len(row) - 1 else str(c) for i, c in enumerate(row)]
        out.append("  ".join(cells).rstrip())
    return out


def _short_hash(value: Any) -> str:
    """The 12 hex digits A1111 prints in ``TI hashes``, so a row can be matched against a picture's metadata."""
    return str(value)[:12] if value else "-"


def embeddings(result: dict[str, Any]) -> str:
    """The library: aligned table of loaded embeddings, then skipped files with reasons, then warnings."""
    loaded = result.get("embeddings") or []
    lines: list[str] = []
    if loaded:
        shared = _shared_names(loaded)
        rows = [
            [visible(e.get("qualified") if str(e.get("name")).lower() in shared and e.get("qualified")
                     else e.get("name")), str(e.get("vectors", "?")), _width(e.get("width")),
             visible(e.get("format") or "-"),
             visible(Path(str(e.get("source"))).name + " (LoRA)" if e.get("source") else Path(str(e.get("path") or "-")).name)
             + _copies(e),
             "-" if e.get("step") is None else visible(e.get("step")), visible(_short_hash(e.get("hash")))]
            for e in sorted(loaded, key=lambda e: str(e.get("name")).lower())
        ]
        lines += table(rows, ["trigger", "vectors", "width", "format", "file", "step", "hash"])
        lines += [f"<{visible(e.get('name'))}> is also in: " + ", ".join(_file_name(f) for f in e["files"][1:])
                  for e in sorted(loaded, key=lambda e: str(e.get("name")).lower()) if _copies(e)]
    else:
        lines.append("no embeddings loaded (put .pt/.safetensors/.bin files in the embeddings folder)")
    skipped = result.get("skipped") or []
    if skipped:
        lines.append(f"skipped {len(skipped)} file(s):")
        lines += [f"  {_file_name(s.get('path'))}: {visible(s.get('reason', 'no reason given'))}" for s in skipped]
    lines += [f"warning: {visible(w)}" for w in result.get("warnings") or []]
    return "\n".join(lines)


def _copies(entry: dict[str, Any]) -> str:
    """`` (+1 copy)`` for an embedding held by several identical files (a ``!convert`` copy), else ""."""
    extra = len(entry.get("files") or []) - 1
    return f" (+{extra} {'copy' if extra == 1 else 'copies'})" if extra > 0 else ""


def _file_name(path: Any) -> str:
    return visible(Path(str(path)).name)


def _shared_names(loaded: list[dict[str, Any]]) -> set[str]:
    """Triggers two loaded files share: those rows show ``folder/name`` (what reaches each one)."""
    seen: dict[str, int] = {}
    for emb in loaded:
        key = str(emb.get("name")).lower()
        seen[key] = seen.get(key, 0) + 1
    return {key for key, count in seen.items() if count > 1}


def _width(width: Any) -> str:
    if isinstance(width, (list, tuple)):
        return "+".join(str(w) for w in width)
    if isinstance(width, dict):
        return "+".join(f"{visible(k)}:{visible(v)}" for k, v in width.items())
    return "?" if width is None else visible(width)


def show(embedding: dict[str, Any]) -> str:
    """One embedding, one ``key: value`` line per field (norms rounded, so the line stays readable)."""
    lines = []
    for key, value in embedding.items():
        if key == "norms" and isinstance(value, list):
            value = ", ".join(f"{v:.4g}" if isinstance(v, (int, float)) else str(v) for v in value)
        elif key == "width":
            value = _width(value)
        elif key == "mtime" and isinstance(value, (int, float)):
            value = datetime.datetime.fromtimestamp(value).isoformat(sep=" ", timespec="seconds")
        elif key == "size" and isinstance(value, int):
            value = f"{value} bytes"
        elif isinstance(value, (list, tuple)):
            value = ", ".join(map(visible, value)) or None
        lines.append(f"{visible(key) + ':':<12} {'-' if value is None else visible(value)}")
    return "\n".join(lines)


def job(job: dict[str, Any] | None) -> str:
    """A training job in one line: name, state, step/total, loss, lr, speed, eta, file."""
    if not job:
        return "no training job"
    parts = [f"training {visible(job.get('name', '?'))}: {visible(job.get('state', '?'))}",
             f"step {job.get('step', '?')}/{job.get('total', '?')}"]
    for key, fmt in (("loss", "loss {:.4g}"), ("lr", "lr {:g}"), ("it_s", "{:.2f} it/s")):
        if isinstance(job.get(key), (int, float)):
            parts.append(fmt.format(job[key]))
    if isinstance(job.get("eta_s"), (int, float)) and job.get("state") == "running":
        parts.append(f"eta {format_duration(job['eta_s'])}")
    if job.get("path"):
        parts.append(f"-> {visible(job['path'])}")
    if job.get("error"):
        parts.append(f"error: {visible(job['error'])}")
    return SEP.join(parts)


def model(model: dict[str, Any]) -> str:
    """``tiny (sd1, cpu fp32, native 64px)`` from a status ``model`` object."""
    if not model:
        return "not loaded"
    native = model.get("native_size")
    facts = [str(model.get("family") or "?"), " ".join(str(model[k]) for k in ("device", "dtype") if model.get(k))]
    if native:
        facts.append(f"native {native}px")
    return f"{visible(model.get('model', '?'))} ({', '.join(visible(f) for f in facts if f)})"


def loss_trend(job: dict[str, Any] | None) -> str:
    """``!train status``'s second line: a sparkline of the recent loss (protocol v2 ``recent_loss``) and
    where ``loss.png`` is; "" before the first logged step."""
    from sdrepl.core.training.loss_plot import sparkline

    values = [v for v in (job or {}).get("recent_loss") or [] if isinstance(v, (int, float))]
    line = sparkline(values)
    if not line:
        return ""
    text = f"\nloss {line} (last {len(values)} steps, {min(values):.4g}..{max(values):.4g})"
    if (job or {}).get("log_dir"):
        text += f"; plot: {visible(os.path.join(str(job['log_dir']), 'loss.png'))}"
    return text


def job_notes(job: dict[str, Any] | None) -> str:
    """The decisions a job took that the user should know (``--batch`` capped, ...), one ``note:`` line each."""
    return "".join(f"\nnote: {note}" for note in (job or {}).get("notes") or [])


def trained(result: dict[str, Any]) -> str:
    emb = result.get("embedding") or {}
    loss = emb.get("final_loss")
    loss_text = f", final loss {loss:.4g}" if isinstance(loss, (int, float)) else ""
    return (f"trained {visible(emb.get('name', '?'))}: {emb.get('steps', '?')} steps{loss_text} -> "
            f"{visible(emb.get('path', '?'))}")


def change(result: dict[str, Any]) -> str:
    """What a rescan changed, one line per kind of change; ``no changes`` when nothing moved."""
    moved = result.get("change") or {}
    lines = []
    for key in ("added", "updated", "removed"):
        names = moved.get(key) or []
        if names:
            lines.append(f"{key}: " + ", ".join(map(visible, names)))
    from sdrepl.repl.state import copy_lines  # the same lines the watcher's notices use

    lines += copy_lines(moved)
    for item in moved.get("skipped") or []:
        lines.append(f"skipped {_file_name(item.get('path'))}: {visible(item.get('reason', 'no reason given'))}")
    lines += [f"no longer skipped: {_file_name(p)}" for p in moved.get("unskipped") or []]
    lines += [f"warning: {visible(w)}" for w in moved.get("warnings") or []]
    for kind in ("loras", "hypernetworks"):  # the LoRA and hypernetwork folders are rescanned too
        other = change({"change": result.get(kind)}) if result.get(kind) else ""
        if other and other != "rescanned: no changes":
            lines += [f"{kind}: {line}" for line in other.splitlines()]
    return "\n".join(lines) or "rescanned: no changes"


def preprocess(result: dict[str, Any]) -> str:
    lines = [f"wrote {result.get('written', 0)} picture(s) to {visible(result.get('dst', '?'))}"]
    skipped = result.get("skipped") or []
    lines += [f"  skipped {_file_name(s.get('path'))}: {visible(s.get('reason', 'no reason given'))}"
              for s in skipped]
    return "\n".join(lines)


def history(entries: Sequence[tuple[int, str]]) -> str:
    if not entries:
        return "no matching history"
    width = len(str(entries[-1][0]))
    return "\n".join(f"{n:>{width}}  {text.replace(chr(10), ' ⏎ ')}" for n, text in entries)


def defaults(values: dict[str, Any]) -> str:
    width = max(len(k) for k in values)
    return "\n".join(f"{k:<{width}}  {format_value(k, v)}" for k, v in values.items())


def format_value(key: str, value: Any) -> str:
    """How ``!set`` shows a default: ``random`` for no seed, ``native`` for no size, quotes for text."""
    if key == "seed" and value is None:
        return "random"
    if key == "size" and value is None:
        return "native"
    if key == "negative":
        return repr(value) if value == "" else str(value)
    if key in ("emphasis", "comma_padding_backtrack") and value is None:
        return "the daemon's (--emphasis, --comma-padding-backtrack)"
    return str(value)
