"""A fleet on Ray Serve (``sdrepl serve --ray ADDRESS|auto``): generations run on N replicas.

The daemon in front keeps everything that has state or talks to users: the library and its watcher, the
protocol, admission (``--max-queue``), checks and outputs. Each ``generate`` goes to a replica of the
``sdrepl-generation`` deployment (``daemon/fleet_replica.py``) with the embeddings the prompt uses and
its LoRA references (each LoRA file version's deltas are ``ray.put`` once; a replica fetches them on first
use and caches them), so replicas need no shared folder. Serve's router picks the replica (one request
at a time each: ``max_ongoing_requests=1``); the result's ``worker`` names it. ``auto`` starts a local Ray
owned by the daemon; an address joins a running cluster. Stopping the daemon deletes the application
(and shuts down the local Ray it started). Ray is an optional extra: ``pip install sdrepl[ray]``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

from sdrepl.core.errors import Cancelled, ModelError, UsageError
from sdrepl.core.outputs import OutputFolder
from sdrepl.daemon.fleet_replica import FleetRequest, GenerationReplica, SnapshotLookup

log = logging.getLogger(__name__)

APP_NAME = "sdrepl-generation"
#: LoRA file versions whose deltas stay in the object store (the oldest are released first).
MAX_PUT_LORAS = 32


@dataclass(frozen=True)
class Replicas:
    """``--ray-replicas``: ``N`` fixed replicas, or ``MIN-MAX`` for Serve's autoscaling."""

    minimum: int
    maximum: int

    @property
    def fixed(self) -> bool:
        return self.minimum == self.maximum


def parse_replicas(text: str | None) -> Replicas:
    value = (text or "1").strip()
    match = re.fullmatch(r"(\d{1,4})(?:-(\d{1,4}))?", value)
    if not match:
        raise UsageError(f"--ray-replicas {text!r}: give a number of replicas (2) or a range for autoscaling "
                         "(1-4)")
    low = int(match.group(1))
    high = int(match.group(2)) if match.group(2) else low
    if not 1 <= high <= 1000 or low > high or (low == 0 and high == 0):
        raise UsageError(f"--ray-replicas {text!r}: between 1 and 1000 replicas; a range MIN-MAX needs "
                         "MIN <= MAX (MIN may be 0)")
    return Replicas(low, high)


