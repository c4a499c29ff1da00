"""The replica side of a Ray Serve fleet (``serve --ray``): one loaded model, no folders of its own.

A replica gets everything a generation needs in the request (see ``daemon/fleet.py``): the job, the
embeddings the prompt names (their vectors, as the daemon's library held them when the request came),
the prompt's network plan, and for each LoRA an object-store reference to its host deltas, fetched only
the first time this replica meets that file version and then kept in a bounded cache. So replicas need
no shared folder and see a file dropped into the daemon's watched folder with the next request. It
writes no files either: the pictures come back as PNG bytes (with their A1111 metadata) and the daemon
numbers and writes them into its outputs folder. Only ``core`` is imported here, and ray only lazily,
so the module loads (and its helpers are testable) without Ray.
"""

from __future__ import annotations

import dataclasses
import io
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdrepl.core.embedding import Embedding
from sdrepl.core.generation import GenerationJob, start_generation

#: LoRA file versions whose deltas a replica keeps (least recently used go first).
DELTA_CACHE_ENTRIES = 32


class SnapshotLookup:
    """An embedding lookup that remembers every name asked of it (hit or miss), so a replica can answer
    the same questions the same way without the library. Used on the daemon while the prompt's budget
    is checked (which reads every name the prompt uses), then sent with the request."""

    def __init__(self, lookup: Any) -> None:
        self._lookup: Any = lookup
        self.seen: dict[str, Embedding | None] = {}
        self._triggers: list[str] | None = None

    def get(self, name: str) -> Embedding | None:
        key = name.lower()
        if key not in self.seen:
            if self._lookup is None:
                return None
            self.seen[key] = self._lookup.get(name)
        return self.seen[key]

    def suggest(self, name: str, limit: int = 3) -> list[str]:
        return self._lookup.suggest(name, limit) if self._lookup is not None else []

    def triggers(self) -> list[str]:
        if self._triggers is None:
            self._triggers = list(self._lookup.triggers()) if self._lookup is not None else []
        return self._triggers

    def __getstate__(self) -> dict[str, Any]:
        # The library stays on the daemon; what travels is what the prompt used.
        return {"seen": dict(self.seen), "triggers": self.triggers()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._lookup = None
        self.seen = state["seen"]
        self._triggers = state["triggers"]


@dataclass
class FleetRequest:
    """One generation as it travels to a replica."""

    job: GenerationJob
    lookup: SnapshotLookup
    #: The prompt's ``NetworkPlan`` without its library (None: a prompt without tags).
    networks: Any = None
    #: LoRA network key -> object ref of its host deltas (``ray.put`` once by the daemon).
    deltas: dict[str, Any] = field(default_factory=dict)


class _CollectedPictures:
    """An ``OutputFolder`` stand-in: each picture is encoded into memory and kept, in order."""

    def __init__(self) -> None:
        self.pictures: list[tuple[int, bytes]] = []
        self._lock = threading.Lock()

    def save(self, write: Any, seed: int) -> Path:
        buffer = io.BytesIO()
        write(buffer)  # core.picture_writer: PIL's image.save(target, format="PNG", pnginfo=...)
        with self._lock:
            self.pictures.append((seed, buffer.getvalue()))
            return Path(f"picture-{len(self.pictures)}.png")


class _ReplicaNetworks:
    """What ``core.networks.use.activate`` asks of a network library, served from the request."""

    def __init__(self, names: dict[str, str], refs: dict[str, Any], cache: OrderedDict[str, Any],
                 lock: threading.Lock) -> None:
        self._names = names
        self._refs = refs
        self._cache = cache
        self._lock = lock
        self.fetched = 0

    def reach_name(self, net: Any) -> str:
        return self._names.get(net.key, net.qualified)

    def deltas(self, net: Any) -> Any:
        with self._lock:
            hit = self._cache.get(net.key)
            if hit is not None:
                self._cache.move_to_end(net.key)
                return hit
        import ray

        value = ray.get(self._refs[net.key])
        self.fetched += 1
        with self._lock:
            self._cache[net.key] = value
            while len(self._cache) > DELTA_CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return value


def replica_label() -> str:
    """This replica's name in results (``"ray:<replica id>"``), the pid where Serve gives none."""
    try:
        from ray import serve

        context = serve.get_replica_context()
        ident = getattr(getattr(context, "replica_id", None), "unique_id", None) or context.replica_tag
        return f"ray:{ident}"
    except Exception:
        return f"ray:pid{os.getpid()}"


class GenerationReplica:
    """The body of the Serve deployment (``daemon.fleet`` wraps it with ``serve.deployment``)."""

    def __init__(self, model: str, device: str, dtype: str, prediction_type: str | None, compile: bool) -> None:
        from sdrepl.core.models import load_model

        self.model = load_model(model, device, dtype, prediction_type=prediction_type, compile=compile)
        self.label = replica_label()
        self._deltas: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()  # Serve runs one request at a time here (max_ongoing_requests=1)

    def describe(self) -> dict[str, Any]:
        return {"replica": self.label, "model": self.model.name, "device": str(self.model.device),
                "cached_loras": len(self._deltas)}

    def generate(self, request: FleetRequest) -> dict[str, Any]:
        plan = request.networks
        networks = None
        if plan is not None:
            networks = _ReplicaNetworks(dict(plan.names), request.deltas, self._deltas, self._lock)
            plan = dataclasses.replace(plan, library=networks)
        outputs = _CollectedPictures()
        pending = start_generation(self.model, request.lookup, request.job, outputs,  # type: ignore[arg-type]
                                   networks=plan)
        result = pending.wait()
        result.pop("images", None)
        result["pictures"] = outputs.pictures
        result["replica"] = self.label
        result["model"] = self.model.name  # the daemon checks it (a replica of an older version, mid-switch)
        result["fetched_loras"] = networks.fetched if networks is not None else 0
        return result
