"""The one state object of the interactive REPL, and the feed that keeps it in step with the daemon.

Everything the screen shows (completion menu, bottom toolbar, notifications) is read from a
:class:`ReplState` at draw time, as ptpython does: a daemon event or a background reply changes the state
and calls ``invalidate()``; nothing on the screen holds a copy. The state itself never talks to the
daemon; :class:`StateFeed` does (initial ``hello``/``status``/``embeddings``, then events), so the state
can be built by hand in unit tests.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdrepl.core.display import visible

log = logging.getLogger("sdrepl.repl")


@dataclass
class Budget:
    """The last ``tokens`` reply and what it was for (so a stale reply is never shown as current)."""

    prompt: str
    negative: str
    result: dict[str, Any] | None = None
    error: str | None = None


@dataclass
class ReplState:
    """What the REPL knows about the daemon and the line being typed; read by the UI at every redraw."""

    embeddings: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    #: ``loras`` / ``hypernetworks`` replies' lists (completion after ``<lora:`` / ``<hypernet:``).
    loras: list[dict[str, Any]] = field(default_factory=list)
    hypernetworks: list[dict[str, Any]] = field(default_factory=list)
    library_version: int | None = None
    #: The list may be incomplete (an event could not be applied as it is): the feed fetches it again.
    library_stale: bool = False
    budget: Budget | None = None
    model: dict[str, Any] | None = None
    model_state: str = "unknown"
    training: dict[str, Any] | None = None
    queue: dict[str, Any] = field(default_factory=lambda: {"pending": 0, "running": None})
    progress: dict[str, Any] | None = None
    running_request: Any = None
    daemon_gone: str | None = None
    notifications: deque[str] = field(default_factory=lambda: deque(maxlen=200))
    listeners: list[Callable[[], None]] = field(default_factory=list)

    # -- reading --------------------------------------------------------------------------------------

    def embedding_names(self) -> list[str]:
        return [e["name"] for e in self.embeddings]

    def find_embedding(self, name: str) -> dict[str, Any] | None:
        folded = name.lower()
        for emb in self.embeddings:
            if emb["name"].lower() == folded or str(emb.get("qualified", "")).lower() == folded:
                return emb
        return None

    # -- writing (each ends with changed(), which redraws the screen) -----------------------------------

    def changed(self) -> None:
        """Tell the UI to redraw; a failing listener is logged, never raised into the caller."""
        for listener in list(self.listeners):
            try:
                listener()
            except Exception:  # the screen must not take the state down with it
                log.exception("state listener failed")

    def notify(self, text: str) -> None:
        self.notifications.append(text)
        self.changed()

    def set_embeddings(self, result: dict[str, Any]) -> None:
        """Replace the library with an ``embeddings`` reply (the full truth at its version)."""
        self.embeddings = sorted(result.get("embeddings", []), key=lambda e: e["name"].lower())
        self.skipped = list(result.get("skipped", []))
        self.library_version = result.get("version", self.library_version)
        self.library_stale = False
        self.changed()

    def set_networks(self, kind: str, items: list[dict[str, Any]]) -> None:
        """Replace the LoRA (``kind`` "loras") or hypernetwork list with a fresh reply's."""
        setattr(self, kind, sorted(items, key=lambda n: str(n.get("name", "")).lower()))
        self.changed()

    def _apply_library_delta(self, event: dict[str, Any]) -> None:
        """Fold one ``embeddings`` event's entries into the list: by file, so name collisions cannot confuse it."""
        entries = [e for e in event.get("embeddings") or [] if isinstance(e, dict) and "name" in e]
        drop = {str(p) for p in event.get("removed_paths") or []} | {str(e.get("path")) for e in entries}
        kept = [e for e in self.embeddings if str(e.get("path")) not in drop]
        self.embeddings = sorted(kept + entries, key=lambda e: e["name"].lower())
        change = event.get("change") or {}
        gone = {str(p) for p in change.get("unskipped") or []} | {str(s.get("path")) for s in change.get("skipped") or []}
        self.skipped = [s for s in self.skipped if str(s.get("path")) not in gone] + list(change.get("skipped") or [])

    def set_model(self, model: dict[str, Any] | None, state: str | None = None) -> None:
        self.model = model
        if state:
            self.model_state = state
        self.changed()

    def set_status(self, status: dict[str, Any]) -> None:
        """Take model, queue and training job from a ``status`` reply."""
        self.model = status.get("model")
        self.model_state = status.get("state") or self.model_state
        self.queue = status.get("queue") or self.queue
        self.training = status.get("training")
        self.changed()

    def set_budget(self, budget: Budget) -> None:
        self.budget = budget
        self.changed()

    def apply_event(self, event: dict[str, Any]) -> list[str]:
        """Fold one daemon event into the state; return the notification lines it deserves.

        An ``embeddings`` event that follows the version we have and carries the entries (protocol 2) is
        applied as it is: the list stays complete and nothing is fetched. Otherwise (a version skipped, a
        change too big to carry, an old daemon) added names become completable at once, removed names
        stop being offered, and :attr:`library_stale` asks the feed to fetch the full list.
        """
        kind = event.get("event")
        lines: list[str] = []
        if kind == "embeddings":
            change = event.get("change") or {}
            lines = describe_library_change(change)
            version = event.get("version")
            if isinstance(version, int) and self.library_version is not None and version <= self.library_version:
                pass  # already in the list we have (it was fetched after this change)
            elif (isinstance(version, int) and version == (self.library_version or 0) + 1
                  and isinstance(event.get("embeddings"), list) and self.library_version is not None):
                self._apply_library_delta(event)
                self.library_version = version
            else:
                known = {e["name"] for e in self.embeddings}
                removed = set(change.get("removed") or [])
                self.embeddings = [e for e in self.embeddings if e["name"] not in removed]
                for name in change.get("added") or []:
                    if name not in known:
                        self.embeddings.append({"name": name})
                self.embeddings.sort(key=lambda e: e["name"].lower())
                self.library_stale = True
        elif kind in ("loras", "hypernetworks"):
            change = event.get("change") or {}
            lines = describe_library_change(change, "LoRAs" if kind == "loras" else "hypernetworks", "lora")
            removed = set(change.get("removed") or [])
            items = [n for n in getattr(self, kind) if n.get("name") not in removed]
            known = {n.get("name") for n in items}
            items += [{"name": name} for name in change.get("added") or [] if name not in known]
            setattr(self, kind, sorted(items, key=lambda n: str(n.get("name", "")).lower()))
        elif kind == "model":
            self.model_state = event.get("state") or self.model_state
            before = (self.model or {}).get("model")
            if "model" in event:
                self.model = event.get("model") or self.model
            now = (self.model or {}).get("model")
            if event.get("state") == "ready" and before and now and now != before:
                lines = [f"the daemon's model is now {now} (was {before})"]
            if event.get("state") in ("error", "unloaded") and event.get("message"):
                lines = [f"model {event['state']}: {visible(event['message'])}"]
        elif kind == "queue":
            self.queue = {"pending": event.get("pending", 0), "running": event.get("running")}
        elif kind == "progress":
            self.progress = {k: event[k] for k in ("request", "step", "total", "queued") if k in event}
        elif kind == "train":
            job = event.get("job") or {}
            before = (self.training or {}).get("state")
            self.training = job
            if job.get("state") != before and job.get("state") in ("done", "failed", "stopped", "paused"):
                lines = [describe_job_end(job)]
        elif kind == "shutdown":
            self.daemon_gone = event.get("reason") or "the daemon is stopping"
            lines = [f"daemon stopping: {visible(self.daemon_gone)}"]
        for line in lines:
            self.notifications.append(line)
        self.changed()
        return lines


