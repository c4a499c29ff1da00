"""The REPL's history: a ``\"\"\"`` block is stored as one entry, not as one entry per physical line.

prompt_toolkit appends every accepted line to the history. A multi-line prompt typed as a block would
then come back line by line with Up, and ``!history``/``!NN`` would number its pieces. :class:`BlockHistory`
wraps the real history (a file, or memory) and holds the lines of an open block back until the block
closes, then stores the whole block as one string; recalled, it runs as it was typed.
"""

from __future__ import annotations

from collections.abc import Iterable

from prompt_toolkit.history import History

from sdrepl.repl.lines import needs_more_input


class BlockHistory(History):
    """A history in which a whole ``\"\"\"`` block is one entry (see the module docstring)."""

    def __init__(self, inner: History) -> None:
        super().__init__()
        self.inner = inner
        self._open: list[str] = []

    def append_string(self, string: str) -> None:
        lines = [*self._open, string]
        if needs_more_input("\n".join(lines)):
            self._open = lines
            return
        self._open = []
        super().append_string("\n".join(lines))

    def abandon(self) -> None:
        """The user dropped the open block (Ctrl-C): its lines are not stored."""
        self._open = []

    def load_history_strings(self) -> Iterable[str]:
        return self.inner.load_history_strings()

    def store_string(self, string: str) -> None:
        self.inner.store_string(string)
