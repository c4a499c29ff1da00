"""The textual-inversion training loop on the resident model.

Only the embedding's ``[N, D]`` vectors are trained: they are spliced into each caption's input
embeddings by the conditioning's differentiable encoder, while the UNet, VAE and text encoder stay
frozen (``requires_grad=False``; gradients still flow *through* the text encoder to the vectors). That
is why a step is cheap: no VAE (latents are encoded once, see dataset.py) and no gradient or optimizer
state for the 49,408-row token table, which diffusers' example script carries.

:meth:`Trainer.step` is one optimizer step (``--accum`` micro-batches), so the daemon can run generations
between steps. Every random draw comes from generators the trainer owns and checkpoints; the process'
global RNG is never used, so generations in between cannot change a run, and a resumed run continues
bit for bit (on the CPU). A NaN or infinite loss stops the run without saving over the last good
checkpoint.

No host sync per step: the latents (encoded once) and each caption's token ids live on the device, the
noise and timesteps come from a generator on the device, and the loss and the NaN/Inf checks stay device
tensors until they are read back together every ``--log-every`` steps (and before any save, preview or
final write, so nothing from a bad step is ever written). A divergence found at a read-back stops the
run at the first bad step, restores the vectors of the last read-back and keeps the last good
checkpoint, as before.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sdrepl import __version__
from sdrepl.core.atomic import atomic_writer
from sdrepl.core.conditioning import encode_prompts
from sdrepl.core.embedding import SINGLE
from sdrepl.core.errors import TrainingError
from sdrepl.core.formats import write_embedding, write_png_card
from sdrepl.core.prompt import EmbeddingLookup
from sdrepl.core.samplers import sample
from sdrepl.core.training.captions import augment_caption
from sdrepl.core.training.checkpoint import remove_stale_temps, save_checkpoint
from sdrepl.core.training.dataset import EpochOrder, TrainingSet, load_dataset
from sdrepl.core.training.device import autocast, grad_scaler, resolve_precision, set_gradient_checkpointing
from sdrepl.core.training.outputs import TrainingLog
from sdrepl.core.training.plan import RunPlan
from sdrepl.core.training.schedule import parse_schedule
from sdrepl.core.training.templates import fill_filewords, load_template
from sdrepl.core.training.text import TrainingLookup, as_prompt, caption_encoder, standin
from sdrepl.core.training.vectors import split_vectors

log = logging.getLogger(__name__)
PREVIEW_STEPS = 20
PREVIEW_CFG = 7.0


class TrainingDiverged(TrainingError):
    """The loss became NaN or infinite; the run stopped and its last good checkpoint was kept."""


@dataclass(frozen=True)
class StepResult:
    step: int
    #: The step's mean loss when it was read back with this step (every ``--log-every`` steps), else None.
    loss: float | None
    lr: float
    epoch: int


@dataclass
class _Pending:
    """A step whose loss and finiteness are still on the device."""

    step: int
    epoch: int
    lr: float
    loss: torch.Tensor
    finite: torch.Tensor


class Trainer:
    """One training run (see module docstring). Build it with a :class:`RunPlan` from ``plan_run``."""

    def __init__(self, model: Any, plan: RunPlan, *, library: EmbeddingLookup | None = None,
                 offload_vae: bool = False) -> None:
        self.model = model
        self.plan = plan
        self.options = opts = plan.options
        self.name = opts.name
        self.pipe = model.pipe
        self.device: torch.device = model.device
        self.library = library
        self.offload_vae = offload_vae and self.device.type != "cpu"
        self.size = opts.size or (model.native_size, model.native_size)
        self.schedule = parse_schedule(opts.lr)
        self.total = self.schedule.total_steps(opts.steps)
        self.templates = load_template(opts.template)
        self.precision = resolve_precision(opts.precision, self.device, model.dtype)
        data = opts.data
        if data is None:
            raise TrainingError(f"!train {self.name}: --data DIR is required (the resumed run saved no folder)")
        self.data: TrainingSet = load_dataset(
            data, self.size, center_crop=opts.center_crop, flip=opts.flip, latents=opts.latents,
            filename_regex=opts.filename_regex, join=opts.join,
        )
        self.seed = plan.seed
        self.vectors = torch.nn.Parameter(plan.vectors.to(self.device, torch.float32).clone())
        #: SDXL: pooled embeddings and time ids go to the UNet besides the captions' hidden states.
        self.sdxl = getattr(model, "family", None) == "sdxl"
        self.text = caption_encoder(model, self.name, self.vectors, library)
        self.text.check([fill_filewords(self.templates[0], p.caption) for p in self.data.pictures]
                        + [fill_filewords(line, self.data.pictures[0].caption) for line in self.templates])
        for module in self._text_encoders() + [self.pipe.unet, self.pipe.vae]:
            module.requires_grad_(False)
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.prediction = self.noise_scheduler.config.get("prediction_type", "epsilon")
        self.optimizer = torch.optim.AdamW([self.vectors], lr=self.schedule.rate_at(plan.start_step + 1),
                                           weight_decay=0.0)
        self.scaler = grad_scaler(self.precision, self.device)
        self.generator = torch.Generator().manual_seed(self.seed + 2)  # flips (host-side decisions)
        #: Noise, timesteps and ``--latents random`` draws, made on the device (no per-step copies).
        self.device_generator = torch.Generator(self.device).manual_seed(self.seed + 5)
        self.rng = random.Random(self.seed + 4)  # template lines, tag shuffle/dropout
        #: Draws of ``--latents once``: seeded alone, so a resumed run re-encodes the same samples.
        self._encode_generator = torch.Generator().manual_seed(self.seed + 3)
        self.order = EpochOrder(len(self.data), opts.repeats, self.seed + 1)
        self.step_count = plan.start_step
        self.last_loss: float | None = None
        self.last_lr = self.schedule.rate_at(self.step_count + 1)
        self.checkpoint_step: int | None = plan.start_step if plan.checkpoint else None
        self.wrote_target = False
        self.failed: str | None = None
        self.notes = list(plan.notes)
        #: The batch size used: ``--batch``, but never more than one epoch's pictures (a batch would
        #: otherwise hold the same picture twice, and its loss would not be what the user asked for).
        self.batch = min(opts.batch, len(self.data) * opts.repeats)
        if self.batch < opts.batch:
            self.notes.append(f"--batch {opts.batch} is larger than the data set ({len(self.data)} picture(s) x "
                              f"{opts.repeats} repeat(s)); training with --batch {self.batch}")
        self.log_every = max(1, int(opts.log_every))
        self._pending: list[_Pending] = []
        self._good_vectors = self.vectors.detach().clone()
        self._good_step = self.step_count
        self._time_ids: dict[tuple[int, bool], torch.Tensor] = {}
        if plan.checkpoint is not None:
            self._restore(plan.checkpoint)
        stale = remove_stale_temps(plan.log_dir) + remove_stale_temps(plan.target.parent, names=(plan.target.name,))
        if stale:
            self.notes.append(f"removed {len(stale)} temporary file(s) left by an interrupted save")
        self.log = TrainingLog(plan.log_dir, self.name)
        self.log.open(plan.start_step if plan.checkpoint else None)
        self.log.write_settings(self._settings())
        self._checkpointing = bool(opts.gradient_checkpointing) and set_gradient_checkpointing(self.pipe, True)

    # --- state -------------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.step_count >= self.total or self.failed is not None

    @property
    def epoch(self) -> int:
        return self.order.epoch

    def current_vectors(self) -> torch.Tensor:
        return self.vectors.detach().to("cpu", torch.float32).clone()

    def current_parts(self) -> dict[str, torch.Tensor]:
        """The vectors keyed for a file: ``{text_encoder: [N, D]}``, or SDXL's ``{clip_l, clip_g}``."""
        parts = split_vectors(self.current_vectors(), self.model.encoder_widths)
        return {key: part.contiguous() for key, part in parts.items()}

    def _text_encoders(self) -> list[Any]:
        return [m for m in (self.pipe.text_encoder, getattr(self.pipe, "text_encoder_2", None)) if m is not None]

    def _restore(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        if state.get("device_generator") is not None:
            self.device_generator.set_state(state["device_generator"])
        else:
            self.notes.append("the checkpoint predates on-device noise: the noise after it differs from an "
                              "uninterrupted run's")
        self.rng.setstate(_as_tuple(state["py_random"]))
        if int(state.get("dataset_count", -1)) == len(self.data) and int(state.get("repeats", -1)) == self.options.repeats:
            self.order.load_state_dict(state["order"])
        else:
            self.notes.append("the training folder changed since the checkpoint: the picture order starts afresh")

    def _settings(self) -> dict[str, Any]:
        return {
            "name": self.name, "options": self.options.to_params(), "seed": self.seed, "steps": self.total,
            "model": self.model.name, "model_hash": self.model.model_hash, "device": str(self.device),
            "precision": self.precision, "pictures": len(self.data), "size": list(self.size),
            "output": str(self.plan.target), "init_text": self.plan.init_text, "sdrepl_version": __version__,
            "started": _dt.datetime.now().isoformat(timespec="seconds"), "resumed_from": self.checkpoint_step,
        }

    # --- preparation -------------------------------------------------------------------------------

    def prepare_step(self) -> bool:
        """Encode some more pictures to latents; True while some are left (call before training)."""
        if self.data.encoded:
            return False
        if self.offload_vae:
            self.pipe.vae.to(self.device)
        more = self.data.encode_some(self.pipe.vae, self.device, self._encode_generator)
        if not more and self.offload_vae:
            self.pipe.vae.to("cpu")  # not needed again until a preview; frees device memory for the run
        if not more:
            self.data.to_device(self.device)
        return more

    # --- one step ------------------------------------------------------------------------------------

    def step(self) -> StepResult:
        """One optimizer step over ``--accum`` micro-batches of ``--batch`` pictures."""
        if self.finished:
            raise TrainingError(f"{self.name}: the run is already finished at step {self.step_count}")
        while self.prepare_step():
            pass
        number = self.step_count + 1
        lr = self.schedule.rate_at(number)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum = self.options.accum
        total: torch.Tensor | None = None
        if self._checkpointing:
            for text_encoder in self._text_encoders():
                text_encoder.train()  # transformers only checkpoints in training mode (CLIP has no dropout)
        try:
            for _ in range(accum):
                loss = self._micro_batch()
                total = loss.detach() if total is None else total + loss.detach()
                scaled = loss / accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            self._clip_and_step()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            if self._checkpointing:
                for text_encoder in self._text_encoders():
                    text_encoder.eval()
        assert total is not None
        mean = total / accum
        finite = torch.isfinite(mean) & torch.isfinite(self.vectors.detach()).all()
        self._pending.append(_Pending(number, self.order.epoch, lr, mean, finite))
        self.step_count = number
        self.last_lr = lr
        opts = self.options
        saving = bool(opts.save_every and number % opts.save_every == 0 and number < self.total)
        previewing = bool(opts.preview_every and number % opts.preview_every == 0)
        read = number % self.log_every == 0 or number >= self.total or saving or previewing
        loss = self.flush() if read else None
        if saving:
            self.save()
        if previewing:
            self.preview()
        return StepResult(number, loss, lr, self.order.epoch)

    def flush(self) -> float | None:
        """Read back the pending steps' losses and checks in one transfer; log them; stop at the first bad
        one (raises :class:`TrainingDiverged`). Returns the last step's loss (None if nothing was pending)."""
        if not self._pending:
            return self.last_loss
        pending, self._pending = self._pending, []
        values = torch.stack([torch.stack([p.loss.float(), p.finite.float()]) for p in pending]).tolist()
        for entry, (loss, finite) in zip(pending, values, strict=True):
            if not finite:
                with torch.no_grad():
                    self.vectors.copy_(self._good_vectors)
                self.step_count = self._good_step
                what = "the loss" if not math.isfinite(loss) else "the vectors"
                self._diverged(entry.step, loss if what == "the loss" else float("nan"), what)
            self.log.log_loss(entry.step, entry.epoch, loss, entry.lr)
            self.last_loss = loss
        self._good_vectors = self.vectors.detach().clone()
        self._good_step = self.step_count
        return self.last_loss

    def _line(self, index: int) -> str:
        """A filled template line for picture ``index`` (line and tag augmentation drawn from ``self.rng``)."""
        line = self.rng.choice(self.templates)
        words = augment_caption(self.data.pictures[index].caption, self.rng, shuffle=self.options.shuffle_tags,
                                dropout=self.options.tag_dropout)
        return fill_filewords(line, words)

    def _micro_batch(self) -> torch.Tensor:
        indices = self.order.take(self.batch)
        texts = [self._line(i) for i in indices]
        flips = [self.rng.random() < 0.5 for _ in indices] if self.data.flip else [False] * len(indices)
        gen = self.device_generator
        latents = torch.stack([self.data.latent(i, f, gen) for i, f in zip(indices, flips, strict=True)])
        pictures = [(i, self.data.pictures[i], f) for i, f in zip(indices, flips, strict=True)]
        noise = torch.randn(latents.shape, generator=gen, dtype=torch.float32, device=self.device)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (len(indices),), generator=gen, device=self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.prediction == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        unet = self.pipe.unet
        with autocast(self.precision, self.device):
            added = None
            if self.sdxl:  # SDXL training's added conditioning: pooled captions, each picture's time ids
                cond, pooled = self.text.encode(texts, self.vectors)
                ids = torch.stack([self._picture_time_ids(i, p, f) for i, p, f in pictures])
                added = {"text_embeds": pooled.to(unet.dtype), "time_ids": ids.to(unet.dtype)}
            else:
                cond = self.text.encode(texts, self.vectors)
            pred = unet(noisy.to(unet.dtype), timesteps, encoder_hidden_states=cond.to(unet.dtype),
                        added_cond_kwargs=added).sample
        return self.loss_fn(pred.float(), target.float())

    def _picture_time_ids(self, index: int, picture: Any, flipped: bool) -> torch.Tensor:
        """SDXL time ids of one picture, on the device once per picture and flip."""
        key = (index, flipped)
        if key not in self._time_ids:
            self._time_ids[key] = torch.tensor(picture.time_ids(self.size, flipped), dtype=torch.float32,
                                               device=self.device)
        return self._time_ids[key]

    def loss_fn(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean squared error against the noise (or the v-prediction target)."""
        return F.mse_loss(pred, target, reduction="mean")

    def _clip_and_step(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.options.clip_grad is not None:
            mode, amount = self.options.clip_grad
            if mode == "value":
                torch.nn.utils.clip_grad_value_([self.vectors], amount)
            else:
                torch.nn.utils.clip_grad_norm_([self.vectors], amount)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def _diverged(self, step: int, value: float, what: str = "the loss") -> None:
        kept = (f"the last good checkpoint (step {self.checkpoint_step}) is kept in {self.plan.log_dir}"
                if self.checkpoint_step is not None else "no checkpoint had been saved yet")
        self.failed = (f"{what} became {value} at step {step}; training stopped and {kept}. Lower --lr, add "
                       "--clip-grad norm:1, or use --precision fp32/bf16, then --resume or start again")
        raise TrainingDiverged(f"!train {self.name}: {self.failed}")

    # --- outputs -----------------------------------------------------------------------------------

    def save(self) -> None:
        """Checkpoint plus ``embeddings/<name>-<step>.safetensors`` in the log folder."""
        self.save_checkpoint()
        write_embedding(self.log.embedding_path(self.step_count), self.current_parts(), "safetensors",
                        name=self.name, step=self.step_count, checkpoint_hash=self.model.model_hash,
                        checkpoint_name=self.model.name, init_text=self.plan.init_text, overwrite=True)
        try:
            self.log.write_plot()
        except (OSError, ValueError) as exc:  # a plot is a convenience: it never stops a run
            self.notes.append(f"loss.png not written: {exc}"[:200])

    def save_checkpoint(self) -> Path | None:
        """Save a resumable checkpoint of the current step (never after a divergence)."""
        if self.failed is not None:
            return None
        self.flush()
        state = {
            "name": self.name, "step": self.step_count, "vectors": self.current_vectors(),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
            "generator": self.generator.get_state(), "py_random": _as_list(self.rng.getstate()),
            "device_generator": self.device_generator.get_state(),
            "order": self.order.state_dict(), "dataset_count": len(self.data), "repeats": self.options.repeats,
            "seed": self.seed, "options": self.options.to_params(), "init_text": self.plan.init_text,
            "output": str(self.plan.target), "loss": self.last_loss, "model_hash": self.model.model_hash,
        }
        path = save_checkpoint(self.plan.log_dir, state)
        self.checkpoint_step = self.step_count
        return path

    def preview(self) -> Path:
        """Generate ``images/<name>-<step>.png`` with the current vectors, and its A1111 picture card."""
        self.flush()
        prompt = self.options.preview_prompt
        text = as_prompt(prompt.replace(f"<{self.name}>", "[name]"), self.name) if prompt else as_prompt(
            fill_filewords(self.templates[0], self.data.pictures[0].caption), self.name)
        vectors = self.current_vectors()
        lookup = TrainingLookup(standin(self.name, vectors, self.model.encoder_widths), self.library)
        if self.offload_vae:
            self.pipe.vae.to(self.device)
        try:
            cond = encode_prompts(self.model, text, "", lookup)
            width, height = self.size
            image = sample(self.model, cond, steps=PREVIEW_STEPS, cfg=PREVIEW_CFG, width=width, height=height,
                           seed=self.seed)
        finally:
            if self.offload_vae:
                self.pipe.vae.to("cpu")
        path = self.log.image_path(self.step_count)
        with atomic_writer(path) as tmp:
            image.save(tmp, format="PNG")
        if not self.sdxl:  # A1111 picture cards hold one vector set; SDXL pairs have no card form
            write_png_card(self.log.card_path(self.step_count), {SINGLE: vectors}, name=self.name,
                           step=self.step_count, preview=image, checkpoint_hash=self.model.model_hash,
                           checkpoint_name=self.model.name, overwrite=True)
        return path

    def write_final(self) -> Path:
        """Write the embedding so far to its place in the embeddings folder (atomically)."""
        path = write_embedding(self.plan.target, self.current_parts(), self.options.format,
                               name=self.name, step=self.step_count, checkpoint_hash=self.model.model_hash,
                               checkpoint_name=self.model.name, init_text=self.plan.init_text,
                               overwrite=self.plan.replace_ok or self.wrote_target)
        self.wrote_target = True
        return path

    def finish(self) -> Path:
        """End of a run (done or stopped): checkpoint, log embedding and the final file; returns its path."""
        if self.failed is not None:
            raise TrainingError(f"!train {self.name}: {self.failed}")
        self.flush()
        self.save()
        return self.write_final()

    def close(self) -> None:
        """Release what the run holds on the shared model (checkpointing flags, VAE placement, log file)."""
        if self.failed is None:
            try:
                self.flush()  # the pending steps' loss rows (a stopped run)
            except TrainingDiverged:
                pass  # recorded in self.failed; closing still releases everything
        self.log.close()
        if self._checkpointing:
            set_gradient_checkpointing(self.pipe, False)
            self._checkpointing = False
        if self.offload_vae:
            self.pipe.vae.to(self.device)


def _as_list(state: Any) -> Any:
    """``random.getstate()`` as nested lists (``torch.load(weights_only=True)`` round-trips them)."""
    return [_as_list(s) for s in state] if isinstance(state, tuple) else state


def _as_tuple(state: Any) -> Any:
    return tuple(_as_tuple(s) for s in state) if isinstance(state, list) else state


def start_training(model: Any, plan: RunPlan, *, library: EmbeddingLookup | None = None,
                   offload_vae: bool = False) -> Trainer:
    """Build a :class:`Trainer`, logging what was decided."""
    trainer = Trainer(model, plan, library=library, offload_vae=offload_vae)
    log.info("training %s: %d pictures, steps %d..%d, seed %d, precision %s, log %s", plan.options.name,
             len(trainer.data), plan.start_step, trainer.total, trainer.seed, trainer.precision, plan.log_dir)
    for note in trainer.notes:
        log.info("training %s: %s", plan.options.name, note)
    return trainer
