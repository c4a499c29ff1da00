"""``TrainOptions.from_params``: the documented defaults, typed and string values, errors naming the option."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from sdrepl.core.errors import TrainingError
from sdrepl.core.training.options import TrainOptions


def test_defaults_follow_the_interface_table():
    opts = TrainOptions.from_params({"name": "cat", "data": "/pics"})
    assert (opts.steps, opts.lr, opts.batch, opts.accum) == (3000, "0.005", 1, 1)
    assert (opts.template, opts.latents, opts.save_every, opts.preview_every) == ("subject_filewords", "once", 500, 500)
    assert (opts.init, opts.vectors, opts.format, opts.join) == ("*", 1, "safetensors", " ")
    assert opts.size is None and opts.precision is None and opts.seed is None and opts.clip_grad is None
    assert not (opts.resume or opts.overwrite or opts.flip or opts.center_crop or opts.shuffle_tags)
    assert opts.data == Path("/pics")
    assert opts.explicit == {"name", "data"}


def test_the_default_log_dir_is_dated_under_the_daemons_folder(tmp_path):
    opts = TrainOptions.from_params({"name": "cat", "data": "/pics"})
    assert opts.default_log_dir(tmp_path, dt.date(2024, 5, 17)) == tmp_path / "textual_inversion" / "2024-05-17" / "cat"
    relative = TrainOptions.from_params({"name": "cat", "data": "/pics", "log_dir": "logs/cat"})
    assert relative.resolved_log_dir(tmp_path) == tmp_path / "logs" / "cat"


def test_values_may_arrive_as_strings_from_a_repl_line():
    opts = TrainOptions.from_params({
        "name": "cat", "data": "/pics", "steps": "50", "batch": 2, "size": "96x64", "clip_grad": "norm:1.5",
        "tag_dropout": "0.1", "flip": True, "center_crop": "true", "seed": "42", "latents": "Random",
    })
    assert (opts.steps, opts.batch, opts.size, opts.clip_grad) == (50, 2, (96, 64), ("norm", 1.5))
    assert (opts.tag_dropout, opts.flip, opts.center_crop, opts.seed, opts.latents) == (0.1, True, True, 42, "random")


def test_property_sets_the_template_unless_one_is_given():
    assert TrainOptions.from_params({"name": "a", "data": "d", "property": "style"}).template == "style"
    with pytest.raises(TrainingError, match="give --template or --property, not both"):
        TrainOptions.from_params({"name": "a", "data": "d", "property": "style", "template": "none"})


def test_the_envelope_keys_are_ignored():
    TrainOptions.from_params({"id": 3, "type": "train", "wait": True, "name": "a", "data": "d"})


def test_data_may_be_left_out_only_when_resuming():
    assert TrainOptions.from_params({"name": "a", "resume": True}).data is None
    with pytest.raises(TrainingError, match="--data DIR is required"):
        TrainOptions.from_params({"name": "a"})


def test_saved_settings_fill_what_was_not_given():
    base = {"name": "a", "data": "/d", "steps": 100, "lr": "0.01", "save_every": 5, "seed": 9}
    opts = TrainOptions.from_params({"name": "a", "resume": True, "steps": 200}, base=base)
    assert (opts.steps, opts.lr, opts.save_every, opts.seed, opts.data) == (200, "0.01", 5, 9, Path("/d"))
    assert opts.explicit == {"name", "resume", "steps"}


def test_to_params_round_trips():
    opts = TrainOptions.from_params({"name": "a", "data": "/d", "size": "64x64", "clip_grad": "value:0.5",
                                     "log_dir": "/l", "seed": 3})
    again = TrainOptions.from_params(opts.to_params())
    assert again == opts


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"steps": "many"}, "--steps 'many': expected a whole number >= 1"),
        ({"steps": 0}, "--steps 0: must be 1 or more"),
        ({"batch": True}, "--batch True: expected a whole number"),
        ({"save_every": -1}, "--save-every -1: must be 0 or more"),
        ({"size": "64x60"}, "--size 64x60: width and height must be multiples of 8"),
        ({"size": "big"}, "--size 'big': expected WxH"),
        ({"latents": "sometimes"}, "--latents 'sometimes': expected one of once, deterministic, random"),
        ({"precision": "fp8"}, "--precision 'fp8': expected one of fp32, fp16, bf16"),
        ({"format": "bin"}, "--format 'bin': expected one of safetensors, pt"),
        ({"clip_grad": "norm"}, "--clip-grad 'norm': expected value:X or norm:X"),
        ({"clip_grad": "max:1"}, "--clip-grad 'max:1'"),
        ({"tag_dropout": 1.0}, "--tag-dropout 1.0: expected a probability"),
        ({"vectors": 80}, "--vectors 80: at most 75"),
        ({"lr": "0.005:abc"}, "step 'abc' is not a whole number"),
        ({"flip": "maybe"}, "--flip 'maybe': expected a flag"),
        ({"stpes": 10}, "unknown !train option(s): --stpes"),
        ({"name": "a/b"}, "not a usable embedding name"),
        ({"name": "two words"}, "not a usable embedding name"),
    ],
)
def test_errors_name_the_option(params, expected):
    with pytest.raises(TrainingError) as info:
        TrainOptions.from_params({"name": "cat", "data": "/pics", **params})
    assert expected in str(info.value)


@pytest.mark.parametrize("name", ["cat\n", " cat", "cat\t"])
def test_a_name_with_surrounding_whitespace_is_refused_not_trimmed(name):
    """A script that sends ``"cat\\n"`` must not get an embedding called ``cat`` without being told."""
    from sdrepl.core.training.options import check_name

    with pytest.raises(TrainingError, match="not a usable embedding name"):
        check_name(name, "!create")
    assert check_name("cat", "!create") == "cat"
