"""The bottom toolbar: the live token budget of the line being typed, the model, a running training job.

The toolbar is a callable evaluated at every redraw and only reads the state. The budget is computed by
the daemon (its tokenizer, its embeddings): :class:`BudgetTracker` sends ``tokens`` requests from a
background task as the user types, stores each reply on the state and redraws. Typing never waits on
it: keystrokes only record the latest text; while one request is in flight further keystrokes coalesce
into the next one, which is all the debouncing a local socket needs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import Callable
from typing import Any

from sdrepl.core.display import visible
from sdrepl.core.errors import SdreplError
from sdrepl.core.status_text import format_duration
from sdrepl.repl.lines import logical_text
from sdrepl.repl.parse import GENERATION_OPTIONS, Option, split_options, to_text
from sdrepl.repl.state import Budget, ReplState

log = logging.getLogger("sdrepl.repl")

#: where an option may start (to cut a half-typed trailing option off).
_OPTION_START = re.compile(r"(?:^|(?<=\s))-")


@functools.lru_cache(maxsize=1)
def _lenient_generation_options() -> tuple[Option, ...]:
    """The session's generation options with every value taken as text (a half-typed value still splits)."""
    return tuple(Option(o.key, o.names, to_text if o.convert else None, o.metavar) for o in GENERATION_OPTIONS)


def split_prompt(text: str) -> tuple[str, str | None]:
    """``a cat --neg blurry --steps 20`` -> ``("a cat", "blurry")``; the negative is None when not given."""
    head, values = split_line(text)
    return head, values.get("negative")


def line_settings(text: str) -> dict[str, Any]:
    """The ``--steps``, ``--emphasis`` and ``--comma-padding-backtrack`` of a generation or ``!tokens`` line
    as typed so far, where they are complete and valid: a schedule like ``[a:b:10]`` is counted for the
    steps the line will run, with the line's own prompt settings."""
    from sdrepl.repl.parse import to_emphasis

    stripped = text.strip()
    if stripped.startswith("!"):
        stripped = stripped.partition(" ")[2]
    values = split_line(stripped)[1]
    out: dict[str, Any] = {}
    for key, convert in (("steps", int), ("emphasis", to_emphasis), ("comma_padding_backtrack", int)):
        if values.get(key) is not None:
            try:
                out[key] = convert(values[key])
            except ValueError:
                pass
    return out


def split_line(text: str) -> tuple[str, dict[str, Any]]:
    """The prompt and the option values (as text) of a line being typed.

    Splits with the session's own parser (``sdrepl.repl.parse.split_options``, short options included)
    so the toolbar counts exactly what a generation would send. While an option is half typed
    (``--ne``, ``--neg`` with no value yet) the line does not parse; the trailing option is then cut off
    and the rest split again, so the count never flickers away while typing.
    """
    options = _lenient_generation_options()
    for _ in range(32):
        try:
            return split_options(text, options, where="toolbar", short=True)
        except SdreplError:
            starts = [m.start() for m in _OPTION_START.finditer(text)]
            if not starts or starts[-1] == 0:
                return "", {}
            text = text[: starts[-1]]
    return "", {}


def budget_request(text: str, default_negative: str = "") -> tuple[str, str] | None:
    """What to count for a buffer: ``(prompt, negative)``, or None for lines that have no prompt.

    Generation lines and ``!tokens`` lines have one (the session's default negative applies to both when
    the line has no ``--neg``); other meta-commands, comments and blank lines do not.
    """
    stripped = text.strip()
    if not stripped or stripped.startswith("#") or stripped == '"""':
        return None
    if stripped.startswith('"""') and "\n" in stripped:  # a whole block in the buffer (!NN, !fetch, a paste)
        stripped = logical_text(stripped)
    if stripped.startswith("!"):
        command, _, rest = stripped[1:].partition(" ")
        if command.lower() != "tokens":
            return None
        stripped = rest
    prompt, negative = split_prompt(stripped)
    return prompt, default_negative if negative is None else negative


