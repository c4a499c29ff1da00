"""Loss plots: the sparkline, ``loss.png`` and the log's bounded loss history (resumed runs included)."""

from __future__ import annotations

import io

from PIL import Image

from sdrepl.core.training.loss_plot import BARS, PLOT_SIZE, buckets, loss_png, sparkline
from sdrepl.core.training.outputs import HISTORY_LIMIT, TrainingLog
from sdrepl.repl.render import loss_trend


def test_buckets_average_consecutive_steps_and_skip_non_finite():
    assert buckets([1.0, 3.0, 5.0, 7.0], 2) == [2.0, 6.0]
    assert buckets([1.0, float("nan"), 2.0], 8) == [1.0, 2.0]
    assert buckets([], 4) == [] and buckets([1.0], 0) == []


def test_sparkline_maps_low_to_the_lowest_bar_and_high_to_the_highest():
    assert sparkline([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]) == BARS
    assert sparkline([7.0, 0.0]) == BARS[-1] + BARS[0]
    assert sparkline([0.5, 0.5, 0.5]) == BARS[3] * 3  # flat: the middle, not noise
    assert len(sparkline([float(i % 7) for i in range(1000)], width=20)) == 20
    assert sparkline([]) == ""


def test_loss_png_is_a_picture_with_the_curve_drawn():
    steps = list(range(1, 201))
    data = loss_png(steps, [1.0 / s for s in steps], [0.005] * 200)
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.size == PLOT_SIZE
    colours = {c for _, c in image.convert("RGB").getcolors(maxcolors=1 << 16)}
    assert (30, 80, 200) in colours and (230, 130, 20) in colours  # the loss mean and the learning rate
    empty = Image.open(io.BytesIO(loss_png([], [])))
    assert empty.size == PLOT_SIZE


def test_the_log_keeps_a_bounded_history_and_writes_loss_png(tmp_path):
    log = TrainingLog(tmp_path / "run", "cat")
    log.open(None)
    for step in range(1, 11):
        log.log_loss(step, 0, 1.0 / step, 0.005)
    assert log.recent_losses(3) == [1 / 8, 1 / 9, 1 / 10]
    path = log.write_plot()
    assert path == tmp_path / "run" / "loss.png" and Image.open(path).size == PLOT_SIZE
    log.close()

    resumed = TrainingLog(tmp_path / "run", "cat")
    resumed.open(5)  # rows up to the checkpoint's step come back into the history
    assert [s for s, _, _ in resumed.history] == [1, 2, 3, 4, 5]
    for step in range(6, HISTORY_LIMIT + 10):
        resumed.log_loss(step, 0, 0.5, 0.005)
    assert len(resumed.history) <= HISTORY_LIMIT
    resumed.close()


def test_train_status_shows_the_sparkline_and_the_plot():
    job = {"name": "cat", "recent_loss": [0.3, 0.2, 0.1], "log_dir": "/runs/cat"}
    assert loss_trend(job) == f"\nloss {BARS[-1]}{BARS[4]}{BARS[0]} (last 3 steps, 0.1..0.3); plot: /runs/cat/loss.png"
    assert loss_trend({"recent_loss": []}) == "" and loss_trend(None) == ""
