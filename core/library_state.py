"""How the library's view is derived from what was read of each file, one changed file at a time.

The library (``library.py``) walks folders and reads files into records; this module turns records into
what users see: which embeddings fit the model (and why others are skipped), which trigger and qualified
name reaches each file when names collide, the warnings, and the change each update made. It is pure: no
I/O, no locks, so every rule here is testable on its own.

**Incremental.** A folder of 10,000 files must stay live while it fills, so an update costs what it
touches, not the size of the library: :class:`LibraryView` keeps the claimants of each trigger and an
index from every candidate qualified name to the files that may take it, and re-derives only the trigger
groups and the collision component (files sharing a candidate name, transitively) of the changed files.
Collisions never cross components, so the result equals a full rebuild (a test checks exactly that).
Readers get an immutable :class:`LibraryState`; its sorted lists are built on first use, once per version.
"""

from __future__ import annotations

import bisect
import hashlib
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
    """What one mutation changed: names by which embeddings are reachable, new skips, new warnings.

    ``version`` is the library version the change produced; ``entries`` are the embeddings now behind the
    ``added`` and ``updated`` names and ``removed_paths`` the files behind the ``removed`` ones, so a client
    can apply the change to its copy of the list without fetching it again.
    """

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    unskipped: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    version: int = 0
    entries: list[Embedding] = field(default_factory=list)
    removed_paths: list[Path] = field(default_factory=list)
    #: Files that joined an embedding already loaded, as an identical copy: ``(file, trigger, entry path)``.
    files_added: list[tuple[Path, str, Path]] = field(default_factory=list)
    #: Files that went away while their embedding stays (another identical file still holds it):
    #: ``(file, trigger, the path the embedding is now served from)``.
    files_removed: list[tuple[Path, str, Path]] = field(default_factory=list)

    def describe(self) -> dict:
        return {
            "added": list(self.added),
            "updated": list(self.updated),
            "removed": list(self.removed),
            "skipped": [s.describe() for s in self.skipped],
            "unskipped": [str(p) for p in self.unskipped],
            "warnings": list(self.warnings),
            "files_added": [{"path": str(f), "name": n, "entry": str(e)} for f, n, e in self.files_added],
            "files_removed": [{"path": str(f), "name": n, "entry": str(e)} for f, n, e in self.files_removed],
        }

    def __bool__(self) -> bool:
        return any((self.added, self.updated, self.removed, self.skipped, self.unskipped, self.warnings,
                    self.files_added, self.files_removed))


@dataclass(frozen=True)
class Record:
    """One file as last read. ``ignored`` files (previews, empty files) are kept so they are not re-read.

    ``seq`` orders reads: the number of the mutation that read the file (see ``EmbeddingLibrary``), so a
    slow read can never overwrite the result of one that started later.
    """

    path: Path
    root: int
    rel: PurePosixPath
    size: int
    mtime_ns: int
    data: EmbeddingData | None = None
    error: str | None = None
    ignored: bool = False
    sha256: str = ""
    seq: int = 0

    def order(self) -> tuple:
        """Collision precedence: earlier folder, then shallower, then path (case-insensitive, then exact)."""
        cached = self.__dict__.get("_order")
        if cached is None:
            rel = str(self.rel)
            cached = (self.root, len(self.rel.parts), rel.casefold(), rel)
            object.__setattr__(self, "_order", cached)  # computed once: sorting calls it a lot
        return cached

    def content(self) -> tuple:
        """The identity of the vectors (names, shapes, dtypes, values): equal for a ``!convert`` copy.

        Computed once per record (that is, once per read of the file). An embedding bundled in a LoRA
        file is its own identity: bundles keep today's collision rules.
        """
        cached = self.__dict__.get("_content")
        if cached is None:
            if self.data is None or self.data.source:
                cached = ("path", str(self.path))
            else:
                digest = hashlib.sha256()
                for key in sorted(self.data.vectors):
                    tensor = self.data.vectors[key].detach().cpu().contiguous()
                    digest.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
                    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
                cached = ("vectors", digest.hexdigest())
            object.__setattr__(self, "_content", cached)
        return cached