class BudgetTracker:
    """Keeps ``state.budget`` matching the buffer, through the daemon's ``tokens`` request.

    ``on_text_changed`` is cheap and synchronous (hook it to ``Buffer.on_text_changed``); :meth:`run` is
    the background task. ``get_prefix`` supplies the lines of an open ``\"\"\"`` block, counted with the
    buffer; ``get_default_negative`` the session's ``!set negative``.
    """

    def __init__(self, client: Any, state: ReplState, *, debounce: float = 0.0,
                 get_prefix: Callable[[], str] | None = None,
                 get_default_negative: Callable[[], str] | None = None,
                 get_settings: Callable[[], dict[str, Any]] | None = None) -> None:
        self.client = client
        self.state = state
        self.debounce = debounce
        self.get_prefix = get_prefix or (lambda: "")
        self.get_default_negative = get_default_negative or (lambda: "")
        #: The session's ``steps`` and prompt settings, sent with each ``tokens`` request.
        self.get_settings = get_settings or (lambda: {})
        self.wanted: tuple[str, str] | None = None
        self.params: dict[str, Any] = {}
        self.changed_at = 0.0
        self._dirty = asyncio.Event()
        self._task: asyncio.Task | None = None

    def on_text_changed(self, text: str) -> None:
        """Record the latest text and wake the worker; never blocks, never raises."""
        try:
            prefix = self.get_prefix()
            full = f"{prefix}\n{text}" if prefix else text
            self.wanted = budget_request(full, self.get_default_negative() or "")
            self.params = {k: v for k, v in self.get_settings().items() if v is not None}
            self.params.update(line_settings(text))
            self.changed_at = time.perf_counter()
            if self.wanted is None:
                if self.state.budget is not None:
                    self.state.set_budget(None)
                return
            self._dirty.set()
        except Exception:
            log.exception("budget: could not read the line")

    def refresh(self) -> None:
        """Count the same text again (the library or the model changed under it)."""
        if self.wanted is not None:
            self._dirty.set()

    def on_event(self, event: dict[str, Any]) -> None:
        if event.get("event") in ("embeddings", "model"):
            self.refresh()

    def start(self) -> asyncio.Task:
        self._task = asyncio.get_running_loop().create_task(self.run())
        return self._task

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except BaseException:
                pass

    async def run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            if self.debounce:
                await asyncio.sleep(self.debounce)
            wanted, params = self.wanted, dict(self.params)
            if wanted is None:
                continue
            try:
                budget = await self.count(*wanted, **params)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let the toolbar's helper die; show why instead
                log.exception("budget request failed")
                budget = Budget(*wanted, error=f"{type(exc).__name__}: {exc}")
            if self.wanted is not None:
                self.state.set_budget(budget)

    async def count(self, prompt: str, negative: str, **params: Any) -> Budget:
        """One ``tokens`` request; a refused prompt (unknown ``<name>``) becomes the budget's error."""
        try:
            result = await self.client.request("tokens", prompt=prompt, negative=negative, **params)
        except Exception as exc:
            message = getattr(exc, "message", None)
            if message is None:
                raise
            return Budget(prompt, negative, error=message)
        return Budget(prompt, negative, result=result)


# -- drawing ----------------------------------------------------------------------------------------


def budget_parts(budget: Budget | None, state: ReplState) -> list[tuple[str, str]]:
    """``tokens 12/75 · neg 8/75 · <bad-prompt> 16v · 2 chunks``, or the reason it cannot be counted."""
    if budget is None:
        return []
    if budget.error:
        return [("class:toolbar.error", f"tokens: {budget.error.splitlines()[0][:120]}")]
    res = budget.result or {}
    parts = [("", f"tokens {res.get('count', '?')}/{res.get('limit', '?')}")]
    neg = res.get("negative") or {}
    if budget.negative or neg.get("count"):
        parts.append(("", f"neg {neg.get('count', '?')}/{neg.get('limit', '?')}"))
    chunks = res.get("chunks") or 0
    if chunks > 1:
        parts.append(("class:toolbar.warn", f"{chunks} chunks"))
    note = schedule_note(res)
    if note:
        parts.append(("class:toolbar.warn", note))
    names = list(dict.fromkeys(_names(res.get("embeddings")) + _names(neg.get("embeddings"))))
    if names:
        parts.append(("class:toolbar.embedding", " ".join(_with_vectors(n, state) for n in names)))
    bare = list(dict.fromkeys(_names(res.get("bare")) + _names(neg.get("bare"))))
    if bare:
        parts.append(("class:toolbar.warn", "bare: " + ", ".join(bare)))
    networks = [_lora_weights(item) for item in res.get("loras") or []]
    networks += [f"hypernet {h.get('name')}:{h.get('strength'):g}" for h in res.get("hypernetworks") or []]
    if networks:
        parts.append(("class:toolbar.embedding", " ".join(networks)))
    return parts


