"""Completion in the REPL: ``<trigger>`` names, meta-commands, options, values and paths.

Real keystrokes go through a PromptSession on a pipe input (``create_pipe_input`` + ``DummyOutput``), and
the assertions are on what the buffer holds, never on escape codes. The embeddings come from a state
that a fake daemon client feeds, so a library change reaching completion without a restart is tested
the way it happens in the REPL: an ``embeddings`` event.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from sdrepl.repl.completion import EmbeddingCompleter, embedding_meta, make_completer, rank
from sdrepl.repl.state import ReplState, StateFeed

LIBRARY = [
    {"name": "bad-artist", "vectors": 6, "path": "/e/a1111/bad-artist.pt"},
    {"name": "bad-hands-5", "vectors": 2, "path": "/e/a1111/bad-hands-5.pt"},
    {"name": "bad-prompt", "vectors": 16, "path": "/e/a1111/bad-prompt.pt"},
    {"name": "birb-style", "vectors": 1, "path": "/e/birb-style/learned_embeds.bin"},
    {"name": "EasyNegative", "vectors": 8, "path": "/e/a1111/EasyNegative.safetensors"},
    {"name": "cat-toy", "vectors": 3, "path": "/e/cat-toy/learned_embeds.bin"},
]


def completions(text: str, embeddings=LIBRARY, **kwargs) -> list:
    completer = make_completer(lambda: embeddings, **kwargs)
    return list(completer.get_completions(Document(text), CompleteEvent(completion_requested=True)))


def texts(text: str, **kwargs) -> list[str]:
    return [c.text for c in completions(text, **kwargs)]


async def settle(condition, timeout: float = 3.0) -> None:
    """Let the prompt's event loop work until ``condition()`` holds (completion runs asynchronously)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("the prompt did not get there in time")
        await asyncio.sleep(0.01)


def type_into_prompt(typed: str, state: ReplState, *, before=None) -> str:
    """Type ``typed`` into a real PromptSession reading ``state``, press Tab, then Enter; return the line.

    Each key waits for the prompt to catch up, as a person's would: the menu must be there before Tab,
    the completion inserted before Enter.
    """

    async def main() -> str:
        with create_pipe_input() as pipe:
            session = PromptSession(input=pipe, output=DummyOutput(), complete_while_typing=True,
                                    completer=make_completer(lambda: state.embeddings))
            if before is not None:
                await before()
            buffer = session.default_buffer
            result = asyncio.ensure_future(session.prompt_async())
            pipe.send_text(typed)
            await settle(lambda: buffer.text == typed and buffer.complete_state is not None)
            pipe.send_text("\t")
            await settle(lambda: buffer.text != typed)
            pipe.send_text("\r")
            return await asyncio.wait_for(result, 5)

    return asyncio.run(main())


# -- triggers ------------------------------------------------------------------------------------------


def test_tab_completes_a_trigger_in_the_prompt():
    state = ReplState(embeddings=list(LIBRARY))
    assert type_into_prompt("a photo of <bir", state) == "a photo of <birb-style>"


def test_trigger_menu_shows_vectors_and_file():
    [completion] = completions("a photo of <birb")
    assert completion.text == "<birb-style>"
    assert completion.start_position == -len("<birb")
    assert completion.display_meta_text == "1 vector · birb-style/learned_embeds.bin"
    assert embedding_meta(LIBRARY[-1]) == "3 vectors · cat-toy/learned_embeds.bin"


@pytest.mark.parametrize(("typed", "first"), [
    ("<bad-ha", "<bad-hands-5>"),   # prefix
    ("<hands", "<bad-hands-5>"),    # word start inside the name
    ("<bh5", "<bad-hands-5>"),      # letters in order
    ("<easyneg", "<EasyNegative>"),  # case does not matter
    ("<", "<bad-artist>"),          # everything, alphabetically
])
def test_trigger_ranking(typed, first):
    assert texts(typed)[0] == first


def test_prefix_matches_rank_before_substring_and_fuzzy():
    assert rank("art", ["bad-artist", "art-deco", "xaxrxt"]) == ["art-deco", "bad-artist", "xaxrxt"]


def test_trigger_completes_inside_the_negative_option():
    assert texts("a cat --neg <bad-pr") == ["<bad-prompt>"]


def test_a_typed_closing_bracket_is_not_doubled():
    completer = EmbeddingCompleter(lambda: LIBRARY)
    [completion] = completer.get_completions(Document("<birb>", cursor_position=5), CompleteEvent())
    assert completion.text == "<birb-style"


# -- meta-commands, options, values ---------------------------------------------------------------------


@pytest.mark.parametrize(("typed", "expected"), [
    ("!tra", "train"),
    ("!emb", "embeddings"),
    ("!help con", "convert"),
    ("!train x --da", "data"),
    ("!train x --data d --ste", "steps"),
    ("!create foo --vec", "vectors"),
    ("!convert bad-hands-5 --to safe", "safetensors"),
    ("!train x --latents det", "deterministic"),
    ("a cat --ste", "steps"),
    ("a cat --sampler dpm++ 2m k", "DPM++ 2M Karras"),
    ("a cat --steps 20 --sampler eul", "Euler"),
    ("!set sam", "sampler"),
    ("!set sampler unip", "UniPC"),
    ("!show bad-h", "bad-hands-5"),
    ("!convert easy", "EasyNegative"),
    ("!inspect easy", "EasyNegative"),
    ("!inspect bad-hands-5 --t", "top"),
    ("!ins", "inspect"),
    ("!mi", "mix"),
    ("!train st", "status"),
    ("!tokens a cat --n", "neg"),
])
def test_commands_options_and_values(typed, expected):
    assert expected in texts(typed)