def describe_library_change(change: dict[str, Any], what: str = "embeddings", tag: str = "") -> list[str]:
    """Human lines for a library change (embeddings, or ``what`` = LoRAs / hypernetworks written as
    ``<tag:name>``): what appeared, changed, disappeared, and why files were skipped."""
    lines = []
    for key, verb in (("added", "new"), ("updated", "updated"), ("removed", "removed")):
        names = change.get(key) or []
        if names:
            lines.append(f"{what} {verb}: " + ", ".join(f"<{tag + ':' if tag else ''}{visible(n)}>" for n in names))
    lines += copy_lines(change)
    for item in change.get("skipped") or []:
        lines.append(f"skipped {visible(Path(str(item.get('path', '?'))).name)}: "
                     f"{visible(item.get('reason', 'no reason given'))}")
    for path in change.get("unskipped") or []:
        lines.append(f"no longer skipped: {visible(Path(str(path)).name)}")
    for warning in change.get("warnings") or []:
        lines.append(f"warning: {visible(warning)}")
    return lines


def copy_lines(change: dict[str, Any]) -> list[str]:
    """Files that joined or left an embedding that stays (identical copies, e.g. a ``!convert``): which
    file, which embedding, and the file it is served from."""
    lines = []
    for key, verb in (("files_added", "is a copy of"), ("files_removed", "is gone; still loaded:")):
        for item in change.get(key) or []:
            if isinstance(item, dict):
                lines.append(f"{visible(Path(str(item.get('path', '?'))).name)} {verb} <{visible(item.get('name', '?'))}>"
                             f" (from {visible(Path(str(item.get('entry', '?'))).name)})")
    return lines


