"""Names, paths and metadata from hostile files, at every point where the REPL renders them.

The results are shaped as the daemon sends them (a non-UTF-8 byte arrives as ``\\udcXX``). Each
rendering must hold no control character, no bidi or zero-width character, and no line a value made.
"""

from __future__ import annotations

from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document

from sdrepl.repl import render
from sdrepl.repl.completion import make_completer
from sdrepl.repl.scripted import render_result
from sdrepl.repl.state import Budget, ReplState, describe_job_end, describe_library_change
from sdrepl.repl.toolbar import toolbar_text

TITLE = "x\x1b]2;PWNED\x07"
NEWLINE = "a\nembeddings new: <evil>"
BIDI = "gpj\u202eexe"
NOT_UTF8 = "bad\udcffname"
HOSTILE = [TITLE, NEWLINE, BIDI, NOT_UTF8]


def entry(name: str) -> dict:
    return {"name": name, "qualified": name, "vectors": 2, "width": 768, "format": "pt/a1111",
            "path": f"/emb/{name}.pt", "hash": "0123456789ab", "step": 5, "checkpoint": f"ck\x1b[31m{name}",
            "init_text": f"init\n{name}"}


def assert_safe(text: str, lines: int | None = None) -> None:
    assert text.isprintable() or all(part.isprintable() for part in text.split("\n")), ascii(text)
    text.encode("utf-8")  # no surrogate left: printable on any UTF-8 terminal
    if lines is not None:
        assert len(text.split("\n")) == lines, text
    assert not any(line.startswith("embeddings new: <evil>") for line in text.split("\n")), text


def test_embeddings_table_and_skipped_files() -> None:
    result = {"embeddings": [entry(n) for n in HOSTILE],
              "skipped": [{"path": f"/emb/{TITLE}.pt", "reason": f"not a file: {NEWLINE}"}],
              "warnings": [f"two files are called {NEWLINE}"], "version": 1}
    text = render.embeddings(result)
    assert_safe(text, lines=1 + 4 + 1 + 1 + 1)
    assert "x\\x1b]2;PWNED\\x07" in text and "bad\\xffname" in text and "gpj\\u202eexe" in text


def test_show_lists_metadata_escaped() -> None:
    text = render.show({**entry(TITLE), "norms": [0.5, 0.25], "warnings": [NEWLINE]})
    assert_safe(text, lines=len(entry(TITLE)) + 2)
    assert "ck\\x1b[31mx\\x1b]2;PWNED\\x07" in text and "init\\nx\\x1b" in text


def test_library_change_notifications_cannot_fake_a_line() -> None:
    change = {"added": HOSTILE, "updated": [], "removed": [NEWLINE], "skipped": [{"path": f"/e/{NEWLINE}.pt",
              "reason": TITLE}], "unskipped": [f"/e/{NOT_UTF8}.pt"], "warnings": [TITLE]}
    lines = describe_library_change(change)
    assert len(lines) == 5 and all("\n" not in line for line in lines)
    for line in lines:
        assert_safe(line)
    assert_safe(render.change({"change": change}), lines=5)


def test_job_lines_toolbar_and_scripted_errors() -> None:
    job = {"name": TITLE, "state": "failed", "error": NEWLINE, "step": 1, "total": 2, "path": f"/e/{BIDI}"}
    assert_safe(describe_job_end(job), lines=1)
    assert_safe(render.job(job), lines=1)
    state = ReplState(embeddings=[entry(n) for n in HOSTILE])
    state.training = {**job, "state": "running", "eta_s": 5}
    state.model = {"model": TITLE, "device": "cpu"}
    state.model_state = "ready"
    state.budget = Budget("p", "", result={"count": 3, "limit": 75, "embeddings": HOSTILE, "bare": [BIDI],
                                           "negative": {"count": 0, "limit": 75}})
    assert_safe(toolbar_text(state), lines=1)

    class Logical:
        number, source = 3, "!show x"

    class Failed:
        ok, text = False, ""
        error = {"type": "PromptError", "message": f"no loaded embedding is called {NEWLINE}"}

    [line] = render_result(Logical(), Failed(), json_mode=False)  # type: ignore[arg-type]
    assert_safe(line, lines=1)


def test_completion_menu_shows_names_and_meta_escaped() -> None:
    embeddings = [entry(n) for n in HOSTILE]
    completer = make_completer(lambda: embeddings)
    for typed, offered in (("<", 3), ("!show ", 4)):  # a prompt cannot carry a non-UTF-8 name; !show can
        completions = list(completer.get_completions(Document(typed), CompleteEvent()))
        assert len(completions) == offered
        for c in completions:
            assert_safe(c.display_text, lines=1)
            assert_safe(c.display_meta_text, lines=1)
