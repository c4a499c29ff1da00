"""The one rule for embedding names: what a name typed by the user, or found inside a file, may contain.

An embedding's name becomes a file name (``<name>.safetensors``, a diffusers ``<name>/`` folder) and the
``<name>`` of prompts, and is shown on terminals. So a name is refused when it

- is empty, starts with ``.`` (hidden files, ``.`` and ``..``) or is longer than :data:`MAX_NAME_BYTES`;
- contains a path separator (``/``, ``\\``) or a character some file systems or the ``<...>`` syntax
  reserve (``< > : " | ? *``), or whitespace (the REPL splits arguments on it);
- contains a character :func:`sdrepl.core.display.needs_escape` would escape: C0/C1 controls (ESC, BEL,
  NUL...), bidi overrides, zero-width and other invisible format characters, line separators.

``!create`` and ``!train`` refuse such names (:func:`check_name` in ``core/training/options.py``); names
stored *inside* files (PNG cards, generic ``learned_embeds`` files) that break the rule are not used as
the trigger: the file falls back to its file name (see ``core/formats/layouts.py``). This module imports
no torch: the REPL checks names with it.
"""

from __future__ import annotations

import re

from sdrepl.core.display import needs_escape, visible

#: Longest name in UTF-8 bytes: leaves room for a suffix within the usual 255-byte file-name limit.
MAX_NAME_BYTES = 200
_RESERVED = re.compile(r"[/\\<>:\"|?*]")


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be an embedding name (a phrase: "it contains '/'"), or None when it can."""
    if not name:
        return "it is empty"
    hidden = next((ch for ch in name if needs_escape(ch)), None)
    if hidden is not None:
        return f"it contains the control or invisible character {visible(hidden)}"
    if name.startswith("."):
        return "it starts with '.' (a hidden file, or a way to reach another folder)"
    reserved = _RESERVED.search(name)
    if reserved is not None:
        return f"it contains {reserved.group()!r} (path separators and < > : \" | ? * are not allowed)"
    if any(ch.isspace() for ch in name):
        return "it contains a space (the name is one word in prompts and commands)"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"it is longer than {MAX_NAME_BYTES} bytes"
    return None


def is_valid_name(name: str) -> bool:
    return name_problem(name) is None
