"""The card's layout (top-level core/, daemon/, repl/) must ship as the one import package ``sdrepl``."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_code_folder_is_a_listed_subpackage_of_sdrepl() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, dirs = set(config["packages"]), config["package-dir"]
    found = {"sdrepl"}
    for top in ("core", "daemon", "repl"):
        for init in (REPO / top).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO).as_posix()
            found.add("sdrepl." + rel.replace("/", "."))
            assert dirs.get("sdrepl." + rel.replace("/", ".")) == rel, f"{rel} has no package-dir entry"
    assert found == listed, f"pyproject lists {sorted(listed)}, the tree has {sorted(found)}"
    assert not any(name.split(".")[0] != "sdrepl" for name in listed), "only the sdrepl package is installed"


def test_the_tokenizer_ships_as_package_data() -> None:
    from sdrepl.core.tiny import tokenizer_dir

    assert (tokenizer_dir() / "vocab.json").is_file() and (tokenizer_dir() / "merges.txt").is_file()