def _lora_weights(item: dict[str, Any]) -> str:
    """``lora style:0.8`` (one weight) or ``lora style:0.5/1`` (text encoder / UNet)."""
    te, unet = item.get("te", 1.0), item.get("unet", 1.0)
    weights = f"{te:g}" if te == unet else f"{te:g}/{unet:g}"
    return f"lora {item.get('name')}:{weights}"


def schedule_note(res: dict[str, Any]) -> str:
    """``AND 2/75 76/150×0.5`` for AND parts, ``3 prompts over 20 steps`` when the prompt changes while
    sampling (the count shown is then the largest any step uses); empty for a plain prompt."""
    notes = []
    parts = res.get("parts") or []
    if len(parts) > 1 or (parts and parts[0].get("weight", 1.0) != 1.0):
        shown = [f"{p.get('count', '?')}/{p.get('limit', '?')}" + ("" if p.get("weight", 1.0) == 1.0 else
                 f"×{p.get('weight'):g}") for p in parts]
        notes.append("AND " + " ".join(shown) if len(parts) > 1 else f"weight {parts[0].get('weight'):g}")
    if res.get("changes"):
        texts = len(res.get("schedule") or []) or sum(len(p.get("schedule") or []) or 1 for p in parts)
        notes.append(f"{texts} prompts over {res.get('steps', '?')} steps")
    return ", ".join(notes)


def _names(items: Any) -> list[str]:
    return [item["name"] if isinstance(item, dict) else str(item) for item in items or []]


def _with_vectors(name: str, state: ReplState) -> str:
    emb = state.find_embedding(name)
    vectors = emb.get("vectors") if emb else None
    return f"<{name}>" if vectors is None else f"<{name}> {vectors}v"


def model_part(state: ReplState) -> tuple[str, str] | None:
    if state.daemon_gone:
        return ("class:toolbar.error", f"daemon gone: {state.daemon_gone}")
    model = state.model or {}
    name = model.get("model") or "?"
    if state.model_state in ("loading", "error", "unloaded"):
        return ("class:toolbar.warn", f"{state.model_state} {name}")
    if not model:
        return None
    device = " ".join(str(model[k]) for k in ("device", "dtype") if model.get(k))
    return ("", f"{name} {device}".strip())


def training_part(state: ReplState) -> tuple[str, str] | None:
    """``train cat-toy 120/3000 loss 0.123 4.5 it/s ETA 10m40s`` while a job is alive (``format_duration``:
    the one ETA format of ``!train status`` and ``sdrepl status`` too)."""
    job = state.training
    if not job or job.get("state") not in ("starting", "running", "paused", "stopping"):
        return None
    text = f"train {job.get('name', '?')} {job.get('step', 0)}/{job.get('total', '?')}"
    if job.get("loss") is not None:
        text += f" loss {job['loss']:.3f}"
    if job.get("it_s"):
        text += f" {job['it_s']:.1f} it/s"
    if job.get("state") == "running":
        eta = job.get("eta_s")
        text += f" ETA {format_duration(eta) if isinstance(eta, (int, float)) and eta >= 0 else '?'}"
    else:
        text += f" ({job['state']})"
    return ("class:toolbar.train", text)


def render_toolbar(state: ReplState) -> list[tuple[str, str]]:
    """The toolbar's fragments, from the state alone; a bug here shows a short note, never a crash."""
    try:
        parts = budget_parts(state.budget, state)
        queue = state.queue or {}
        if queue.get("pending"):
            parts.append(("", f"queue {queue['pending']}"))
        for part in (training_part(state), model_part(state)):
            if part:
                parts.append(part)
        out: list[tuple[str, str]] = []
        for i, (style, text) in enumerate(parts):
            if i:
                out.append(("", " · "))
            out.append((style, visible(text)))  # names and paths come from files: never raw
        return out or [("", " ")]
    except Exception:
        log.exception("toolbar failed")
        return [("class:toolbar.error", "toolbar error (see the REPL log)")]


def toolbar_text(state: ReplState) -> str:
    """The toolbar as plain text (tests, scripted displays)."""
    return "".join(text for _, text in render_toolbar(state))
