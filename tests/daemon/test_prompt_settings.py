"""The prompt settings of a request: emphasis and comma backtrack from the request, else the daemon's."""

from __future__ import annotations

import argparse

import pytest

from sdrepl.config import Settings, add_shared_options, settings_from_args
from sdrepl.core.errors import UsageError
from sdrepl.daemon.generation import parse_job
from sdrepl.daemon.protocol import BadRequest


def test_a_request_without_settings_gets_the_daemons():
    job, _ = parse_job({"prompt": "a cat"}, 64, Settings(emphasis="No norm", comma_padding_backtrack=5))
    assert (job.emphasis, job.comma_window) == ("No norm", 5)
    job, _ = parse_job({"prompt": "a cat", "emphasis": "none", "comma_padding_backtrack": 0}, 64, Settings())
    assert (job.emphasis, job.comma_window) == ("None", 0)
    assert job.options.emphasis == "None" and job.options.comma_window == 0


@pytest.mark.parametrize(("params", "message"), [
    ({"emphasis": "loud"}, "Original, No norm, Ignore, None"),
    ({"comma_padding_backtrack": 75}, "comma_padding_backtrack"),
    ({"comma_padding_backtrack": -1}, "comma_padding_backtrack"),
])
def test_bad_settings_are_bad_requests(params, message):
    with pytest.raises(BadRequest, match=message):
        parse_job({"prompt": "a cat", **params}, 64, Settings())


def parse(*args: str) -> Settings:
    parser = argparse.ArgumentParser()
    add_shared_options(parser)
    return settings_from_args(parser.parse_args(list(args)))


def test_daemon_options_and_their_round_trip():
    settings = parse("--emphasis", "no_norm", "--comma-padding-backtrack", "0")
    assert (settings.emphasis, settings.comma_padding_backtrack) == ("No norm", 0)
    again = parse(*settings.daemon_args())
    assert (again.emphasis, again.comma_padding_backtrack) == ("No norm", 0)


@pytest.mark.parametrize(("args", "message"), [(("--emphasis", "x"), "--emphasis"),
                                               (("--comma-padding-backtrack", "80"), "0 to 74")])
def test_bad_daemon_options_are_usage_errors(args, message):
    with pytest.raises(UsageError, match=message):
        parse(*args)
