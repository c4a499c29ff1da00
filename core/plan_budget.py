"""The token budget of a scheduled prompt pair: what the toolbar and ``!tokens`` show for editing and AND.

A prompt whose text changes during sampling (``[a:b:0.5]``, ``[a|b]``) is encoded once per distinct text,
each text with its own chunks; a prompt with ``AND`` is encoded once per part. What decides the length
(and the cost) of the conditioning is the largest of them, so the budget shown is the text with the most
tokens, over every step and every part: the same rules, one text at a time, so it is exactly what is
encoded. The JSON keeps the keys of a plain prompt's budget (``count``, ``limit``, ``chunks``,
``embeddings``, ``bare``, ``chunk_texts``: those of that largest text, embeddings and bare words of all),
and adds:

- ``steps``: the step count the schedule was made for; ``changes``: whether the text changes while
  sampling;
- ``schedule`` (only when it changes): each distinct text with the step ranges that use it
  (``[[1, 17]]``, counted from 1) and its own ``count``/``limit``/``chunks``;
- ``parts`` (only with ``AND`` or a trailing weight): each part's ``text``, ``weight`` and budget (the
  same shape again).
"""

from __future__ import annotations

from typing import Any

from sdrepl.core.budget import Budget, count_tokens
from sdrepl.core.prompt import EmbeddingLookup, PromptOptions
from sdrepl.core.schedule import PromptPlan, PromptSchedule, plan_prompts


def _ranges(schedule: PromptSchedule) -> dict[str, list[list[int]]]:
    """Distinct text -> its step ranges, counted from 1, in order of first use."""
    out: dict[str, list[list[int]]] = {}
    for span in schedule.spans():
        out.setdefault(span.text, []).append(span.describe()["steps"])
    return out


def _merge(budgets: list[Budget]) -> dict[str, Any]:
    """The largest budget's numbers, with the embeddings and bare words of all."""
    largest = max(budgets, key=lambda b: b.count)  # first of the largest, in order of use
    result = largest.describe()
    result["embeddings"] = list(dict.fromkeys(name for b in budgets for name in b.embeddings))
    result["bare"] = list(dict.fromkeys(word for b in budgets for word in b.bare))
    return result


def schedule_budget(schedule: PromptSchedule, count: Any) -> dict[str, Any]:
    """One schedule's budget; ``count(text) -> Budget`` counts one flat text."""
    ranges = _ranges(schedule)
    budgets = {text: count(text) for text in ranges}
    result = _merge(list(budgets.values()))
    result["steps"] = schedule.steps
    result["changes"] = len(ranges) > 1
    if len(ranges) > 1:
        result["schedule"] = [
            {"text": text, "steps": steps, "count": budgets[text].count, "limit": budgets[text].limit,
             "chunks": budgets[text].chunks}
            for text, steps in ranges.items()
        ]
    return result


def plan_budget(plan: PromptPlan, count: Any) -> dict[str, Any]:
    """The budget JSON of a whole plan (see the module docstring); ``count(text) -> Budget``."""
    parts = [schedule_budget(part.schedule, count) for part in plan.parts]
    largest = max(range(len(parts)), key=lambda i: parts[i]["count"])
    result = dict(parts[largest])
    result["embeddings"] = list(dict.fromkeys(n for p in parts for n in p["embeddings"]))
    result["bare"] = list(dict.fromkeys(w for p in parts for w in p["bare"]))
    result["changes"] = any(p["changes"] for p in parts)
    if len(parts) > 1:
        result.pop("schedule", None)  # each part lists its own
    if plan.composed:
        result["parts"] = [
            {"text": part.text, "weight": part.weight, **budget}
            for part, budget in zip(plan.parts, parts, strict=True)
        ]
    result["negative"] = schedule_budget(plan.negative, count)
    return result


def scheduled_prompt_budget(
    prompt: str,
    negative: str,
    tokenizer: Any,
    lookup: EmbeddingLookup,
    options: PromptOptions | None = None,
    *,
    steps: int = 20,
) -> dict[str, Any]:
    """The JSON of ``!tokens`` for a prompt pair sampled in ``steps`` steps (A1111's language in full)."""
    options = options or PromptOptions()
    cache: dict[str, Budget] = {}

    def count(text: str) -> Budget:
        if text not in cache:
            cache[text] = count_tokens(text, tokenizer, lookup, options)
        return cache[text]

    return plan_budget(plan_prompts(prompt, negative, steps), count)
