"""Human text for a daemon's ``status`` reply and for durations (uptimes, ETAs).

``sdrepl status`` (daemon side) and the REPL's ``!status``, toolbar and training lines all print these, so
they live here, below both, rather than in ``daemon.lifecycle`` where the REPL had to reach for them.
The functions only read the JSON-shaped reply; nothing here talks to a daemon.
"""

from __future__ import annotations

from typing import Any


def format_duration(seconds: float) -> str:
    """``7s``, ``5m07s``, ``1h05m``: uptimes and ETAs, in ``sdrepl status`` and the REPL alike."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_status(s: dict[str, Any]) -> str:
    """The human summary of a ``status`` result: ``sdrepl status`` and the REPL's ``!status`` print this."""
    model = s.get("model") or {}
    mem = s.get("memory") or {}
    emb = s.get("embeddings") or {}
    queue = s.get("queue") or {}
    job = s.get("training")
    memory = f"rss {mem.get('rss_mb')} MB"
    if mem.get("cuda_allocated_mb") is not None:
        memory += f"; CUDA {mem['cuda_allocated_mb']} MB allocated, {mem.get('cuda_peak_mb')} MB peak"
    keep = s.get("keep_alive_s")
    lines = [
        f"sdrepl daemon {s.get('version')} (protocol {s.get('protocol')}), pid {s.get('pid')}, "
        f"up {format_duration(s.get('uptime_s') or 0)}, socket {s.get('socket')}",
        (f"model:      {model.get('model')} ({model.get('family')}, {model.get('source')}) on {model.get('device')} "
         f"{model.get('dtype')}, native {model.get('native_size')}px, predicts "
         f"{model.get('prediction_type') or 'epsilon'}: {s.get('state')}" if model
         else f"model:      not loaded: {s.get('state')}"),
        f"memory:     {memory}",
        *([_hash_line(s["model_hash"])] if isinstance(s.get("model_hash"), dict) else []),
        f"embeddings: {emb.get('loaded')} loaded, {emb.get('skipped')} skipped in "
        f"{', '.join(emb.get('folders') or [])}",
        f"queue:      {queue.get('pending')} pending, " + (f"running {queue['running']}" if queue.get("running")
                                                           else "idle"),
        "training:   " + (f"{job.get('name')} {job.get('state')} step {job.get('step')}/{job.get('total')}"
                          f" loss {job.get('loss')}" if job else "none"),
        f"clients:    {s.get('clients')}; keep-alive {'forever' if keep is None else f'{keep:g} s'}; "
        f"outputs {s.get('outputs')}" + (" (the daemon's copies; yours are sent to this machine)"
                                         if s.get("remote_client") else ""),
        *([f"listening:  {', '.join('tls://' + a for a in s['listen'])} (TLS, secret required)"]
          if s.get("listen") else []),
        *([("workers:    " + "; ".join(f"{w.get('index')}:{w.get('device')} "
                                        + (f"running {w['running']}" if w.get("running") else "idle")
                                        for w in s["workers"]))] if s.get("workers") else []),
        *([f"ray fleet:  {s['ray'].get('address')}, {s['ray'].get('replicas')} replica(s) on "
           f"{s['ray'].get('device')} ({s['ray'].get('application')})"] if isinstance(s.get("ray"), dict) else []),
    ]
    return "\n".join(lines)


def _hash_line(h: dict[str, Any]) -> str:
    """``model hash: abcdef1234``, or the background hashing's progress (pictures made meanwhile have none)."""
    if h.get("state") == "known":
        return f"model hash: {h.get('hash')}"
    if h.get("state") == "hashing":
        total = h.get("total_mb") or 0
        done = h.get("done_mb") or 0
        percent = f" ({100 * done / total:.0f}%)" if total else ""
        return (f"model hash: computing, {done:g} of {total:g} MB{percent}; pictures made until then carry no "
                "Model hash")
    return f"model hash: unavailable ({h.get('error') or 'no weights file'})"
