"""The bottom toolbar: the live token budget while typing, the model, a training job.

The budget comes from a fake daemon client that answers ``tokens`` with the real core budget (the real
CLIP tokenizer and the shared fixture embeddings), so ``<bad-prompt>`` costs its real 16 vectors.
Typing goes through a PromptSession on a pipe input; the assertions read the state and the toolbar's
text, never escape codes.
"""

from __future__ import annotations

import asyncio

import pytest
from prompt_toolkit import PromptSession
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from sdrepl.core.budget import prompt_budget
from sdrepl.core.embedding import SINGLE
from sdrepl.core.errors import SdreplError
from sdrepl.core.library import EmbeddingLibrary
from sdrepl.daemon.client import RemoteError
from sdrepl.repl import render
from sdrepl.repl.state import Budget, ReplState
from sdrepl.repl.toolbar import (
    BudgetTracker,
    budget_request,
    render_toolbar,
    split_prompt,
    toolbar_text,
)


@pytest.fixture(scope="module")
def library(fixtures_dir):
    lib = EmbeddingLibrary([fixtures_dir / "a1111", fixtures_dir / "diffusers" / "birb-style"], {SINGLE: 768})
    lib.scan()
    return lib


class BudgetClient:
    """Answers ``tokens`` as the daemon does (core budget; core errors become RemoteError replies)."""

    def __init__(self, tokenizer, library, delay: float = 0.0) -> None:
        self.tokenizer, self.library, self.delay = tokenizer, library, delay
        self.requests: list[tuple[str, str]] = []

    async def request(self, type: str, **params):
        assert type == "tokens", type
        self.requests.append((params["prompt"], params["negative"]))
        await asyncio.sleep(self.delay)
        try:
            return prompt_budget(params["prompt"], params["negative"], self.tokenizer, self.library)
        except SdreplError as exc:
            raise RemoteError(exc.type_name, str(exc)) from None


def type_and_count(keys: str, client, state: ReplState | None = None) -> ReplState:
    """Type ``keys`` into a PromptSession whose buffer feeds a BudgetTracker; wait for the budget."""
    state = state or ReplState()

    async def main() -> None:
        tracker = BudgetTracker(client, state)
        with create_pipe_input() as pipe:
            session = PromptSession(input=pipe, output=DummyOutput(), bottom_toolbar=lambda: render_toolbar(state))
            def on_change(buffer):
                tracker.on_text_changed(buffer.text)

            session.default_buffer.on_text_changed += on_change
            tracker.start()
            result = asyncio.ensure_future(session.prompt_async())
            pipe.send_text(keys)
            wanted = budget_request(keys)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while state.budget is None or (state.budget.prompt, state.budget.negative) != wanted:
                assert loop.time() < deadline, f"no budget arrived for {wanted}"
                await asyncio.sleep(0.01)
            session.default_buffer.on_text_changed -= on_change  # keep the budget past Enter
            pipe.send_text("\r")
            await asyncio.wait_for(result, 5)
            await tracker.close()

    asyncio.run(main())
    return state


# -- splitting a line into what gets counted ------------------------------------------------------------


@pytest.mark.parametrize(("line", "expected"), [
    ("a photo of a tree by monet", ("a photo of a tree by monet", "")),
    ("a cat --neg blurry --steps 20", ("a cat", "blurry")),
    ("a cat --steps 20 --neg lowres, <bad-prompt>", ("a cat", "lowres, <bad-prompt>")),
    ("a cat --ne", ("a cat", "")),              # an option being typed is not prompt text
    ("a cat --neg", ("a cat", "")),
    ("a cat -s 30", ("a cat", "")),             # InvokeAI's short options, as the session parses them
    ("a cat -- dog", ("a cat -- dog", "")),     # `--` alone is text
    ("!tokens a <bad-hands-5> --neg ugly", ("a <bad-hands-5>", "ugly")),
])
def test_budget_request_splits_like_the_session(line, expected):
    assert budget_request(line) == expected


@pytest.mark.parametrize("line", ["", "   ", "# a comment", "!help", "!train cat --data pics", '"""'])
def test_lines_without_a_prompt_have_no_budget(line):
    assert budget_request(line) is None


def test_the_session_negative_applies_unless_the_line_has_one():
    assert budget_request("a cat", default_negative="ugly") == ("a cat", "ugly")
    assert budget_request("a cat --neg blurry", default_negative="ugly") == ("a cat", "blurry")
    assert split_prompt("a cat") == ("a cat", None)


# -- the budget while typing ----------------------------------------------------------------------------


def test_typing_an_embedding_counts_its_vectors(tokenizer, library):
    state = type_and_count("lowres, <bad-prompt>", BudgetClient(tokenizer, library))
    text = toolbar_text(state)
    assert "tokens 19/75" in text  # lowres (2) + , (1) + 16 vectors
    assert "<bad-prompt>" in text


def test_the_negative_is_counted_separately(tokenizer, library):
    state = type_and_count("a photo of a tree by monet --neg lowres, <bad-prompt>", BudgetClient(tokenizer, library))
    assert state.budget.result["count"] == 7
    assert "tokens 7/75 · neg 19/75" in toolbar_text(state)


def test_a_long_prompt_shows_its_chunks(tokenizer, library):
    state = type_and_count("cat " * 76, BudgetClient(tokenizer, library))
    text = toolbar_text(state)
    assert "tokens 76/150" in text and "2 chunks" in text


def test_an_unknown_trigger_shows_why_instead_of_a_count(tokenizer, library):
    state = type_and_count("a <bad-hand> cat", BudgetClient(tokenizer, library))
    text = toolbar_text(state)
    assert text.startswith("tokens: ") and "bad-hand" in text and "tokens 0/" not in text


