"""A picture drawn in a real terminal (tmux) leaves the prompt and the toolbar intact (issue 17 item 1)."""

from __future__ import annotations

import os
import re
import shutil
from types import SimpleNamespace

import pytest
from daemon_testing import make_daemon, short_dir
from repl_testing import Tmux, repl_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def daemon():
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    tmp = short_dir("sdrepl-pv-")
    proc = make_daemon(tmp)
    env = {k: v for k, v in repl_env(tmp).items() if k not in ("TMUX", "STY", "PROMPT_TOOLKIT_NO_CPR")}
    proc.env = {**env, "TERM": "xterm-256color", "COLORTERM": "truecolor"}  # tmux answers DA1: it is asked
    try:
        proc.start(cwd=tmp)
        yield SimpleNamespace(proc=proc, env=proc.env, args=proc.settings.daemon_args(), tmp=tmp)
    finally:
        proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def tmux(daemon):
    session = Tmux(daemon.tmp, f"pv{os.getpid()}", daemon.args, daemon.env, width=120, height=80)
    try:
        session.wait_for(lambda s: re.search(r"^sd>", s, re.M) is not None)
        yield session
    finally:
        session.close()


def prompt_row(screen: str) -> int:
    lines = screen.splitlines()
    return max(i for i, line in enumerate(lines) if line.startswith("sd>"))


def toolbar_shown(screen: str) -> bool:
    """The bottom toolbar (model and device) is the screen's last line."""
    return "tiny" in screen.rstrip().splitlines()[-1]


def test_a_half_block_preview_sits_above_an_intact_prompt_and_toolbar(tmux):
    tmux.keys("!set preview blocks", "Enter")
    tmux.wait_for(lambda s: "preview = blocks" in s)
    tmux.keys("a red fox --steps 2 --size 64x64 --seed 3", "Enter")
    screen = tmux.wait_for(lambda s: re.search(r"\.png\s+\(seed 3", s) is not None and "▀" in s
                           and s.splitlines()[prompt_row(s)].rstrip() == "sd>" and toolbar_shown(s))
    lines = screen.splitlines()
    row = prompt_row(screen)
    picture = [i for i, line in enumerate(lines) if "▀" in line]
    assert picture and max(picture) < row, screen  # the picture is above the prompt
    assert all(lines[i].strip() == "▀" * len(lines[i].strip()) for i in picture)  # nothing mixed into it
    assert len(picture) == 32 and {len(lines[i].rstrip()) for i in picture} == {64}  # 64x64 px, 2 px a cell
    result = next(i for i, line in enumerate(lines) if re.search(r"\.png\s+\(seed 3", line))
    assert result < min(picture)  # the result's line, then its picture
    assert "tiny" in screen.rstrip().splitlines()[-1]  # the toolbar, on the last line
    colours = tmux.tmux("capture-pane", "-p", "-e")  # with attributes: the cells are coloured
    assert re.search(r"\x1b\[38;2;\d+;\d+;\d+m", colours) or re.search(r"\x1b\[38;5;\d+m", colours)
    prompt_line = colours.splitlines()[row]
    assert "▀" not in prompt_line
    tmux.keys("hello there", literal=True)  # the prompt still edits where it should
    tmux.wait_for(lambda s: re.search(r"^sd> hello there\s*$", s, re.M) is not None and toolbar_shown(s))
    tmux.keys("C-u")
    tmux.keys("!view 1", "Enter")  # a large picture: still 64x64 pixels (never enlarged past 2 px a cell)
    tmux.wait_for(lambda s: s.count("▀" * 64) >= 64 and toolbar_shown(s)
                  and s.splitlines()[prompt_row(s)].rstrip() == "sd>")
    tmux.keys("!quit", "Enter")


def test_train_plot_draws_the_loss_plot_above_the_prompt(tmux, daemon):
    from sdrepl.core.training.loss_plot import loss_png

    folder = daemon.tmp / "textual_inversion" / "2026-12-01" / "plotted"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "loss.png").write_bytes(loss_png(list(range(1, 41)), [1 / s for s in range(1, 41)], [0.005] * 40))
    tmux.keys("!set preview blocks", "Enter")
    tmux.keys("!train plot plotted", "Enter")
    screen = tmux.wait_for(lambda s: "loss plot of plotted" in s and "▀" in s and toolbar_shown(s)
                           and s.splitlines()[prompt_row(s)].rstrip() == "sd>")
    lines = screen.splitlines()
    picture = [i for i, line in enumerate(lines) if "▀" in line]
    assert max(picture) < prompt_row(screen)
    (columns,) = {len(lines[i].rstrip()) for i in picture}
    assert columns == 119  # the pane's width less one
    assert abs(columns - 4 * len(picture)) <= 2  # 800x400 px, two pixels a cell row: aspect kept
    tmux.keys("!quit", "Enter")
