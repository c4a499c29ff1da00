"""One LoRA file indexed: layout, rank, alpha, base model, key accounting and metadata, from its header.

:func:`index_lora` reads the header (:mod:`.container`), recognises the layout (:mod:`.layouts`),
matches it against the model (:mod:`.matching`) and returns a :class:`LoraInfo`, or raises
:class:`NetworkError` with the reason the file is skipped: no layout, a refused algorithm, a rank
mismatch, a file for another base model, or no key that matches a module (``0 of 256 keys match this
model``). Tensors are not read, except the few bytes of per-module alphas and the small bundled
embedding vectors.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdrepl.core.embedding import CLIP_G, CLIP_L, SINGLE, EmbeddingData
from sdrepl.core.errors import NetworkError
from sdrepl.core.networks.container import Header, addnet_hash, read_header, read_tensors
from sdrepl.core.networks.layouts import Parsed, parse_keys
from sdrepl.core.networks.matching import FAMILY_LABEL, Match, guess_base, match
from sdrepl.core.networks.modules import ModelSignature

#: Metadata values longer than this are cut in listings (``ss_tag_frequency`` can be megabytes).
MAX_META_VALUE = 4096
_MAX_META_KEYS = 200


@dataclass
class LoraInfo:
    """What the library knows of one LoRA file without its tensors."""

    path: Path
    container: str
    parsed: Parsed
    matched: Match
    base: str | None
    keys: int
    alpha: float | None
    hash: str  # full hex (addnet hash, or the file's sshs_model_hash)
    metadata: dict[str, str] = field(default_factory=dict)
    tag_summary: list[tuple[str, int]] = field(default_factory=list)
    embeddings: dict[str, EmbeddingData] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    @property
    def rank(self) -> int | None:
        return self.parsed.rank

    @property
    def layout(self) -> str:
        return self.parsed.layout

    @property
    def format(self) -> str:
        return f"{self.container}/{self.parsed.layout}"

    @property
    def keys_matched(self) -> int:
        return self.matched.keys_matched + sum(len(self.parsed.embeddings[n]) for n in self.embeddings)

    @property
    def short_hash(self) -> str:
        return self.hash[:12]


def _alphas(path: Path, header: Header, parsed: Parsed) -> float | None:
    keys = [g.keys["alpha"] for g in parsed.groups if "alpha" in g.keys]
    if keys:
        values = read_tensors(path, header, keys)
        for key, value in values.items():
            if value.numel() != 1 or not bool(torch.isfinite(value.float()).all()):
                raise NetworkError(path, f"alpha {key!r} must be one finite number, found shape {list(value.shape)}")
        counts = Counter(round(float(v.float().reshape(-1)[0]), 6) for v in values.values())
        return counts.most_common(1)[0][0]
    fixed = [g.alpha for g in parsed.groups if g.alpha is not None]
    return Counter(fixed).most_common(1)[0][0] if fixed else None


def _embeddings(path: Path, header: Header, parsed: Parsed, sig: ModelSignature) -> tuple[dict[str, EmbeddingData], list[str]]:
    """Bundled embeddings that fit the model's encoders (others are reported, not loaded)."""
    found: dict[str, EmbeddingData] = {}
    notes: list[str] = []
    widths = {SINGLE: sig.widths.get("te")} if sig.family != "sdxl" else {CLIP_L: sig.widths.get("te"),
                                                                           CLIP_G: sig.widths.get("te2")}
    for name, keys in parsed.embeddings.items():
        tensors = read_tensors(path, header, list(keys.values()))
        vectors = {}
        for enc, key in keys.items():
            t = tensors[key].float()
            vectors[enc] = t.reshape(1, -1) if t.dim() == 1 else t.reshape(-1, t.shape[-1])
        have = {k: int(v.shape[1]) for k, v in vectors.items()}
        if have != widths or any(not bool(torch.isfinite(v).all()) for v in vectors.values()):
            notes.append(f"bundled embedding {name!r} ({have}) does not fit this model's encoders {widths}")
            continue
        found[name] = EmbeddingData(vectors, format=f"{header.container}/lora-bundle", inner_name=name,
                                    name_from_file=True)
    return found, notes


