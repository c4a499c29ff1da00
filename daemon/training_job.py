"""A training run inside the daemon: the device worker's background job, with pause, resume and stop.

The worker calls :meth:`TrainingJob.run_step` whenever no generation is waiting, so a picture asked for
during training waits for at most one training step. ``run_step`` first encodes the pictures a few at a
time (state ``starting``), then does one optimizer step per call (``running``). Pausing takes the job off
the worker (``run_step`` returns False) and resuming puts it back; stopping saves a resumable checkpoint
and the embedding so far. When the run ends its file is written atomically into the first embeddings
folder and handed to the library at once, so ``<name>`` works in the very next prompt, before the folder
watcher notices the file.

Threads: ``run_step`` runs on the device thread, the control methods on the event loop, ``shutdown`` on a
helper thread. ``_lock`` serialises everything that touches the trainer, so a shutdown waits for the
step in progress and then checkpoints a consistent state.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sdrepl.core.atomic import write_error_text
from sdrepl.core.errors import EmbeddingError, TrainingError
from sdrepl.core.networks.use import activate as activate_networks
from sdrepl.core.training.trainer import Trainer
from sdrepl.daemon.context import DaemonContext

log = logging.getLogger(__name__)

ACTIVE = frozenset({"starting", "running", "paused", "stopping"})
TERMINAL = frozenset({"done", "failed", "stopped"})
#: ``train`` events per second at most while steps run (state changes are always sent).
EVENTS_PER_S = 4.0


class TrainingJob:
    """One run (see module docstring); ``describe()`` is the protocol's ``<job>``."""

    label = "train"

    def __init__(self, ctx: DaemonContext, trainer: Trainer, *, resources: contextlib.AsyncExitStack | None = None
                 ) -> None:
        self.ctx = ctx
        self.trainer = trainer
        self.name = trainer.name
        self.state = "starting"
        self.error: str | None = None
        self.path: str | None = None
        self._resources = resources
        self._lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._pause = False
        self._stop = False
        self._last_event = 0.0
        self._times: collections.deque[tuple[float, int]] = collections.deque(maxlen=32)
        self._waiters: list[tuple[frozenset[str], asyncio.Future]] = []
        self._loop = ctx.loop

    # --- what clients see ------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def describe(self) -> dict[str, Any]:
        t = self.trainer
        rate = self._rate()
        remaining = max(0, t.total - t.step_count)
        return {
            "name": self.name, "state": self.state, "step": t.step_count, "total": t.total,
            "loss": None if t.last_loss is None else round(t.last_loss, 6), "lr": t.last_lr,
            "it_s": None if rate is None else round(rate, 3),
            "eta_s": None if rate is None or not self.active else round(remaining / rate, 1),
            "log_dir": str(t.plan.log_dir), "path": self.path or str(t.plan.target), "error": self.error,
            "seed": t.seed, "epoch": t.epoch, "notes": list(t.notes),
            "device": self._device(),  # with --device a,b: training runs on worker 0's device
            "recent_loss": [round(v, 6) for v in t.log.recent_losses()],  # v2: the sparkline's points
        }

    def _device(self) -> str:
        model = getattr(self.ctx.residency, "model", None)
        return str(getattr(model, "device", None) or self.ctx.settings.device)

    def result(self) -> dict[str, Any]:
        """The ``train --wait`` result once the job has ended."""
        return {"job": self.describe(), "embedding": {
            "name": self.name, "path": self.path, "steps": self.trainer.step_count,
            "final_loss": self.trainer.last_loss}}

    def _rate(self) -> float | None:
        if len(self._times) < 2:
            return None
        (t0, s0), (t1, s1) = self._times[0], self._times[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else None

    # --- the device thread ---------------------------------------------------------------------

    def run_step(self) -> bool:
        """One unit of work; False takes the job off the worker (finished, failed, paused or stopped)."""
        with self._lock:
            if not self.active:
                return False
            if self._stop:
                self._end("stopped")
                return False
            if self._pause:
                self._set_state("paused")
                return False
            if self.trainer.plan.publish_only:  # the run had ended without its final file: write it only
                self._end("done")
                return False
            try:
                # Generations between steps may have left LoRAs on the model: training sees the plain model.
                activate_networks(self.trainer.pipe, None)
                if self.state == "starting":
                    if self.trainer.prepare_step():
                        return True
                    self._times.append((time.monotonic(), self.trainer.step_count))
                    self._publish()
                    self._set_state("running")
                    return True
                self.trainer.step()
                if self.trainer.checkpoint_step == self.trainer.step_count and not self.trainer.finished:
                    self._publish()
            except TrainingError as exc:
                self._fail(str(exc))
                return False
            except (OSError, EmbeddingError) as exc:  # a full or read-only log folder: a user's condition
                self._fail(self._write_failure(exc))
                return False
            except Exception as exc:  # a bug or a device failure: fail the job, keep the daemon
                log.exception("training %s failed", self.name)
                self._fail(f"{type(exc).__name__}: {exc} (see {self.ctx.log_hint}); the last checkpoint is in "
                           f"{self.trainer.plan.log_dir}")
                return False
            self._times.append((time.monotonic(), self.trainer.step_count))
            if self.trainer.finished:
                self._end("done")
                return False
            now = time.monotonic()
            if now - self._last_event >= 1.0 / EVENTS_PER_S:
                self._emit(now)
            return True

    def _publish(self) -> None:
        """``<name>`` usable while it trains: the latest checkpoint's vectors in its file, in the library.

        At the start (the init vectors) and after every ``--save-every`` checkpoint, the embedding so far is
        written to its final place (atomically; ``write_final`` keeps the overwrite rules of the run) and
        handed to the library, so a prompt can try it during the first run. A failure here is logged and
        the job goes on (the end of the run writes the file again).
        """
        try:
            path = self.trainer.write_final()
            self.ctx.apply_library_change(self.ctx.library.update_path(path))
        except Exception as exc:
            log.warning("training %s: could not publish step %s: %s", self.name, self.trainer.step_count, exc)

    def _end(self, state: str) -> None:
        """Finish (done/stopped): checkpoint, final file, library; a failure to write fails the job."""
        try:
            path = self.trainer.finish()
        except (OSError, EmbeddingError) as exc:  # disk full, read-only, a file appeared meanwhile
            log.warning("training %s: saving the result failed: %s", self.name, exc)
            self._fail(f"could not save the result: {self._write_failure(exc)}")
            return
        except Exception as exc:  # TrainingError
            log.warning("training %s: saving the result failed: %s", self.name, exc)
            self._fail(f"could not save the result: {exc}")
            return
        self.path = str(path)
        try:
            change = self.ctx.library.update_path(path)
            self.ctx.apply_library_change(change)
        except Exception:  # the watcher will still pick the file up
            log.exception("training %s: the library did not take %s", self.name, path)
        self._close()
        self._set_state(state)

    def _write_failure(self, exc: OSError | EmbeddingError) -> str:
        """A failed write as the user should read it: what and where, and that the run can be resumed."""
        t = self.trainer
        if isinstance(exc, OSError):
            where = Path(exc.filename) if exc.filename else t.plan.log_dir / "checkpoint.pt"
            reason = f"{where.name}: {write_error_text(exc, where)}"
        else:
            reason = str(exc)
        last = (f"the last checkpoint (step {t.checkpoint_step}) is intact in {t.plan.log_dir}"
                if t.checkpoint_step is not None else "no checkpoint was saved yet")
        return f"{reason}; training stopped at step {t.step_count}: {last}; `!train {self.name} --resume` continues"

    def _fail(self, message: str) -> None:
        self.error = message
        self._close()
        self._set_state("failed")

    def _close(self) -> None:
        try:
            self.trainer.close()
        except Exception:
            log.exception("training %s: releasing the model failed", self.name)
        if self._resources is not None:
            resources, self._resources = self._resources, None
            self.ctx.call_soon(lambda: self._loop.create_task(resources.aclose()))

    # --- state changes and events ----------------------------------------------------------------

    def _set_state(self, state: str, *, only_from: frozenset[str] = ACTIVE) -> bool:
        """Move to ``state`` unless the job has already ended (threads race to end it); True if moved."""
        with self._state_lock:
            if self.state not in only_from:
                return False
            self.state = state
        log.info("training %s: %s at step %d/%d%s", self.name, state, self.trainer.step_count, self.trainer.total,
                 f" ({self.error})" if self.error else "")
        self._emit(time.monotonic())
        self.ctx.call_soon(self._wake)
        return True

    def _emit(self, now: float) -> None:
        self._last_event = now
        self.ctx.broadcast("train", job=self.describe())

    def _wake(self) -> None:
        """(loop) Resolve the waiters whose states include the current one."""
        keep = []
        for states, future in self._waiters:
            if future.done():
                continue
            if self.state in states:
                future.set_result(self.state)
            else:
                keep.append((states, future))
        self._waiters = keep

    async def wait_for(self, states: Iterable[str]) -> str:
        """(loop) Wait until the job is in one of ``states`` (or has ended)."""
        wanted = frozenset(states) | TERMINAL
        if self.state in wanted:
            return self.state
        future = self._loop.create_future()
        self._waiters.append((wanted, future))
        return await asyncio.shield(future)

    # --- control (event loop) --------------------------------------------------------------------

    def start(self) -> None:
        self._emit(time.monotonic())
        self.ctx.worker.set_background(self)

    async def pause(self) -> None:
        if self.state in ("starting", "running"):
            self._pause = True
            await self.wait_for({"paused"})

    def resume(self) -> None:
        if not self.active:
            return
        self._pause = False
        if self._set_state("running" if self.trainer.data.encoded else "starting", only_from=frozenset({"paused"})):
            # Re-install from the device thread: queued there, it runs after the worker has dropped the
            # job that returned False on pausing, so the two cannot cross.
            self._times.clear()  # the pause is not training time
            worker = self.ctx.worker
            worker.submit(lambda: worker.set_background(self), label="train resume")

    async def stop(self) -> None:
        """Stop after the current step, saving a checkpoint and the embedding so far."""
        if not self.active:
            return
        self._stop = True
        if self.state == "paused":  # off the worker: finish it there ourselves
            await self.ctx.worker.run(self.run_step, label="train stop")
        else:
            self._set_state("stopping", only_from=frozenset({"starting", "running"}))
        await self.wait_for(TERMINAL)

    def shutdown(self) -> None:
        """The daemon is stopping (any thread): after the step in progress, save a resumable checkpoint."""
        with self._lock:
            if not self.active:
                return
            try:
                path = self.trainer.save_checkpoint()
                self.error = (f"the daemon stopped at step {self.trainer.step_count}; continue with "
                              f"!train {self.name} --resume" + (f" (checkpoint {path})" if path else ""))
            except Exception as exc:
                log.exception("training %s: the shutdown checkpoint failed", self.name)
                self.error = f"the daemon stopped and the checkpoint could not be saved: {exc}"
            self._close()
            self._set_state("stopped")
