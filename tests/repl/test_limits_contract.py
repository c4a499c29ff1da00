"""The contract between the REPL and the daemon on parameter limits (``core.limits``, one table).

Every REPL-side numeric parameter, typed on a generation line or set with ``!set``, is fed at and just
beyond each end of its range through the REPL's parser and then through the daemon's own validation
(``daemon.generation.parse_job``): what the REPL accepts the daemon accepts, and what the REPL refuses the
daemon refuses too. Before the table ``!set n 30`` was taken by the REPL and refused by the daemon on
every later line.
"""

from __future__ import annotations

import pytest

from sdrepl.core.errors import SdreplError
from sdrepl.core.limits import LIMITS
from sdrepl.daemon.generation import parse_job
from sdrepl.daemon.protocol import BadRequest
from sdrepl.repl import actions
from sdrepl.repl.actions import generation_params
from sdrepl.repl.parse import GENERATION_OPTIONS, parse_generation
from sdrepl.repl.session import SessionDefaults

#: REPL spelling -> the daemon parameter it becomes (every numeric generation option).
LINE_OPTIONS = {"--steps": "steps", "--cfg": "cfg", "--n": "n", "--clip-skip": "clip_skip", "--seed": "seed",
                "--width": "width", "--height": "height", "--comma-padding-backtrack": "comma_padding_backtrack"}
#: The job's field for a parameter whose name differs.
JOB_FIELD = {"comma_padding_backtrack": "comma_window"}


def probes(name: str) -> list[float]:
    limit = LIMITS[name]
    step = limit.multiple or (0.5 if isinstance(limit.lo, float) else 1)
    return [limit.lo, limit.hi, limit.lo - step, limit.hi + step]


def number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(int(value))


#: img2img and hires fix options: spelling -> (daemon parameter, its LIMITS key, what the line needs besides).
CONTEXT_OPTIONS = {"--strength": ("strength", "strength", " --init x.png"),
                   "--hires": ("hires", "hires_scale", " --size 64x64"),
                   "--hires-steps": ("hires_steps", "hires_steps", " --hires 2"),
                   "--hires-denoise": ("hires_denoise", "hires_denoise", " --hires 2")}


def test_every_numeric_generation_option_is_in_the_table():
    keys = {o.key for o in GENERATION_OPTIONS} - {"negative", "sampler", "size", "emphasis", "init",
                                                   "hires_upscaler"}
    assert keys == set(LINE_OPTIONS.values()) | {name for name, _, _ in CONTEXT_OPTIONS.values()}


@pytest.mark.parametrize(("spelling", "names"), CONTEXT_OPTIONS.items())
def test_img2img_and_hires_limits_agree(spelling, names):
    name, limit_key, context = names
    base = {"prompt": "a cat", "width": 64, "height": 64, **({"init": "/x.png"} if "init" in context else {}),
            **({"hires": 2.0} if "--hires " in context else {})}
    for value in probes(limit_key):
        try:
            line = parse_generation(f"a cat {spelling} {number(value)}{context}")
        except SdreplError:
            with pytest.raises(BadRequest):
                parse_job({**base, name: value})
            continue
        params = generation_params(line, SessionDefaults())
        job, _ = parse_job(params)  # must not raise: the REPL let it through
        got = {"strength": job.strength, "hires": job.hires and job.hires.scale,
               "hires_steps": job.hires and job.hires.steps, "hires_denoise": job.hires and job.hires.denoise}[name]
        assert got == value


@pytest.mark.parametrize(("spelling", "name"), LINE_OPTIONS.items())
def test_a_generation_line_and_the_daemon_agree(spelling, name):
    for value in probes(name):
        other = {"width": " --height 64", "height": " --width 64"}.get(name, "")
        try:
            line = parse_generation(f"a cat {spelling} {number(value)}{other}")
        except SdreplError:
            with pytest.raises(BadRequest):
                parse_job({"prompt": "a cat", name: value})
            continue
        params = generation_params(line, SessionDefaults())
        job, _ = parse_job(params)  # must not raise: the REPL let it through
        assert getattr(job, JOB_FIELD.get(name, name)) == value or name == "seed"


@pytest.mark.parametrize("name", ["steps", "cfg", "n", "clip_skip", "seed", "comma_padding_backtrack"])
def test_set_and_the_daemon_agree(name):
    for value in probes(name):
        try:
            setting = actions._SETTERS[name](number(value))
        except ValueError:
            with pytest.raises(BadRequest):
                parse_job({"prompt": "a cat", name: value})
            continue
        defaults = SessionDefaults()
        setattr(defaults, name, setting)
        parse_job(generation_params(parse_generation("a cat"), defaults))


def test_set_size_and_the_daemon_agree():
    limit = LIMITS["width"]
    for side in (limit.lo, limit.hi, limit.lo - 8, limit.hi + 8, 68):
        try:
            size = actions._SETTERS["size"](f"{int(side)}x64")
        except ValueError:
            with pytest.raises(BadRequest):
                parse_job({"prompt": "a cat", "width": int(side), "height": 64})
            continue
        defaults = SessionDefaults(size=size)
        job, _ = parse_job(generation_params(parse_generation("a cat"), defaults))
        assert (job.width, job.height) == (side, 64)


def test_set_n_30_is_taken_by_both_sides():
    """The issue's case: ``!set n 30`` used to pass the REPL and fail every later line at the daemon."""
    defaults = SessionDefaults(n=actions._SETTERS["n"]("30"))
    job, _ = parse_job(generation_params(parse_generation("a cat"), defaults))
    assert job.n == 30
