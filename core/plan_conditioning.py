"""Conditioning for a scheduled prompt pair: each distinct text encoded once, handed out per sampling step.

:func:`sdrepl.core.schedule.plan_prompts` says which flat text every ``AND`` part and the negative prompt
use at each step; :class:`ScheduledConditioning` holds one encoded tensor per distinct text (a text used by
the positive and the negative prompt is encoded once) and builds, for sampling step ``k`` (from 0), the
tensors A1111 would use there:

- the parts, each ``[1, 77*n, D]`` with its ``AND`` weight, padded to the longest part by repeating its
  last vector (A1111's ``stack_conds``, so they can run as one batch);
- the negative, and the longer of positive and negative padded with the empty prompt's chunk, as
  :func:`sdrepl.core.conditioning.encode_prompts` does for a plain prompt (so a prompt without editing
  or ``AND`` gives bit for bit the tensors it gave before).

The combination of the parts' noise predictions is the sampling loop's: ``uncond + cfg * sum_i w_i *
(cond_i - uncond)`` (A1111's ``combine_denoised``). Encoding is per model family: the encoder is passed
in as ``encode(text) -> tensor``, so the SDXL conditioning can reuse the schedule and this step logic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sdrepl.core.schedule import PromptPlan


@dataclass(frozen=True)
class StepConditioning:
    """What one sampling step uses: ``(prompt_embeds, weight)`` per ``AND`` part, and the negative; SDXL's
    pooled embeddings (``[1, 1280]``) per part and for the negative, or None for SD 1.x/2.x."""

    parts: tuple[tuple[torch.Tensor, float], ...]
    negative: torch.Tensor
    pooled: tuple[torch.Tensor, ...] | None = None
    negative_pooled: torch.Tensor | None = None

    @property
    def plain(self) -> bool:
        """One part of weight 1: ordinary classifier-free guidance."""
        return len(self.parts) == 1 and self.parts[0][1] == 1.0


def pad_with_last(z: torch.Tensor, length: int) -> torch.Tensor:
    """``[1, L, D]`` -> ``[1, length, D]`` by repeating the last position (A1111 for ``AND`` parts)."""
    missing = length - z.shape[1]
    return z if missing <= 0 else torch.cat([z, z[:, -1:].expand(-1, missing, -1)], dim=1)


def pad_with_chunk(z: torch.Tensor, length: int, empty: torch.Tensor) -> torch.Tensor:
    """``[1, L, D]`` -> ``[1, length, D]`` with whole copies of the empty prompt's chunk ``[1, 77, D]``."""
    missing = length - z.shape[1]
    if missing <= 0:
        return z
    repeats = missing // empty.shape[1]
    return torch.cat([z, empty.expand(repeats, -1, -1).reshape(1, -1, z.shape[-1])], dim=1)