def test_a_sampler_name_with_spaces_is_replaced_whole():
    [completion] = [c for c in completions("!set sampler dpm++ 2m k") if c.text == "DPM++ 2M Karras"]
    assert completion.start_position == -len("dpm++ 2m k")


def test_command_menu_has_the_summary():
    [train] = [c for c in completions("!trai") if c.text == "train"]
    assert train.display_text == "!train" and train.display_meta_text


def test_flags_take_no_value_completion():
    assert texts("!create foo --overwrite ") == []


def test_plain_prompt_text_offers_nothing():
    assert texts("a photo of a cat") == []


# -- paths ----------------------------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "pics").mkdir()
    (tmp_path / "pictures-2").mkdir()
    (tmp_path / "prompts.txt").write_text("a cat\n")
    return tmp_path


@pytest.mark.parametrize(("typed", "expected", "absent"), [
    ("!replay pro", "mpts.txt", None),
    ("!train x --data pi", "cs", "mpts.txt"),
    ("!preprocess pics pic", "tures-2", "mpts.txt"),
    ("a red fox --init pro", "mpts.txt", None),  # img2img's picture is a path
])
def test_paths_after_path_arguments(folder, typed, expected, absent):
    found = texts(typed, get_cwd=lambda: str(folder))
    assert any(t.startswith(expected) for t in found)
    assert absent is None or not any(t.startswith(absent) for t in found)


def test_img2img_options_complete(folder):
    assert sorted(texts("a cat --hires-upscaler ")) == ["lanczos", "latent"]
    assert "hires-denoise" in " ".join(texts("a cat --hires-d"))
    assert texts("!create x --init pro", get_cwd=lambda: str(folder)) == []  # !create's --init is text


def test_path_completion_runs_through_the_async_path(folder):
    completer = make_completer(lambda: [], get_cwd=lambda: str(folder))

    async def collect():
        return [c.text async for c in completer.get_completions_async(Document("!replay pro"), CompleteEvent())]

    assert asyncio.run(collect()) == ["mpts.txt"]


# -- live library ---------------------------------------------------------------------------------------


class EventingClient:
    """A daemon client whose library can change: ``change(...)`` edits it and sends the event."""

    def __init__(self, embeddings: list[dict]) -> None:
        self.library = list(embeddings)
        self.version = 1
        self.listeners = []
        self.hello = {"state": "ready", "model": {"model": "tiny", "device": "cpu", "dtype": "fp32"}}

    def add_event_listener(self, callback) -> None:
        self.listeners.append(callback)

    async def request(self, type: str, **params):
        await asyncio.sleep(0)
        if type == "embeddings":
            return {"embeddings": list(self.library), "skipped": [], "version": self.version}
        if type == "status":
            return {"state": "ready", "model": self.hello["model"], "queue": {"pending": 0, "running": None}}
        raise AssertionError(f"unexpected request {type}")

    def change(self, added=(), removed=()) -> None:
        self.library = [e for e in self.library if e["name"] not in removed] + list(added)
        self.version += 1
        event = {"type": "event", "event": "embeddings", "version": self.version,
                 "change": {"added": [e["name"] for e in added], "removed": list(removed), "updated": [],
                            "skipped": [], "unskipped": [], "warnings": []}}
        for listener in self.listeners:
            listener(event)


EYELINER = {"name": "eyeliner2", "vectors": 4, "path": "/e/a1111/eyeliner2.pt"}


def test_an_embeddings_event_reaches_completion_without_a_restart():
    client = EventingClient(LIBRARY)
    state = ReplState()

    async def start_and_add():
        feed = StateFeed(client, state)
        await feed.start()
        assert "eyeliner2" not in state.embedding_names()
        client.change(added=[EYELINER])
        assert "eyeliner2" in state.embedding_names()  # at once, before the refresh
        await asyncio.sleep(0.05)  # the refresh brings the details
        assert state.find_embedding("eyeliner2")["vectors"] == 4

    assert type_into_prompt("<eyel", state, before=start_and_add) == "<eyeliner2>"
    assert completions("<eyel", embeddings=state.embeddings)[0].display_meta_text == "4 vectors · a1111/eyeliner2.pt"


def test_a_removed_embedding_is_no_longer_offered():
    client = EventingClient([*LIBRARY, EYELINER])
    state = ReplState()

    async def run():
        await StateFeed(client, state).start()
        assert texts("<eyel", embeddings=state.embeddings) == ["<eyeliner2>"]
        client.change(removed=["eyeliner2"])
        assert texts("<eyel", embeddings=state.embeddings) == []

    asyncio.run(run())


def test_a_failing_source_offers_nothing_instead_of_raising():
    def broken():
        raise RuntimeError("state is broken")

    completer = make_completer(broken)
    assert list(completer.get_completions(Document("<bir"), CompleteEvent())) == []
