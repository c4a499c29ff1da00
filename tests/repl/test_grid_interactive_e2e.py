"""``!grid`` in the interactive REPL (a real pseudo-terminal): the summary line with the grid's path, Tab
completion of axes, the progress line over the whole grid and Ctrl-C cancelling it."""

from __future__ import annotations

import time

import pytest
from repl_testing import PROMPT, repl_daemon

pexpect = pytest.importorskip("pexpect")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def daemon():
    with repl_daemon("sdrepl-gr-") as served:
        yield served


def test_a_grid_prints_its_summary_and_path(repl):
    repl.send("!grid a cat --x cf")
    time.sleep(0.5)
    repl.send("\t")  # the axis name completes to cfg=
    time.sleep(0.3)
    repl.send("3,5 --y seed=1,2 --steps 2 --size 32x32\r")
    repl.expect(r"grid 2x2 \(4 cells, 2 batches\): outputs/\d{4}-\d\d-\d\d/\d{5}-grid\.png")
    repl.expect_exact(PROMPT)


def test_ctrl_c_cancels_a_running_grid(repl):
    repl.send("!grid a slow cat --x seed=1-3 --y cfg=2,4 --steps 400 --size 64x64\r")
    repl.expect(r"generating .* \d+/2400")  # one progress line counting over all six cells
    repl.sendcontrol("c")
    repl.expect_exact("cancelled")
    repl.expect_exact(PROMPT)
    repl.send("!grid a cat --x steps=1 --size 32x32\r")
    repl.expect(r"grid 1x1 \(1 cell, 1 batch\)")