class LibraryState:
    """An immutable view for readers: lookups by trigger and qualified name, sorted lists built lazily."""

    def __init__(self, by_trigger: dict[str, Embedding] | None = None,
                 by_qualified: dict[str, Embedding] | None = None,
                 skips: dict[Path, tuple[tuple, Skipped]] | None = None, warnings: tuple[str, ...] = (),
                 aliases: dict[str, Embedding] | None = None) -> None:
        self.by_trigger = by_trigger or {}
        self.by_qualified = by_qualified or {}
        #: The qualified names of identical copies (``sub/name``): they still reach their embedding.
        self.aliases = aliases or {}
        self._skips = skips or {}
        self.warnings = warnings
        #: The library version this snapshot shows (set when it is published).
        self.version = 0
        self._loaded: tuple[Embedding, ...] | None = None
        self._skipped: tuple[Skipped, ...] | None = None
        self._triggers: tuple[str, ...] | None = None

    @property
    def loaded(self) -> tuple[Embedding, ...]:
        """Every loaded embedding (collision losers included), by trigger, then qualified name, then path."""
        if self._loaded is None:
            self._loaded = tuple(sorted(self.by_qualified.values(),
                                        key=lambda e: (e.key, e.qualified.lower(), str(e.path))))
        return self._loaded

    @property
    def skipped(self) -> tuple[Skipped, ...]:
        if self._skipped is None:
            self._skipped = tuple(skip for _, skip in sorted(self._skips.values(), key=lambda item: item[0]))
        return self._skipped

    @property
    def triggers(self) -> tuple[str, ...]:
        """All names usable in prompts: each trigger once, plus the qualified names that differ from it."""
        if self._triggers is None:
            names = {emb.trigger: None for emb in self.by_trigger.values()}
            names.update({emb.qualified: None for emb in self.by_qualified.values() if emb.qualified.lower() != emb.key})
            self._triggers = tuple(sorted(names, key=str.lower))
        return self._triggers

    @property
    def loaded_count(self) -> int:
        return len(self.by_qualified)

    @property
    def skipped_count(self) -> int:
        return len(self._skips)


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


def _by_content(group: list[Record]) -> list[list[Record]]:
    """The files of one trigger grouped by identical vectors, each list and the lists in precedence order.

    Each list is one embedding, so identical files never count as a collision. Its first file serves it:
    the oldest (by mtime, then precedence), so a ``!convert`` copy written beside the original never takes
    over from it (nor its hash, which pictures record), also after a restart. The others are its copies.
    """
    clusters: dict[tuple, list[Record]] = {}
    for rec in group:
        clusters.setdefault(rec.content(), []).append(rec)
    return [sorted(cluster, key=lambda rec: (rec.mtime_ns, rec.order())) for cluster in clusters.values()]