def test_fast_typing_coalesces_requests_and_ends_on_the_last_text(tokenizer, library):
    client = BudgetClient(tokenizer, library, delay=0.05)
    line = "a photo of a tree by monet"
    state = type_and_count(line, client)
    assert state.budget.prompt == line and state.budget.result["count"] == 7
    assert len(client.requests) < len(line)


def test_the_vector_count_of_a_known_embedding_is_shown(tokenizer, library):
    state = ReplState(embeddings=[e.describe() for e in library.embeddings()])
    type_and_count("<bad-hands-5>", BudgetClient(tokenizer, library), state)
    assert "<bad-hands-5> 2v" in toolbar_text(state)


# -- model, training, robustness ------------------------------------------------------------------------


def test_model_and_device():
    state = ReplState(model={"model": "tiny", "device": "cpu", "dtype": "fp32"}, model_state="ready")
    assert toolbar_text(state) == "tiny cpu fp32"
    state.model_state = "loading"
    assert toolbar_text(state) == "loading tiny"


def test_a_running_training_job():
    state = ReplState()
    state.apply_event({"type": "event", "event": "train", "job": {
        "name": "cat-toy", "state": "running", "step": 120, "total": 3000, "loss": 0.1234, "it_s": 4.5,
        "eta_s": 640}})
    assert toolbar_text(state) == "train cat-toy 120/3000 loss 0.123 4.5 it/s ETA 10m40s"


def test_a_finished_job_leaves_the_toolbar_and_says_so():
    state = ReplState()
    job = {"name": "cat-toy", "state": "running", "step": 10, "total": 10}
    state.apply_event({"event": "train", "job": job})
    lines = state.apply_event({"event": "train", "job": {**job, "state": "done", "path": "/e/cat-toy.safetensors"}})
    assert lines == ["training cat-toy done at step 10/10 -> /e/cat-toy.safetensors"]
    assert "train" not in toolbar_text(state)


@pytest.mark.parametrize(("seconds", "text"), [(640, "10m40s"), (5, "5s"), (3725, "1h02m"), (None, "?")])
def test_the_toolbar_eta_is_the_one_eta_format(seconds, text):
    """One ETA format everywhere: the toolbar writes what ``!train status`` (render.job) writes."""
    job = {"name": "cat", "state": "running", "step": 1, "total": 10, "eta_s": seconds}
    assert toolbar_text(ReplState(training=job)).endswith(f"ETA {text}")
    if seconds is not None:
        assert f"eta {text}" in render.job(job)


def test_a_broken_state_draws_a_note_not_a_crash():
    state = ReplState(budget=Budget("a", "", result={"count": 3, "limit": 75, "chunks": "two"}))
    assert "toolbar error" in toolbar_text(state)


def test_a_failing_client_shows_the_error_and_keeps_tracking(tokenizer, library):
    class Flaky(BudgetClient):
        async def request(self, type, **params):
            if "boom" in params["prompt"]:
                raise ConnectionResetError("daemon gone")
            return await super().request(type, **params)

    state = type_and_count("boom", Flaky(tokenizer, library))
    assert "ConnectionResetError" in toolbar_text(state)
    state = type_and_count("a cat", Flaky(tokenizer, library), state)
    assert "tokens 2/75" in toolbar_text(state)


# -- scheduled prompts ----------------------------------------------------------------------------------


class ScheduledClient(BudgetClient):
    """The daemon's ``tokens`` with steps and prompt settings (core.plan_budget)."""

    async def request(self, type: str, **params):
        from sdrepl.core.plan_budget import scheduled_prompt_budget
        from sdrepl.core.prompt import PromptOptions

        self.requests.append(dict(params))
        options = PromptOptions(emphasis=params.get("emphasis", "Original"),
                                comma_window=params.get("comma_padding_backtrack", 20))
        return scheduled_prompt_budget(params["prompt"], params["negative"], self.tokenizer, self.library, options,
                                       steps=params.get("steps", 20))


def test_an_edited_prompt_shows_its_largest_count_and_that_it_changes(tokenizer, library):
    client = ScheduledClient(tokenizer, library)
    state = type_and_count("a [fantasy:cyberpunk:16] landscape --steps 20", client)
    assert "tokens 3/75" in toolbar_text(state) and "2 prompts over 20 steps" in toolbar_text(state)
    assert client.requests[-1]["steps"] == 20


def test_and_parts_show_their_own_counts_and_weights(tokenizer, library):
    state = type_and_count("a cat AND a red dog:0.5", ScheduledClient(tokenizer, library))
    assert "AND 2/75 3/75×0.5" in toolbar_text(state)
    state = type_and_count("masterpiece, score:9", ScheduledClient(tokenizer, library))
    assert "weight 9" in toolbar_text(state)


def test_the_line_steps_and_session_settings_go_with_the_request(tokenizer, library):
    client = ScheduledClient(tokenizer, library)
    state = ReplState()

    async def main() -> None:
        tracker = BudgetTracker(client, state, get_settings=lambda: {"steps": 30, "emphasis": "No norm",
                                                                     "comma_padding_backtrack": None})
        tracker.start()
        tracker.on_text_changed("a [b:c:5] -s 12")
        while state.budget is None:
            await asyncio.sleep(0.01)
        tracker.on_text_changed("a [b:c:5]")
        while len(client.requests) < 2 or state.budget.result["steps"] != 30:
            await asyncio.sleep(0.01)
        await tracker.close()

    asyncio.run(asyncio.wait_for(main(), 10))
    assert client.requests[0] == {"prompt": "a [b:c:5]", "negative": "", "steps": 12, "emphasis": "No norm"}
    assert client.requests[-1]["steps"] == 30