def ray_problem() -> str | None:
    """Why ``--ray`` cannot work here (Ray is not installed), or None."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as exc:
        return (f"--ray needs Ray Serve, which is not installed ({exc}); install it with "
                "pip install 'sdrepl[ray]' (or pip install 'ray[serve]')")
    return None


class RayFleet:
    """The Serve deployment of one daemon: started by :meth:`start`, used by :meth:`run`, gone after
    :meth:`close`. ``start``/``close`` block (call them in a thread)."""

    def __init__(self, address: str, replicas: Replicas, settings: Any) -> None:
        self.address = address
        self.replicas = replicas
        self.settings = settings
        self.owns_ray = address.strip().lower() == "auto"
        self.handle: Any = None
        self.gpus = 0.0
        self.device = "cpu"
        self._refs: dict[str, Any] = {}  # LoRA network key -> object ref of its deltas (insertion order)
        self._lock = threading.Lock()
        self.served: dict[str, int] = {}  # replica label -> generations it made
        #: The model the replicas were last deployed with (``--model``, then each ``!model``).
        self.start_model_name: str | None = None

    def start(self) -> None:
        import ray

        started = time.monotonic()
        try:
            if self.owns_ray:
                ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
            else:
                ray.init(address=self.address, log_to_driver=False, configure_logging=False)
        except Exception as exc:
            where = "start a local Ray" if self.owns_ray else f"reach the Ray cluster at {self.address}"
            raise UsageError(f"--ray {self.address}: cannot {where} ({type(exc).__name__}: {exc}); give the head "
                             "node's address (host:6379, or ray://host:10001), or auto for a local Ray") from None
        self.gpus = float(ray.cluster_resources().get("GPU", 0))
        self.device = "cuda" if self.gpus else "cpu"
        self._deploy(self.settings.model)
        log.info("ray fleet: %s replica(s) of %s ready on %s (%s) in %.1f s", self.describe_replicas(),
                 self.settings.model, "a local Ray" if self.owns_ray else self.address, self.device,
                 time.monotonic() - started)

    def _deploy(self, spec: str) -> None:
        """Deploy (or update in place) the application with replicas of model ``spec``; returns when
        Serve reports every replica of this version running."""
        from ray import serve

        options: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1} if self.gpus else {"num_cpus": 1}
        scale: dict[str, Any] = ({"num_replicas": self.replicas.minimum} if self.replicas.fixed else
                                 {"autoscaling_config": {"min_replicas": self.replicas.minimum,
                                                         "max_replicas": self.replicas.maximum,
                                                         "target_ongoing_requests": 1}})
        deployment = serve.deployment(GenerationReplica, name="generation", max_ongoing_requests=1,
                                      ray_actor_options=options, **scale)
        s = self.settings
        app = deployment.bind(spec, self.device, s.dtype, s.prediction_type, s.compile)
        self.handle = serve.run(app, name=APP_NAME, route_prefix=None)

    def switch(self, spec: str, name: str) -> None:
        """``!model``: replace the replicas with ones holding ``spec`` (the daemon's model ``name`` now).
        Blocking (Serve rolls the replicas over; call in a thread). If the new replicas cannot start, the
        fleet keeps its old model name and generations are refused with a clear error (:meth:`run`)."""
        started = time.monotonic()
        try:
            self._deploy(spec)
        except Exception as exc:
            raise ModelError(f"model: the daemon switched to {name}, but the Ray replicas could not load it "
                             f"({type(exc).__name__}: {exc}); generations are refused until a model the "
                             "replicas can load is chosen (!model) or the daemon restarts") from None
        with self._lock:
            self._refs.clear()  # LoRA deltas are per model
        self.start_model_name = name
        log.info("ray fleet: replicas switched to %s in %.1f s", spec, time.monotonic() - started)

    def lookup(self, library: Any) -> SnapshotLookup:
        """A lookup over ``library`` that remembers what the prompt's checks read (sent to the replica)."""
        return SnapshotLookup(library)

    def summary(self) -> dict[str, Any]:
        """``status``'s ``ray`` entry."""
        return {"address": "auto (local)" if self.owns_ray else self.address, "application": APP_NAME,
                "replicas": self.describe_replicas(), "device": self.device, "gpus": self.gpus}

    def describe_replicas(self) -> str:
        r = self.replicas
        return str(r.minimum) if r.fixed else f"{r.minimum}-{r.maximum} (autoscaling)"

    def _delta_refs(self, plan: Any) -> dict[str, Any]:
        """Object refs of the plan's LoRA deltas, put once per file version (blocking: reads files)."""
        import ray

        refs: dict[str, Any] = {}
        if plan is None or not plan.loras:
            return refs
        for net, _te, _unet in plan.loras:
            with self._lock:
                ref = self._refs.get(net.key)
            if ref is None:
                ref = ray.put(plan.library.deltas(net))
                with self._lock:
                    self._refs[net.key] = ref
                    while len(self._refs) > MAX_PUT_LORAS:
                        self._refs.pop(next(iter(self._refs)))
            refs[net.key] = ref
        return refs

    async def run(self, job: Any, lookup: SnapshotLookup, networks: Any, outputs: OutputFolder,
                  cancel_event: threading.Event, model: Any = None) -> tuple[Any, str]:
        """Generate on a replica and write its pictures into ``outputs``; returns (a pending result with
        ``wait()``, the replica's label). ``model``: the daemon's, which must still be the replicas' one."""
        name = getattr(model, "name", None)
        if self.start_model_name is not None and name is not None and name != self.start_model_name:
            raise ModelError(f"generate: the Ray replicas hold {self.start_model_name}, but the daemon switched to "
                             f"{name} (!model); switch back, or restart the daemon with --model {name}")
        refs = await asyncio.to_thread(self._delta_refs, networks)
        sent = dataclasses.replace(networks, library=None) if networks is not None else None
        response = self.handle.generate.remote(FleetRequest(job, lookup, sent, refs))
        future = asyncio.ensure_future(_awaitable(response))
        while not future.done():
            await asyncio.wait({future}, timeout=0.1)
            if cancel_event.is_set() and not future.done():
                response.cancel()
                future.cancel()
                raise Cancelled("generate: cancelled on the Ray replica")
        result = future.result()
        held = result.pop("model", None)
        if self.start_model_name is not None and held is not None and held != self.start_model_name:
            # a replica of the old version answered while Serve rolled the fleet over (!model)
            raise ModelError(f"generate: a Ray replica still held {held} while the fleet switched to "
                             f"{self.start_model_name}; run the line again")
        label = result.pop("replica")
        self.served[label] = self.served.get(label, 0) + 1
        return _Written(outputs, result), label

    def describe(self) -> list[dict[str, Any]]:
        """``status``'s ``workers`` entries: the replicas that served so far."""
        return [{"index": i, "device": f"{label} ({self.device})", "pending": 0, "running": False,
                 "generations": count} for i, (label, count) in enumerate(sorted(self.served.items()))]

    def close(self) -> None:
        """Delete the application (its replicas stop); shut down the local Ray this daemon started."""
        import ray
        from ray import serve

        if not ray.is_initialized():
            return
        try:
            serve.delete(APP_NAME)
            if self.owns_ray:
                serve.shutdown()
        except Exception:
            log.exception("ray fleet: deleting the deployment failed")
        finally:
            self._refs.clear()
            ray.shutdown()
        log.info("ray fleet: deployment %s deleted", APP_NAME)


async def _awaitable(response: Any) -> Any:
    return await response


class _Written:
    """A replica's result whose pictures are written into the daemon's outputs on ``wait()`` (a thread)."""

    def __init__(self, outputs: OutputFolder, result: dict[str, Any]) -> None:
        self._outputs = outputs
        self._result = result

    def wait(self) -> dict[str, Any]:
        images = []
        for seed, data in self._result.pop("pictures"):
            path = self._outputs.save(lambda tmp, data=data: tmp.write_bytes(data), seed)
            images.append({"path": str(path), "seed": seed})
        return {"images": images, **self._result}