def describe_job_end(job: dict[str, Any]) -> str:
    name, state = visible(job.get("name", "?")), job.get("state", "?")
    if state == "failed":
        return f"training {name} failed: {visible(job.get('error') or 'see the daemon log')}"
    where = f" -> {visible(job['path'])}" if job.get("path") else ""
    return f"training {name} {state} at step {job.get('step', '?')}/{job.get('total', '?')}{where}"


class StateFeed:
    """Keeps a :class:`ReplState` live from one daemon connection: initial snapshot, then its events.

    An ``embeddings`` event is applied as a delta (it carries the entries); only when one cannot be
    (a version was skipped, the change was too big to carry) is the full list fetched again (coalesced:
    one refresh in flight at a time, one more queued at most).
    """

    def __init__(self, client: Any, state: ReplState) -> None:
        self.client = client
        self.state = state
        self._refresh_task: asyncio.Task | None = None
        self._refresh_again = False
        self._background: set[asyncio.Task] = set()

    async def start(self) -> None:
        """Read the daemon's present state and subscribe to its events (the client must send events)."""
        self.client.add_event_listener(self.on_event)
        await self.resync()

    async def resync(self) -> None:
        """Read the daemon's present state again: at start, and after reconnecting to a (new) daemon."""
        self.state.daemon_gone = None
        hello = getattr(self.client, "hello", None) or {}
        if isinstance(hello.get("model"), dict):
            self.state.set_model(hello["model"], hello.get("state"))
        elif hello.get("state"):
            self.state.model_state = hello["state"]
        try:
            self.state.set_status(await self.client.request("status"))
        except Exception as exc:  # a missing status is cosmetic; the REPL still works
            log.warning("status request failed: %s", exc)
        await self.refresh_embeddings()
        for kind in ("loras", "hypernetworks"):
            await self.refresh_networks(kind)

    async def refresh_networks(self, kind: str) -> None:
        """Fetch the LoRA or hypernetwork list (an older daemon without it: nothing to complete)."""
        try:
            self.state.set_networks(kind, (await self.client.request(kind)).get(kind, []))
        except Exception as exc:
            log.debug("%s request failed: %s", kind, exc)

    async def refresh_embeddings(self) -> None:
        try:
            self.state.set_embeddings(await self.client.request("embeddings"))
        except Exception as exc:
            log.warning("embeddings request failed: %s", exc)

    def on_event(self, event: dict[str, Any]) -> None:
        """Event listener (runs on the loop): fold into the state, refresh details when the library moved."""
        try:
            self.state.apply_event(event)
            if event.get("event") == "embeddings" and self.state.library_stale:
                self.schedule_refresh()
            elif event.get("event") in ("loras", "hypernetworks"):
                self._spawn(self.refresh_networks(event["event"]))
            elif event.get("event") == "model" and event.get("state") == "ready":
                self._spawn(self._refresh_status())
        except Exception:
            log.exception("could not apply daemon event %r", event.get("event"))

    def schedule_refresh(self) -> None:
        if self._refresh_task and not self._refresh_task.done():
            self._refresh_again = True
            return
        self._refresh_task = self._spawn(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        while True:
            self._refresh_again = False
            await self.refresh_embeddings()
            if not self._refresh_again:
                return

    async def _refresh_status(self) -> None:
        try:
            self.state.set_status(await self.client.request("status"))
        except Exception as exc:
            log.warning("status request failed: %s", exc)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            try:
                await task
            except BaseException:
                pass
