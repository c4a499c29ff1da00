"""How the library's view is derived from what was read of each file.

The library (``library.py``) walks folders and reads files into records; this module turns a set of
records into what users see: which embeddings fit the model (and why others are skipped), which trigger
and qualified name reaches each file when names collide, the warnings, and the change between two views.
It is pure: no I/O, no locks, so every rule here is testable on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch

from sdrepl.core.embedding import CLIP_G, CLIP_L, SINGLE, Embedding, EmbeddingData, Skipped
from sdrepl.core.errors import IncompatibleEmbedding
from sdrepl.core.formats import decide_trigger
from sdrepl.core.formats.layouts import ignored_inner_name


def incompatibility(data: EmbeddingData, widths: dict[str, int], model_label: str) -> str | None:
    """Why ``data`` does not fit a model with these encoder widths (spec section 3), or None if it fits."""
    have = data.widths
    if have == widths:
        return None
    if set(have) == {SINGLE}:
        width = have[SINGLE]
        if SINGLE in widths:
            return f"{width}-wide embedding, model expects {widths[SINGLE]} ({model_label})"
        if widths.get(CLIP_L) == width:
            return (f"{width}-wide single-encoder (SD 1.x) embedding on an {model_label} model: skipped, as A1111 "
                    f"does; {model_label} embeddings carry clip_l and clip_g vectors")
        return f"{width}-wide embedding, model expects " + " + ".join(f"{k} {w}" for k, w in widths.items())
    if set(have) == {CLIP_L, CLIP_G}:
        pair = f"clip_l {have[CLIP_L]} + clip_g {have[CLIP_G]}"
        if SINGLE in widths:
            return f"SDXL embedding ({pair}), model expects one {widths[SINGLE]}-wide encoder ({model_label})"
        return f"{pair} embedding, model expects " + " + ".join(f"{k} {w}" for k, w in widths.items())
    return f"embedding for encoders {have}, model has {widths} ({model_label})"


def check_compatible(path: Path, data: EmbeddingData, widths: dict[str, int], model_label: str) -> None:
    """Raise IncompatibleEmbedding (with the reason) when ``data`` does not fit the model."""
    reason = incompatibility(data, widths, model_label)
    if reason is not None:
        raise IncompatibleEmbedding(path, reason)


@dataclass
class LibraryChange:
    """What one mutation changed: names by which embeddings are reachable, new skips, new warnings."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    unskipped: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {
            "added": list(self.added),
            "updated": list(self.updated),
            "removed": list(self.removed),
            "skipped": [s.describe() for s in self.skipped],
            "unskipped": [str(p) for p in self.unskipped],
            "warnings": list(self.warnings),
        }

    def __bool__(self) -> bool:
        return any((self.added, self.updated, self.removed, self.skipped, self.unskipped, self.warnings))


@dataclass(frozen=True)
class Record:
    """One file as last read. ``ignored`` files (previews, empty files) are kept so they are not re-read."""

    path: Path
    root: int
    rel: PurePosixPath
    size: int
    mtime_ns: int
    data: EmbeddingData | None = None
    error: str | None = None
    ignored: bool = False
    sha256: str = ""

    def order(self) -> tuple:
        """Collision precedence: earlier folder, then shallower, then path (case-insensitive, then exact)."""
        return (self.root, len(self.rel.parts), str(self.rel).casefold(), str(self.rel))


@dataclass(frozen=True)
class LibraryState:
    records: dict[Path, Record] = field(default_factory=dict)
    dirs: dict[str, Path] = field(default_factory=dict)  # real dir -> the path it was walked as
    walk_warnings: tuple[str, ...] = ()
    loaded: tuple[Embedding, ...] = ()
    by_trigger: dict[str, Embedding] = field(default_factory=dict)
    by_qualified: dict[str, Embedding] = field(default_factory=dict)
    reach: dict[Path, str] = field(default_factory=dict)  # path -> the name that reaches it
    skipped: tuple[Skipped, ...] = ()
    warnings: tuple[str, ...] = ()


def _name_options(rec: Record, trigger: str, roots: list[Path]) -> list[str]:
    """Qualified names from least to most specific; a collision moves the later claimant down this list."""
    parent = str(rec.rel.parent)
    first = trigger if parent == "." else f"{parent}/{trigger}"
    return [first, str(rec.rel), f"{roots[rec.root].name}/{rec.rel}", str(rec.path)]


