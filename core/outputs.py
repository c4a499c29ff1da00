"""Where pictures go: ``<root>/<YYYY-MM-DD>/<00001>-<seed>.png``, numbered on from the files already there.

Core logic with no daemon in it, so generation, the benchmark and any other front end share one naming
rule and one never-overwrite guarantee.
"""

from __future__ import annotations

import datetime
import re
import threading
from collections.abc import Callable
from pathlib import Path

from sdrepl.core.atomic import atomic_writer, write_error_text
from sdrepl.core.errors import WriteError

_COUNTER = re.compile(r"^(\d+)-")


class OutputFolder:
    """``<root>/<YYYY-MM-DD>/<00001>-<seed>.png``: numbering continues from the files already there."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._next: dict[Path, int] = {}
        self._lock = threading.Lock()

    def _scan(self, folder: Path) -> int:
        highest = 0
        if folder.is_dir():
            for entry in folder.iterdir():
                match = _COUNTER.match(entry.name)
                if match:
                    highest = max(highest, int(match.group(1)))
        return highest + 1

    def save(self, write: Callable[[Path], None], seed: int | str) -> Path:
        """Write a new picture through ``write(temp_path)``; never overwrites (a taken name is skipped).
        ``seed`` ends the name: a picture's seed, or ``grid`` for a ``!grid`` picture (``00007-grid.png``)."""
        folder = self.root / datetime.date.today().isoformat()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WriteError(f"cannot make the outputs folder {folder}: {write_error_text(exc, folder / 'x')}") from exc
        for _ in range(1000):
            with self._lock:
                number = self._next.get(folder) or self._scan(folder)
                self._next[folder] = number + 1
            path = folder / f"{number:05d}-{seed}.png"
            try:
                with atomic_writer(path, overwrite=False) as tmp:
                    write(tmp)
                return path
            except FileExistsError:  # another writer (a second daemon) took it: rescan
                with self._lock:
                    self._next[folder] = self._scan(folder)
            except OSError as exc:  # disk full, read-only, permission: the user's to fix, not a bug
                raise WriteError(f"cannot save {path.name}: {write_error_text(exc, path)}") from exc
        raise WriteError(f"cannot find a free picture name in {folder} (1,000 names taken meanwhile)")


_OUTPUTS: dict[Path, OutputFolder] = {}


def output_folder(root: Path) -> OutputFolder:
    root = Path(root)
    if root not in _OUTPUTS:
        _OUTPUTS[root] = OutputFolder(root)
    return _OUTPUTS[root]
