"""What a training run starts from and where it ends, decided before anything is written.

A run starts from NAME's last checkpoint (``--resume``), from the existing embedding NAME (training it
further), or from ``--init`` text (a new embedding, as ``!create``). Its final file is
``<first embeddings folder>/<NAME>.safetensors`` (``.pt`` with ``--format pt``). Replacing an existing file
needs ``--overwrite``, with two exceptions that are the same run continuing: ``--resume`` replacing the
output its own checkpoint recorded, and an untrained (step 0) file that ``!create`` made for this purpose
(create, then train: A1111's workflow). All of this is checked here, so a refused run changes nothing.

A run is only finished when its final file is in the embeddings folder: the last checkpoint is saved
first, so a failed final write (disk full) or a kill in between leaves a checkpoint at the last step and
no file. ``--resume`` then completes the publication from that checkpoint without training a step
(:attr:`RunPlan.publish_only`); only a run whose final file holds the checkpoint's vectors is "already
at step N".
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdrepl.core.create import create_embedding_vectors
from sdrepl.core.embedding import Embedding
from sdrepl.core.errors import EmbeddingError, TrainingError
from sdrepl.core.formats import read_embedding
from sdrepl.core.training.checkpoint import find_checkpoint, load_checkpoint
from sdrepl.core.training.options import TrainOptions
from sdrepl.core.training.vectors import join_vectors


@dataclass
class RunPlan:
    options: TrainOptions
    log_dir: Path
    #: The final embedding file.
    target: Path
    #: Whether the final write may replace an existing ``target``.
    replace_ok: bool
    #: Starting vectors ``[N, D]`` float32 on the CPU (SDXL: ``[N, 768 + 1280]``, see core.training.vectors).
    vectors: torch.Tensor
    init_text: str | None
    seed: int
    checkpoint: dict[str, Any] | None = None
    #: Things the user should know (shown in the job's log / reply).
    notes: list[str] = field(default_factory=list)
    #: A resumed run that had reached its end without its final file: write it, train nothing.
    publish_only: bool = False

    @property
    def start_step(self) -> int:
        return int(self.checkpoint["step"]) if self.checkpoint else 0


def is_published(checkpoint: dict[str, Any], widths: dict[str, int]) -> bool:
    """Whether the final file a checkpoint's run writes holds that checkpoint's vectors (the run's last
    step reached its embeddings folder). A missing, unreadable or different file means it did not."""
    output = checkpoint.get("output")
    if not output or not Path(output).is_file():
        return False
    try:
        data = read_embedding(Path(output))
        vectors = join_vectors(data.vectors, widths)
    except (EmbeddingError, ValueError):
        return False
    return data.step == int(checkpoint["step"]) and torch.equal(vectors, checkpoint["vectors"].to(torch.float32))


def plan_run(model: Any, options: TrainOptions, *, embeddings_dir: Path, cwd: Path,
             existing: Embedding | None = None) -> RunPlan:
    """Decide the run (see module docstring); raise TrainingError when it must not start."""
    widths = model.encoder_widths
    width = sum(widths.values())  # SDXL: clip_l and clip_g side by side (see core.training.vectors)
    checkpoint = None
    notes: list[str] = []
    publish_only = False
    if options.resume:
        explicit_log = options.resolved_log_dir(cwd) if options.log_dir is not None else None
        found = find_checkpoint(options.name, cwd, explicit_log)
        if found is None:
            where = explicit_log or cwd / "textual_inversion" / "*" / options.name
            raise TrainingError(f"!train {options.name} --resume: no checkpoint found (looked for {where}/checkpoint.pt); "
                                "start without --resume, or give the run's --log-dir")
        checkpoint = load_checkpoint(found)
        if checkpoint.get("name") != options.name:
            raise TrainingError(f"--resume: {found} belongs to {checkpoint.get('name')!r}, not {options.name!r}")
        given = {k: v for k, v in options.to_params().items() if k in options.explicit}
        options = TrainOptions.from_params({**given, "resume": True}, base=checkpoint.get("options", {}))
        log_dir = found.parent
        step = int(checkpoint["step"])
        if options.steps <= step:
            if is_published(checkpoint, widths):
                raise TrainingError(f"--resume: {options.name} is already at step {step}; give --steps above {step} "
                                    "to train further")
            # The run reached its end but its final file never appeared (the write failed, or the daemon
            # was killed between the last checkpoint and the final write): publish it, train nothing.
            publish_only = True
            notes.append(f"the run had finished at step {step} but its final file was not written: writing it "
                         "now from the last checkpoint (no further training)")
    else:
        log_dir = options.resolved_log_dir(cwd)
    suffix = ".pt" if options.format == "pt" else ".safetensors"
    target = Path(embeddings_dir) / f"{options.name}{suffix}"
    own_output = checkpoint is not None and checkpoint.get("output") == str(target)
    untrained = existing is not None and existing.data.step == 0
    taken = [str(p) for p in {target, *([existing.path] if existing is not None else [])} if Path(p).exists()]
    if taken and not (options.overwrite or own_output or untrained):
        raise TrainingError(
            f"!train {options.name}: an embedding {options.name!r} already exists ({', '.join(sorted(taken))}) and "
            "training would replace it; add --overwrite to train it further and replace the file, --resume to "
            "continue its last run, or choose another name"
        )
    if checkpoint is not None:
        vectors = checkpoint["vectors"].to(torch.float32)
        init_text = checkpoint.get("init_text")
        seed = int(checkpoint["seed"])
        if options.seed is not None and options.seed != seed:
            notes.append(f"--seed {options.seed} ignored: a resumed run keeps its seed {seed}")
    else:
        if existing is not None:
            try:
                vectors = join_vectors(existing.vectors, widths)
            except ValueError as exc:
                raise TrainingError(f"{existing.path}: this embedding does not fit the {model.label} model ({exc}); "
                                    "train a new name for this model") from None
            init_text = existing.data.init_text
            if "init" in options.explicit or "vectors" in options.explicit:
                notes.append(f"--init/--vectors ignored: {options.name} exists, training continues from its vectors")
        else:
            vectors = join_vectors(create_embedding_vectors(model, options.init, options.vectors), widths)
            init_text = options.init
        seed = options.seed if options.seed is not None else secrets.randbelow(2**31)
    if vectors.ndim != 2 or vectors.shape[1] != width:
        raise TrainingError(f"!train {options.name}: the starting vectors are {list(vectors.shape)}, but this model's "
                            f"text encoders are {width} wide ({' + '.join(map(str, widths.values()))}); train a new "
                            "name for this model")
    return RunPlan(options, log_dir, target, bool(taken) or own_output, vectors, init_text, seed, checkpoint, notes,
                   publish_only)