def _metadata(meta: dict[str, str]) -> tuple[dict[str, str], list[tuple[str, int]]]:
    """Bounded metadata, plus the most frequent training tags of ``ss_tag_frequency``."""
    tags: Counter[str] = Counter()
    raw = meta.get("ss_tag_frequency")
    if raw:
        try:
            folders = json.loads(raw)
            for counts in (folders.values() if isinstance(folders, dict) else ()):
                if isinstance(counts, dict):
                    for tag, n in counts.items():
                        if isinstance(n, (int, float)):
                            tags[str(tag).strip()[:80]] += int(n)
        except ValueError:
            pass
    kept = {}
    for key in sorted(meta)[:_MAX_META_KEYS]:
        value = meta[key]
        kept[key[:120]] = value if len(value) <= MAX_META_VALUE else value[:MAX_META_VALUE] + f"... ({len(value)} chars)"
    return kept, tags.most_common(20)


def _peft_config(path: Path) -> dict | None:
    config = path.parent / "adapter_config.json"
    if not config.is_file():
        return None
    try:
        if config.stat().st_size > 1 << 20:
            return None
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


#: addnet hashes by (path, size, mtime_ns): indexing again against another model reads no data bytes.
_HASHES: dict[tuple[str, int, int], str] = {}
_HASHES_MAX = 10_000


def _cached_hash(path: Path, header: Header) -> str:
    import os

    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    found = _HASHES.get(key)
    if found is None:
        if len(_HASHES) >= _HASHES_MAX:
            _HASHES.clear()
        found = _HASHES[key] = addnet_hash(path, header)
    return found


def index_lora(path: Path, sig: ModelSignature, hash_value: str | None = None) -> LoraInfo:
    """Index one file against a model (see module docstring)."""
    path = Path(path)
    header = read_header(path)
    parsed = parse_keys(header.shapes, header.metadata, _peft_config(path))
    if parsed.problem is not None:
        raise NetworkError(path, f"{parsed.problem}; not loaded")
    base = guess_base(parsed, header.shapes, header.metadata)
    if base is not None and base != sig.family:
        raise NetworkError(path, f"a LoRA for {FAMILY_LABEL[base]}, but the model is {FAMILY_LABEL[sig.family]}: "
                                 "skipped (use it with a model of its family)")
    matched = match(parsed, header.shapes, header.metadata, sig)
    total = len(header.shapes)
    embeddings, notes = _embeddings(path, header, parsed, sig)
    if not matched.targets and not embeddings:
        example = f" (e.g. {matched.unmatched[0]})" if matched.unmatched else ""
        raise NetworkError(path, f"0 of {total} keys match this model{example}: it was made for another model or "
                                 "its key names are malformed")
    alpha = _alphas(path, header, parsed)
    meta, tags = _metadata(header.metadata)
    digest = header.metadata.get("sshs_model_hash") or hash_value or _cached_hash(path, header)
    warnings = list(notes)
    unmatched_keys = total - matched.keys_matched - sum(len(parsed.embeddings[n]) for n in embeddings)
    if unmatched_keys:
        reasons = "; ".join(matched.unmatched[:2] + [f"{k!r} not understood" for k in parsed.unknown[:2]])
        warnings.append(f"{unmatched_keys} of {total} keys match no module of this model and are ignored ({reasons})")
    return LoraInfo(path, header.container, parsed, matched, base or sig.family, total, alpha, digest, meta, tags,
                    embeddings, tuple(warnings))


def describe_lora(info: LoraInfo, name: str, qualified: str) -> dict[str, Any]:
    """The JSON-safe summary used by ``!loras`` and the protocol."""
    return {
        "name": name,
        "qualified": qualified,
        "path": str(info.path),
        "format": info.format,
        "layout": info.layout,
        "algos": info.parsed.algos,
        "rank": info.rank,
        "alpha": info.alpha,
        "base": FAMILY_LABEL.get(info.base or "", info.base),
        "keys": info.keys,
        "keys_matched": info.keys_matched,
        "hash": info.short_hash,
        "embeddings": sorted(info.embeddings),
        "warnings": list(info.warnings),
    }


