"""The A1111 learning-rate schedule syntax of ``--lr``: every form, and errors that name the bad piece."""

from __future__ import annotations

import pytest

from sdrepl.core.errors import TrainingError
from sdrepl.core.training.schedule import parse_schedule


def test_a_bare_rate_runs_to_the_end():
    schedule = parse_schedule("0.005")
    assert [schedule.rate_at(s) for s in (1, 100, 10_000)] == [0.005, 0.005, 0.005]
    assert schedule.last_step is None
    assert schedule.total_steps(3000) == 3000


def test_a_number_is_accepted_as_well_as_text():
    assert parse_schedule(0.01).rate_at(1) == 0.01


def test_each_rate_holds_until_its_step_then_the_next_takes_over():
    schedule = parse_schedule("0.005:100, 1e-3:1000, 1e-5")
    assert schedule.rate_at(1) == 0.005
    assert schedule.rate_at(100) == 0.005
    assert schedule.rate_at(101) == 1e-3
    assert schedule.rate_at(1000) == 1e-3
    assert schedule.rate_at(1001) == 1e-5
    assert schedule.rate_at(50_000) == 1e-5
    assert schedule.total_steps(3000) == 3000


def test_a_closed_schedule_ends_training_at_its_last_step_as_in_a1111():
    schedule = parse_schedule("0.01:10,0.001:20")
    assert schedule.last_step == 20
    assert schedule.total_steps(3000) == 20
    assert schedule.total_steps(15) == 15
    assert schedule.rate_at(15) == 0.001


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "--lr is empty"),
        ("   ", "--lr is empty"),
        ("abc", "piece 1 'abc': rate 'abc' is not a number"),
        ("0.005:100, fast:200", "piece 2 'fast:200': rate 'fast' is not a number"),
        ("0.005:ten", "piece 1 '0.005:ten': step 'ten' is not a whole number"),
        ("0.005:1.5", "step '1.5' is not a whole number"),
        ("0.005:0", "step 0 must be 1 or more"),
        ("0:100", "must be a positive number"),
        ("-0.1", "must be a positive number"),
        ("nan", "must be a positive number"),
        ("0.005:100,,1e-5", "piece 2 is empty"),
        ("0.005:100, 1e-3:50", "piece 2 '1e-3:50': step 50 does not come after the previous piece's step 100"),
        ("0.005, 1e-3:500", "piece 2 '1e-3:500' comes after the bare rate 0.005"),
    ],
)
def test_errors_name_the_bad_piece(text, expected):
    with pytest.raises(TrainingError, match=None) as info:
        parse_schedule(text)
    assert expected in str(info.value)
    assert "--lr" in str(info.value)
