"""Qualified ``<folder/name>`` names everywhere (issue 11, item 5): completion, the menu, !embeddings,
!show and !convert."""

from __future__ import annotations

import asyncio

from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document

from sdrepl.repl import render
from sdrepl.repl.completion import make_completer
from sdrepl.repl.session import Session

LIBRARY = [
    {"name": "bad-hands-5", "qualified": "bad-hands-5", "vectors": 2, "path": "/e/bad-hands-5.pt"},
    {"name": "bad-hands-5", "qualified": "negatives/bad-hands-5", "vectors": 2, "path": "/e/negatives/bad-hands-5.pt"},
    {"name": "EasyNegative", "qualified": "negatives/EasyNegative", "vectors": 8,
     "path": "/e/negatives/EasyNegative.safetensors"},
    {"name": "birb-style", "qualified": "birb-style", "vectors": 1, "path": "/e/birb-style/learned_embeds.bin"},
]


def completions(text: str) -> list[str]:
    completer = make_completer(lambda: LIBRARY)
    return [c.text for c in completer.get_completions(Document(text), CompleteEvent(completion_requested=True))]


def test_typing_a_folder_offers_that_folders_names():
    offered = completions("a photo <negatives/")
    assert offered[:2] == ["<negatives/bad-hands-5>", "<negatives/EasyNegative>"]
    assert "<birb-style>" not in offered


def test_the_menu_never_lists_a_shared_name_twice_alike():
    offered = completions("<bad-h")
    assert offered == ["<bad-hands-5>", "<negatives/bad-hands-5>"]
    assert len(set(completions("<"))) == len(completions("<"))


def test_embeddings_rows_show_the_qualified_name_of_a_collision():
    table = render.embeddings({"embeddings": LIBRARY}).splitlines()
    triggers = [row.split()[0] for row in table[1:]]
    assert sorted(triggers) == sorted(["bad-hands-5", "negatives/bad-hands-5", "EasyNegative", "birb-style"])


def test_show_and_convert_take_a_qualified_name(fake):
    session = Session(fake)
    assert asyncio.run(session.execute("!show <negatives/bad-hands-5>")).ok
    assert fake.calls[-1] == ("show", {"name": "negatives/bad-hands-5"})
    assert asyncio.run(session.execute("!convert negatives/bad-hands-5 --to safetensors")).ok
    assert fake.calls[-1][1]["name"] == "negatives/bad-hands-5"
