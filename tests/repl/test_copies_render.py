"""How the REPL shows an embedding held by several identical files (a ``!convert`` copy) and the events of a
copy coming and going."""

from __future__ import annotations

from sdrepl.repl import render
from sdrepl.repl.state import describe_library_change

ENTRY = {"name": "bad-hands-5", "qualified": "bad-hands-5", "vectors": 5, "width": 768, "format": "a1111-pt",
         "path": "/e/bad-hands-5.pt", "hash": "aa" * 6, "step": None, "source": None,
         "files": ["/e/bad-hands-5.pt", "/e/bad-hands-5.safetensors"]}


def test_embeddings_show_one_row_and_names_the_copies():
    text = render.embeddings({"embeddings": [ENTRY], "skipped": [], "warnings": []})
    rows = [line for line in text.splitlines() if "bad-hands-5.pt" in line]
    assert len(rows) == 1 and "(+1 copy)" in rows[0]
    assert "<bad-hands-5> is also in: bad-hands-5.safetensors" in text
    single = dict(ENTRY, files=["/e/bad-hands-5.pt"])
    assert "copy" not in render.embeddings({"embeddings": [single]})


def test_a_copy_going_away_names_the_file_and_says_the_embedding_stays():
    change = {"added": [], "updated": [], "removed": [], "files_removed": [
        {"path": "/e/bad-hands-5.safetensors", "name": "bad-hands-5", "entry": "/e/bad-hands-5.pt"}]}
    assert describe_library_change(change) == [
        "bad-hands-5.safetensors is gone; still loaded: <bad-hands-5> (from bad-hands-5.pt)"]
    added = {"files_added": [{"path": "/e/x.pt", "name": "x", "entry": "/e/x.safetensors"}]}
    assert describe_library_change(added) == ["x.pt is a copy of <x> (from x.safetensors)"]
    assert render.change({"change": added}) == "x.pt is a copy of <x> (from x.safetensors)"
