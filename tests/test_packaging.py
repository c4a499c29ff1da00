"""The card's layout (top-level core/, daemon/, repl/) must ship as the one import package ``sdrepl``."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

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


def test_the_typecheck_tree_mirrors_the_package_dir_mapping() -> None:
    """typecheck/sdrepl (what mypy and pyright resolve) points where pyproject maps each package."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    tree = REPO / "typecheck" / "sdrepl"
    for package, folder in config["package-dir"].items():
        if package == "sdrepl":  # a folder of per-file links, checked below
            continue
        linked = tree.joinpath(*package.split(".")[1:])
        assert linked.resolve() == (REPO / folder).resolve(), f"{linked} does not lead to {folder}"
    for source in (REPO / "sdrepl").glob("*.py"):
        assert (tree / source.name).resolve() == source.resolve(), f"typecheck/sdrepl/{source.name} is missing"


def test_mypy_follows_the_package_dir_mapping(tmp_path: Path) -> None:
    api = pytest.importorskip("mypy.api")
    probe = tmp_path / "probe.py"
    probe.write_text("from sdrepl.core.display import visible\nfrom sdrepl.daemon.protocol import encode\n"
                     "n: int = visible('x')\n")
    out, _err, status = api.run(["--config-file", str(REPO / "pyproject.toml"), "--follow-imports=silent",
                                 "--no-incremental", str(probe)])
    assert "Cannot find implementation" not in out, out
    assert status == 1 and 'Incompatible types in assignment (expression has type "str"' in out, out