def _qualify(claims: list[tuple[Record, str]], roots: list[Path]) -> dict[Path, str]:
    """A unique (case-insensitive) qualified name per record; earlier records keep the simpler names."""
    options = {rec.path: _name_options(rec, trigger, roots) for rec, trigger in claims}
    level = dict.fromkeys(options, 0)
    while True:
        taken: dict[str, list[Path]] = {}
        for rec, _ in claims:
            taken.setdefault(options[rec.path][level[rec.path]].lower(), []).append(rec.path)
        moved = False
        for paths in taken.values():
            for path in paths[1:]:
                if level[path] < len(options[path]) - 1:
                    level[path] += 1
                    moved = True
        if not moved:
            return {path: options[path][level[path]] for path in options}


def _same_vectors(records: list[Record]) -> bool:
    first = records[0].data.vectors
    return all(
        rec.data.vectors.keys() == first.keys() and all(torch.equal(rec.data.vectors[k], first[k]) for k in first)
        for rec in records[1:]
    )


def build_state(records, dirs, walk_warnings, widths, label, roots) -> LibraryState:
    skipped: list[Skipped] = []
    claims: list[tuple[Record, str]] = []
    notes: list[str] = []  # inner names not used as triggers
    for rec in sorted(records.values(), key=Record.order):
        if rec.ignored:
            continue
        reason = rec.error if rec.error is not None else incompatibility(rec.data, widths, label)
        if reason is not None:
            skipped.append(Skipped(rec.path, reason))
        else:
            claims.append((rec, decide_trigger(rec.path, rec.data)))
            renamed = ignored_inner_name(rec.path, rec.data)
            if renamed is not None:
                notes.append(renamed)
    qualified = _qualify(claims, roots)
    groups: dict[str, list[tuple[Record, str]]] = {}
    for rec, trigger in claims:
        groups.setdefault(trigger.lower(), []).append((rec, trigger))
    by_trigger, by_qualified, reach, loaded, warnings = {}, {}, {}, [], []
    for key in sorted(groups):
        group = groups[key]
        note = ()
        if len(group) > 1:
            same = " (identical vectors)" if _same_vectors([rec for rec, _ in group]) else ""
            others = "; ".join(f"{rec.path} is reachable as <{qualified[rec.path]}>" for rec, _ in group[1:])
            note = (f"{len(group)} files claim the trigger '{group[0][1]}'{same}: using {group[0][0].path}; {others}",)
            warnings.extend(note)
        for position, (rec, trigger) in enumerate(group):
            emb = Embedding(trigger, qualified[rec.path], rec.path, rec.data, rec.sha256, rec.size, rec.mtime_ns, note)
            if position == 0:
                by_trigger[key] = emb
            by_qualified[emb.qualified.lower()] = emb
            reach[rec.path] = trigger if position == 0 else emb.qualified
            loaded.append(emb)
    loaded.sort(key=lambda e: (e.key, e.qualified.lower(), str(e.path)))
    return LibraryState(records, dirs, tuple(walk_warnings), tuple(loaded), by_trigger, by_qualified, reach,
                  tuple(skipped), tuple(walk_warnings) + tuple(notes) + tuple(warnings))


def diff(old: LibraryState, new: LibraryState) -> LibraryChange:
    before = {e.path: e for e in old.loaded}
    after = {e.path: e for e in new.loaded}

    def changed(path: Path) -> bool:
        a, b = before[path], after[path]
        content = a.sha256 != b.sha256 if a.sha256 and b.sha256 else a.data is not b.data
        return content or old.reach[path] != new.reach[path] or a.qualified != b.qualified

    old_skips, new_skips = set(old.skipped), {s.path for s in new.skipped}
    return LibraryChange(
        added=sorted((new.reach[p] for p in after if p not in before), key=str.lower),
        updated=sorted((new.reach[p] for p in after if p in before and changed(p)), key=str.lower),
        removed=sorted((old.reach[p] for p in before if p not in after), key=str.lower),
        skipped=[s for s in new.skipped if s not in old_skips],
        unskipped=sorted({s.path for s in old.skipped} - new_skips),
        warnings=[w for w in new.warnings if w not in set(old.warnings)],
    )