@dataclass
class ScheduledConditioning:
    """A plan's encoded texts; :meth:`at` gives a step's tensors (cached per distinct combination)."""

    plan: PromptPlan
    #: Flat text -> ``[1, 77*n, D]``.
    embeds: dict[str, torch.Tensor]
    #: The empty prompt's chunk ``[1, 77, D]``, for padding positive against negative.
    empty: torch.Tensor
    #: :func:`sdrepl.core.plan_budget.plan_budget`'s dict (a generation's ``tokens``).
    budget: dict[str, Any]
    #: SDXL: flat text -> pooled ``[1, 1280]`` (the negative's under ``negative_key``); None otherwise.
    pooled: dict[str, torch.Tensor] | None = None
    #: SDXL: an all-empty negative prompt conditions on zeros (A1111's rule), stored under this key.
    negative_key: str | None = None
    _steps: dict[tuple[str, ...], StepConditioning] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, plan: PromptPlan, encode: Callable[[str], torch.Tensor], empty: torch.Tensor,
              budget: dict[str, Any]) -> ScheduledConditioning:
        """Encode every distinct text of ``plan`` once, in order of first use."""
        return cls(plan, {text: encode(text) for text in plan.texts()}, empty, budget)

    def texts_at(self, step: int) -> tuple[str, ...]:
        """The parts' texts and then the negative's text at sampling step ``step`` (from 0)."""
        step = min(max(step, 0), self.plan.steps - 1)
        negative = self.negative_key if self.negative_key is not None else self.plan.negative.text_at(step)
        return (*(part.schedule.text_at(step) for part in self.plan.parts), negative)

    def at(self, step: int) -> StepConditioning:
        """The tensors sampling step ``step`` (from 0) uses; a step past the schedule uses its last."""
        key = self.texts_at(step)
        found = self._steps.get(key)
        if found is None:
            found = self._steps[key] = self._assemble(key)
        return found

    def _assemble(self, texts: tuple[str, ...]) -> StepConditioning:
        parts = [self.embeds[text] for text in texts[:-1]]
        negative = self.embeds[texts[-1]]
        longest = max(z.shape[1] for z in parts)
        parts = [pad_with_last(z, longest) for z in parts]
        length = max(longest, negative.shape[1])
        parts = [pad_with_chunk(z, length, self.empty) for z in parts]
        negative = pad_with_chunk(negative, length, self.empty)
        weights = [part.weight for part in self.plan.parts]
        pooled = negative_pooled = None
        if self.pooled is not None:
            pooled = tuple(self.pooled[text] for text in texts[:-1])
            negative_pooled = self.pooled[texts[-1]]
        return StepConditioning(tuple(zip(parts, weights, strict=True)), negative, pooled, negative_pooled)

    def provider(self, width: int, height: int) -> Callable[[int], Any]:
        """``step -> core.denoise.StepCond`` for sdrepl's sampling loop (SDXL: pooled and time ids added)."""
        from sdrepl.core.denoise import Cond, StepCond

        made: dict[int, Any] = {}
        ids = None
        if self.pooled is not None:
            from sdrepl.core.conditioning_sdxl import time_ids

            ids = time_ids(width, height)

        def added(pooled: torch.Tensor | None) -> dict[str, torch.Tensor]:
            if pooled is None or ids is None:
                return {}
            return {"text_embeds": pooled, "time_ids": ids.to(pooled.device, pooled.dtype)}

        def provide(step: int) -> Any:
            at = self.at(step)
            key = id(at)
            if key not in made:
                pooled = at.pooled or (None,) * len(at.parts)
                made[key] = StepCond([(Cond(z, added(p)), w) for (z, w), p in zip(at.parts, pooled, strict=True)],
                                     Cond(at.negative, added(at.negative_pooled)))
            return made[key]

        return provide

    @property
    def changes(self) -> bool:
        """Whether the tensors change during sampling."""
        return self.plan.changes


def encode_scheduled(model: Any, prompt: str, negative: str, lookup: Any, options: Any = None, *,
                     steps: int) -> ScheduledConditioning:
    """Plan, encode (SD 1.x/2.x text encoder) and budget a prompt pair for ``steps`` sampling steps."""
    from sdrepl.core.conditioning import empty_chunk, encode_chunks, encode_flat, join_chunks
    from sdrepl.core.plan_budget import plan_budget
    from sdrepl.core.prompt import PromptOptions
    from sdrepl.core.schedule import plan_prompts

    options = options or PromptOptions()
    plan = plan_prompts(prompt, negative, steps)
    if getattr(model, "family", None) == "sdxl":
        return _encode_scheduled_sdxl(model, plan, lookup, options)
    budgets: dict[str, Any] = {}

    def encode(text: str) -> torch.Tensor:
        z, budgets[text] = encode_flat(model, text, lookup, options)
        return z

    with torch.no_grad():
        embeds = {text: encode(text) for text in plan.texts()}
        empty = join_chunks(encode_chunks(model.text_encoder, [empty_chunk(model.tokenizer)], options.clip_skip))
    return ScheduledConditioning(plan, embeds, empty, plan_budget(plan, budgets.__getitem__))


#: The key of SDXL's zero negative (no prompt text can be this: it holds a NUL, which ftfy would remove).
ZERO_NEGATIVE = "\0zero negative"


def _encode_scheduled_sdxl(model: Any, plan: Any, lookup: Any, options: Any) -> ScheduledConditioning:
    """SDXL: both encoders per text and the pooled embedding; an all-empty negative is zeros (A1111)."""
    from sdrepl.core.conditioning_sdxl import empty_sdxl, encode_flat_sdxl
    from sdrepl.core.plan_budget import plan_budget

    budgets: dict[str, Any] = {}
    embeds: dict[str, torch.Tensor] = {}
    pooled: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for text in plan.texts():
            embeds[text], pooled[text], budgets[text] = encode_flat_sdxl(model, text, lookup, options)
        negative_key = None
        if plan.negative.texts() == [""]:
            negative_key = ZERO_NEGATIVE
            embeds[negative_key], pooled[negative_key] = torch.zeros_like(embeds[""]), torch.zeros_like(pooled[""])
        empty = empty_sdxl(model, options.clip_skip)
    return ScheduledConditioning(plan, embeds, empty, plan_budget(plan, budgets.__getitem__), pooled, negative_key)