class LibraryView:
    """The writer's side of the library: records and everything derived from them, updated in place.

    Not thread-safe by itself: the library applies updates under its lock and publishes
    :meth:`snapshot` to readers.
    """

    def __init__(self, roots: list[Path], widths: dict[str, int], label: str) -> None:
        self.roots = list(roots)
        self.widths = dict(widths)
        self.label = label
        self.records: dict[Path, Record] = {}
        self.dirs: dict[str, Path] = {}  # real dir -> the path it was walked as
        self.walk_warnings: tuple[str, ...] = ()
        self._skips: dict[Path, tuple[tuple, Skipped]] = {}
        self._trigger: dict[Path, str] = {}  # claimant -> its trigger
        self._groups: dict[str, list[tuple[tuple, Path]]] = {}  # trigger key -> claimants in precedence order
        self._options: dict[Path, list[str]] = {}
        self._holders: dict[str, set[Path]] = {}  # lowercased candidate qualified name -> claimants offering it
        self._qualified: dict[Path, str] = {}
        self._entries: dict[Path, Embedding] = {}
        self._reach: dict[Path, str] = {}  # path -> the name that reaches it (trigger for a winner)
        self._by_trigger: dict[str, Embedding] = {}
        self._by_qualified: dict[str, Embedding] = {}
        self._notes: dict[str, str] = {}  # trigger key -> its collision warning
        self._parents: dict[Path, int] = {}  # folder -> how many records it holds directly
        self._renamed: dict[Path, tuple[tuple, str]] = {}  # claimant -> warning: its inner name is not used
        self._aliases: dict[str, Embedding] = {}  # lowercased qualified name of a copy -> its embedding
        self._alias_of: dict[Path, str] = {}  # copy -> its key in _aliases

    # --- reads -------------------------------------------------------------------------------------

    def snapshot(self) -> LibraryState:
        """An immutable copy for readers (dict copies: fast even for 10,000 files)."""
        notes = tuple(self._notes[key] for key in sorted(self._notes))
        renamed = tuple(note for _, note in sorted(self._renamed.values()))
        return LibraryState(dict(self._by_trigger), dict(self._by_qualified), dict(self._skips),
                            self.walk_warnings + renamed + notes, dict(self._aliases))

    def warnings(self) -> set[str]:
        return set(self.walk_warnings) | {note for _, note in self._renamed.values()} | set(self._notes.values())

    # --- updates -----------------------------------------------------------------------------------

    def apply(self, updates: dict[Path, Record | None], walk_warnings: tuple[str, ...] | None = None) -> LibraryChange:
        """Replace the records of ``updates`` (None: the file is gone) and re-derive what they touch."""
        old_warnings = self.warnings()
        before: dict[Path, tuple[str | None, Embedding | None]] = {}
        old_skips: dict[Path, Skipped] = {}
        keys: set[str] = set()
        seeds: set[Path] = set()
        for path, rec in updates.items():
            self._forget(path, before, old_skips, keys, seeds)
            if self.records.pop(path, None) is not None:
                self._count_parent(path, -1)
            if rec is not None:
                self.records[path] = rec
                self._count_parent(path, 1)
                self._admit(rec, keys, seeds)
        if walk_warnings is not None:
            self.walk_warnings = walk_warnings
        self._requalify(seeds, keys)
        self._regroup(keys, before)
        return self._change(updates, before, old_skips, old_warnings, keys)

    def holds_folder(self, folder: Path) -> bool:
        """Whether some record lies under ``folder`` (cost: the number of folders holding records)."""
        prefix = str(folder) + "/"
        return any(parent == folder or str(parent).startswith(prefix) for parent in self._parents)

    def _count_parent(self, path: Path, delta: int) -> None:
        parent = path.parent
        count = self._parents.get(parent, 0) + delta
        if count > 0:
            self._parents[parent] = count
        else:
            self._parents.pop(parent, None)

    def rebuild(self) -> LibraryChange:
        """Re-derive everything (the model's encoder widths changed); no file is read."""
        return self.apply(dict(self.records))

    def _forget(self, path: Path, before: dict, old_skips: dict, keys: set[str], seeds: set[Path]) -> None:
        skip = self._skips.pop(path, None)
        if skip is not None:
            old_skips[path] = skip[1]
        self._renamed.pop(path, None)
        self._drop_alias(path)
        trigger = self._trigger.pop(path, None)
        if trigger is None:
            return
        key = trigger.lower()
        keys.add(key)
        group = self._groups[key]
        group[:] = [item for item in group if item[1] != path]
        if not group:
            del self._groups[key]
        for option in self._options.pop(path):
            holders = self._holders[option.lower()]
            holders.discard(path)
            seeds |= holders
            if not holders:
                del self._holders[option.lower()]
        before.setdefault(path, (self._reach.get(path), self._entries.get(path)))
        self._qualified.pop(path, None)
        self._reach.pop(path, None)
        emb = self._entries.pop(path, None)
        if emb is not None and self._by_qualified.get(emb.qualified.lower()) is emb:
            del self._by_qualified[emb.qualified.lower()]

    def _drop_alias(self, path: Path) -> None:
        alias = self._alias_of.pop(path, None)
        if alias is not None:
            self._aliases.pop(alias, None)

    def _admit(self, rec: Record, keys: set[str], seeds: set[Path]) -> None:
        if rec.ignored:
            return
        reason = rec.error if rec.error is not None else incompatibility(rec.data, self.widths, self.label)
        if reason is not None:
            self._skips[rec.path] = (rec.order(), Skipped(rec.path, reason))
            return
        trigger = decide_trigger(rec.path, rec.data)
        renamed = ignored_inner_name(rec.path, rec.data)
        if renamed is not None:
            self._renamed[rec.path] = (rec.order(), renamed)
        key = trigger.lower()
        keys.add(key)
        self._trigger[rec.path] = trigger
        bisect.insort(self._groups.setdefault(key, []), (rec.order(), rec.path))
        options = _name_options(rec, trigger, self.roots)
        self._options[rec.path] = options
        for option in options:
            self._holders.setdefault(option.lower(), set()).add(rec.path)
        seeds.add(rec.path)

    def _requalify(self, seeds: set[Path], keys: set[str]) -> None:
        """Qualified names of the collision component of ``seeds`` (files sharing a candidate name)."""
        component: set[Path] = set()
        frontier = [p for p in seeds if p in self._trigger]
        while frontier:
            path = frontier.pop()
            if path in component:
                continue
            component.add(path)
            for option in self._options[path]:
                frontier.extend(p for p in self._holders[option.lower()] if p not in component)
        claims = sorted(((self.records[p], self._trigger[p]) for p in component), key=lambda c: c[0].order())
        for path, name in _qualify(claims, self.roots).items():
            if self._qualified.get(path) != name:
                self._qualified[path] = name
                keys.add(self._trigger[path].lower())

    def _regroup(self, keys: set[str], before: dict) -> None:
        """Winner, warning and entries of every trigger group in ``keys``."""
        for key in keys:  # first drop the groups' old entries: qualified names may move between them
            self._notes.pop(key, None)
            self._by_trigger.pop(key, None)
            for _, path in self._groups.get(key, ()):
                before.setdefault(path, (self._reach.get(path), self._entries.get(path)))
                self._drop_alias(path)
                emb = self._entries.pop(path, None)
                if emb is not None and self._by_qualified.get(emb.qualified.lower()) is emb:
                    del self._by_qualified[emb.qualified.lower()]
        for key in keys:
            clusters = _by_content([self.records[path] for _, path in self._groups.get(key, ())])
            if not clusters:
                continue
            group = [cluster[0] for cluster in clusters]
            # The simplest qualified name among a cluster's files (unique, and no copy uses it) names it.
            names = {cluster[0].path: self._qualified[min(cluster, key=Record.order).path] for cluster in clusters}
            note: tuple[str, ...] = ()
            if len(group) > 1:
                others = "; ".join(f"{rec.path} is reachable as <{names[rec.path]}>" for rec in group[1:])
                note = (f"{len(group)} files claim the trigger '{self._trigger[group[0].path]}': using "
                        f"{group[0].path}; {others}",)
                self._notes[key] = note[0]
            for position, (rec, cluster) in enumerate(zip(group, clusters, strict=True)):
                trigger, qualified = self._trigger[rec.path], names[rec.path]
                copies = tuple(copy.path for copy in sorted(cluster[1:], key=Record.order))
                emb = Embedding(trigger, qualified, rec.path, rec.data, rec.sha256, rec.size, rec.mtime_ns, note,
                                copies)
                self._entries[rec.path] = emb
                self._by_qualified[qualified.lower()] = emb
                for copy in cluster[1:]:  # each copy's own qualified name (unique) still reaches it
                    alias = self._qualified[copy.path]
                    if alias.lower() != qualified.lower():
                        self._aliases[alias.lower()] = emb
                        self._alias_of[copy.path] = alias.lower()
                self._reach[rec.path] = trigger if position == 0 else qualified
                if position == 0:
                    self._by_trigger[key] = emb

    def _change(self, updates: dict, before: dict, old_skips: dict[Path, Skipped], old_warnings: set[str],
                keys: set[str]) -> LibraryChange:
        change = LibraryChange()
        # Files held as identical copies, before and after: a copy coming or going, or taking over from
        # the file it copied, changes an entry's files but not the names that reach it.
        old_owner = {f: (reach, emb) for reach, emb in before.values() if emb is not None for f in emb.files}
        new_owner = {f: emb for path in before if (emb := self._entries.get(path)) is not None for f in emb.files}
        new_reaches = {self._reach[path].lower(): self._entries[path] for path in before if path in self._entries}

        def kept(reach: str | None, old: Embedding) -> Embedding | None:
            """The entry that now serves ``old``'s name from one of ``old``'s files (its vectors), if any."""
            now = new_reaches.get((reach or "").lower())
            return now if now is not None and not set(now.files).isdisjoint(old.files) else None
        for path, (old_reach, old) in before.items():
            new = self._entries.get(path)
            if old is None and new is not None:
                took_over = path in old_owner and (old_owner[path][0] or "").lower() == self._reach[path].lower()
                if not took_over:
                    change.added.append(self._reach[path])
                change.entries.append(new)
            elif old is not None and new is None:
                if kept(old_reach, old) is None:
                    change.removed.append(old_reach)
                change.removed_paths.append(path)
            elif old is not None and new is not None:
                content = old.sha256 != new.sha256 if old.sha256 and new.sha256 else old.data is not new.data
                if content or old_reach != self._reach[path] or old.qualified != new.qualified:
                    change.updated.append(self._reach[path])
                    change.entries.append(new)
                elif old.files != new.files:
                    change.entries.append(new)
        for file, (reach, emb) in old_owner.items():
            stays = kept(reach, emb)
            if file not in new_owner and stays is not None:
                change.files_removed.append((file, emb.trigger, stays.path))
        for file, emb in new_owner.items():
            if file != emb.path and file not in old_owner:
                change.files_added.append((file, emb.trigger, emb.path))
        change.files_added.sort()
        change.files_removed.sort()
        for name_list in (change.added, change.updated, change.removed):
            name_list.sort(key=str.lower)
        new_skips = [self._skips[p] for p in updates if p in self._skips and self._skips[p][1] != old_skips.get(p)]
        change.skipped = [skip for _, skip in sorted(new_skips, key=lambda item: item[0])]
        change.unskipped = sorted(p for p in old_skips if p not in self._skips)
        walk_new = [w for w in self.walk_warnings if w not in old_warnings]
        walk_new += [note for _, note in sorted(self._renamed[p] for p in updates if p in self._renamed)
                     if note not in old_warnings]
        notes_new = [self._notes[k] for k in sorted(keys) if k in self._notes and self._notes[k] not in old_warnings]
        change.warnings = walk_new + notes_new
        return change
