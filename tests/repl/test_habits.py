"""Habits from Ollama, InvokeAI and shells (issue 11, item 3), at the session level and in the history.

``/bye``, ``exit``, ``?`` ... alone do what they mean; InvokeAI switches sdrepl lacks are errors naming
the switch; a mistyped long option gets "did you mean"; ``!NN`` recalls history entry NN; a ``\"\"\"``
block is one history entry.
"""

from __future__ import annotations

import asyncio

import pytest
from prompt_toolkit.history import FileHistory, InMemoryHistory

from sdrepl.repl.history import BlockHistory
from sdrepl.repl.session import Session


def execute(session: Session, line: str):
    return asyncio.run(session.execute(line))


@pytest.mark.parametrize("line", ["/bye", "exit", "quit", "EXIT", "/exit", " quit "])
def test_leaving_words_leave(fake, line):
    result = execute(Session(fake), line)
    assert result.ok and result.quit and result.kind == "quit"
    assert "generate" not in fake.types()


@pytest.mark.parametrize("line", ["/help", "/?", "?", "help", "HELP"])
def test_help_words_show_help(fake, line):
    result = execute(Session(fake), line)
    assert result.ok and result.kind == "help" and "!help CMD" in result.text
    assert "generate" not in fake.types()


def test_a_prompt_that_merely_contains_the_word_is_a_prompt(fake):
    assert execute(Session(fake), "exit sign at night --steps 2").kind == "generate"


@pytest.mark.parametrize(("line", "switch"), [
    ("a cat -M mask.png -F", "-M"), ("a cat -F", "-F"), ("a cat -U 2 0.6", "-U"), ("a cat -v 0.1", "-v"),
    ("a cat -x", "-x"), ("a cat -s 20 -g", "-g"),
])
def test_unsupported_invokeai_switches_are_errors_naming_them(fake, line, switch):
    result = execute(Session(fake), line)
    assert not result.ok and result.error["type"] == "UsageError"
    assert result.error["message"].startswith(f"{switch} (InvokeAI's ")
    assert "generate" not in fake.types()


def test_an_escaped_switch_is_prompt_text(fake):
    assert execute(Session(fake), r"a cat \-v style").ok
    assert fake.calls[-1][1]["prompt"] == "a cat -v style"


@pytest.mark.parametrize(("line", "suggestion"), [("a cat --stpes 3", "--steps"), ("a cat --sampeler Euler", "--sampler"),
                                                   ("a cat --negativ blurry", "--negative")])
def test_unknown_long_options_get_did_you_mean(fake, line, suggestion):
    result = execute(Session(fake), line)
    assert not result.ok and f"(did you mean {suggestion}?)" in result.error["message"]


def test_bang_number_recalls_a_history_entry(fake):
    session = Session(fake, history=lambda: ["a cat --steps 3", "!embeddings", "!1"])
    result = execute(session, "!1")
    assert result.ok and result.edit_buffer == "a cat --steps 3" and result.text == "a cat --steps 3"
    assert "generate" not in fake.types()
    missing = execute(session, "!9")
    assert not missing.ok and "no history entry 9 (there are 3)" in missing.error["message"]


def test_a_block_is_one_history_entry(tmp_path):
    history = BlockHistory(FileHistory(str(tmp_path / "history")))
    for line in ["a cat", '"""', "a long prompt", "# not a comment here", '""" --steps 3', "!embeddings"]:
        history.append_string(line)
    assert list(reversed(history.get_strings())) == [
        "!embeddings", '"""\na long prompt\n# not a comment here\n""" --steps 3', "a cat"]
    stored = list(FileHistory(str(tmp_path / "history")).load_history_strings())  # what the next session reads
    assert stored == ["!embeddings", '"""\na long prompt\n# not a comment here\n""" --steps 3', "a cat"]


def test_an_abandoned_block_is_not_stored():
    history = BlockHistory(InMemoryHistory())
    for line in ['"""', "half a prompt"]:
        history.append_string(line)
    history.abandon()
    history.append_string("a dog")
    assert history.get_strings() == ["a dog"]
