"""Keeping the model resident, unloading it after ``--keep-alive`` idle time, and loading it back on demand.

The state machine (announced to clients as ``model`` events): ``ready`` -> ``unloading`` -> ``unloaded``
-> ``loading`` -> ``ready`` (or ``error``, after which the next request tries loading again). Loads and
unloads run on the device thread, queued like any other device work, so they never overlap a generation.
The tokenizer stays resident when the model is unloaded: the REPL's toolbar asks for token budgets on
every keystroke and must not wake the model (``tokens`` requests do not count as use).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from sdrepl.config import Settings
from sdrepl.core.errors import SdreplError
from sdrepl.core.models import LoadedModel, load_model
from sdrepl.daemon.worker import DeviceWorker

log = logging.getLogger(__name__)

#: ``announce(state, description or None, message)``: how residency tells the clients (a ``model`` event).
Announce = Callable[[str, "dict[str, Any] | None", str], None]


def _trim_heap() -> None:
    """Ask glibc to hand freed heap pages back to the system (it keeps them for reuse otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to ask
        pass


def free_device_memory(device: Any) -> None:
    """Give cached allocator memory back to the system after a model is dropped."""
    gc.collect()
    _trim_heap()
    try:
        import torch

        if getattr(device, "type", "") == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()
        elif getattr(device, "type", "") == "mps" and hasattr(torch, "mps"):
            torch.mps.empty_cache()
    except Exception:  # freeing caches is best effort
        log.debug("could not empty the device cache", exc_info=True)


class ModelResidency:
    """The resident model of one daemon (see the module docstring)."""

    def __init__(self, settings: Settings, worker: DeviceWorker, model: LoadedModel, announce: Announce) -> None:
        self.settings = settings
        self.worker = worker
        self.model: LoadedModel | None = model
        self.tokenizer = model.tokenizer
        self.description: dict[str, Any] = model.describe()
        self.state = "ready"
        self.error: str | None = None
        self._announce = announce
        self._transition: asyncio.Task | None = None
        self._in_use = 0
        self._last_used = time.monotonic()
        self._keep_alive_task: asyncio.Task | None = None

    # --- use ---------------------------------------------------------------------------------------

    def touch(self) -> None:
        """Count now as the last use (restarts the keep-alive countdown)."""
        self._last_used = time.monotonic()

    async def get(self) -> LoadedModel:
        """The loaded model; loads it first when it was unloaded, waits while it loads or unloads."""
        self.touch()
        while True:
            if self.state == "ready" and self.model is not None:
                return self.model
            if self._transition is None:
                self._transition = asyncio.get_running_loop().create_task(self._load())
            task = self._transition
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if task.cancelled():
                    continue
                raise

    @contextlib.asynccontextmanager
    async def using(self) -> AsyncIterator[LoadedModel]:
        """The model, kept from unloading until the block ends (the block's end counts as use)."""
        model = await self.get()
        self._in_use += 1
        try:
            yield model
        finally:
            self._in_use -= 1
            self.touch()

    # --- transitions (on the event loop) -------------------------------------------------------------

    def _set_state(self, state: str, message: str) -> None:
        self.state = state
        log.info("model %s: %s", state, message)
        self._announce(state, self.description if state != "error" else None, message)

    async def _load(self) -> None:
        settings = self.settings
        self._set_state("loading", f"loading model {settings.model} ...")
        started = time.monotonic()
        try:
            model = await self.worker.run(
                lambda: load_model(settings.model, settings.device, settings.dtype,
                                   prediction_type=settings.prediction_type, compile=settings.compile), label="load model")
        except SdreplError as exc:
            self.error = str(exc)
            self._set_state("error", str(exc))
            raise
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("loading the model failed")
            self._set_state("error", f"loading the model failed: {self.error}")
            raise
        finally:
            self._transition = None
        self.model, self.error = model, None
        self.tokenizer = model.tokenizer
        self.description = model.describe()
        self.touch()
        self._set_state("ready", f"model {model.name} ready on {model.device} ({time.monotonic() - started:.1f} s)")

    async def switch(self, spec: str, by: str = "a client") -> LoadedModel:
        """Replace the resident model with ``spec`` (``!model``), validated as ``--model`` is (``load_model``).

        The old model leaves the device first (two SD models rarely fit at once); if the new one cannot be
        loaded, the old one is loaded again and the error (``ModelError``, naming what was given) is raised.
        Every client sees ``model`` events: ``loading`` with who asked, then ``ready`` (or ``error``).
        """
        while self._transition is not None:
            await asyncio.shield(self._transition)
        settings = self.settings
        old = settings.model
        if self.model is not None:
            self._set_state("unloading", f"switching to model {spec} (asked by {by}): unloading {old}")
            model, self.model = self.model, None
            device = model.device

            def drop() -> None:
                nonlocal model
                model = None
                free_device_memory(device)

            await self.worker.run(drop, label="unload model")
        settings.model = spec
        try:
            self._transition = asyncio.get_running_loop().create_task(self._load())
            await asyncio.shield(self._transition)
        except Exception:
            settings.model = old
            log.warning("model %s could not be loaded; loading %s again", spec, old)
            with contextlib.suppress(Exception):
                await self.get()
            raise
        assert self.model is not None
        return self.model

    async def unload(self, reason: str = "idle") -> bool:
        """Drop the model from the device now (keep-alive); False when it is busy or not loaded."""
        if self.state != "ready" or self._in_use or not self.worker.idle or self._transition is not None:
            return False
        keep = self.settings.keep_alive
        self._set_state("unloading", f"unloading model {self.description.get('model')} ({reason}"
                        + (f", idle for {keep:g} s" if keep is not None and reason == "idle" else "") + ")")
        self._transition = asyncio.get_running_loop().create_task(self._unload())
        await asyncio.shield(self._transition)
        return True

    async def _unload(self) -> None:
        model, self.model = self.model, None
        device = model.device if model is not None else None

        def drop() -> None:
            nonlocal model
            model = None
            free_device_memory(device)

        try:
            await self.worker.run(drop, label="unload model")
        finally:
            self._transition = None
        self._set_state("unloaded", "model unloaded; the next request loads it again")

    # --- keep-alive ----------------------------------------------------------------------------------

    def start_keep_alive(self) -> None:
        if self.settings.keep_alive is not None and self._keep_alive_task is None:
            self._keep_alive_task = asyncio.get_running_loop().create_task(self._keep_alive_loop())

    async def stop(self) -> None:
        if self._keep_alive_task is not None:
            self._keep_alive_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._keep_alive_task
            self._keep_alive_task = None

    async def _keep_alive_loop(self) -> None:
        keep = float(self.settings.keep_alive or 0.0)
        poll = min(max(keep / 4, 0.05), 1.0)
        while True:
            idle_for = time.monotonic() - self._last_used
            if idle_for < keep:
                await asyncio.sleep(max(keep - idle_for, 0.01))
                continue
            if self.state == "ready":
                if self._in_use or not self.worker.idle:
                    self.touch()  # busy (e.g. training): count from when the work ends
                else:
                    try:
                        await self.unload("idle")
                    except Exception:
                        log.exception("unloading the model failed")
            await asyncio.sleep(poll)
