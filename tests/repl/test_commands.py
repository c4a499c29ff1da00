"""The meta-command table: each command's argument parsing, its errors, and its help."""

from __future__ import annotations

import pytest

from sdrepl.core.errors import TrainingError, UsageError
from sdrepl.repl.commands import COMMANDS, find_command, help_text, split_command
from sdrepl.repl.train_args import TRAIN_OPTIONS

CONTRACT = ["help", "embeddings", "show", "tokens", "set", "create", "train", "preprocess", "convert", "fetch",
            "replay", "history", "reload", "status", "quit", "exit"]


def parse(line: str):
    name, args = split_command(line)
    return find_command(name).parse(args)


@pytest.mark.parametrize("name", CONTRACT)
def test_every_contract_command_exists_and_has_help(name):
    result, text = help_text(name)
    cmd = find_command(name)
    assert result["command"] == cmd.name and result["usage"] == cmd.usage
    assert text.startswith(cmd.usage) and len(cmd.help) > 40


def test_help_without_argument_lists_every_command():
    result, text = help_text(None)
    assert [c["name"] for c in result["commands"]] == [c.name for c in COMMANDS]
    for cmd in COMMANDS:
        assert f"!{cmd.name}" in text
    assert "--steps" in text  # the generation line is explained too


@pytest.mark.parametrize("args, expected", [("", None), ("set", "set"), ("!train", "train"), ("exit", "quit"),
                                            ("generate", "generate")])
def test_help_argument(args, expected):
    assert parse(f"!help {args}") == expected


def test_unknown_command_suggests_and_lists():
    with pytest.raises(UsageError) as err:
        parse("!embedings")
    assert "did you mean !embeddings" in str(err.value) and "!tokens" in str(err.value)


@pytest.mark.parametrize("line", ["!embeddings x", "!reload now", "!status please", "!quit now"])
def test_commands_without_arguments_refuse_them(line):
    with pytest.raises(UsageError, match="takes no arguments"):
        parse(line)


def test_show_strips_angle_brackets():
    assert parse("!show <bad-hands-5>") == "bad-hands-5"


@pytest.mark.parametrize("line", ["!show", "!show two words", "!show a/../b", "!show /"])
def test_show_needs_one_name(line):
    with pytest.raises(UsageError, match="!show NAME"):
        parse(line)


def test_tokens_takes_a_whole_generation_line():
    parsed = parse("!tokens a photo of <bad-hands-5> --neg ugly --steps 30")
    assert parsed.prompt == "a photo of <bad-hands-5>" and parsed.negative == "ugly"


@pytest.mark.parametrize("line, expected", [
    ("!set", (None, None)), ("!set steps", ("steps", None)), ("!set steps 30", ("steps", "30")),
    ("!set negative blurry, lowres", ("negative", "blurry, lowres")), ("!set neg x", ("negative", "x")),
    ("!set clip-skip 2", ("clip_skip", "2")), ("!set SEED random", ("seed", "random")),
])
def test_set_arguments(line, expected):
    assert parse(line) == expected


def test_set_unknown_key_lists_keys():
    with pytest.raises(UsageError, match=r"unknown key 'stpes' \(did you mean steps\?\).*clip_skip"):
        parse("!set stpes 3")


@pytest.mark.parametrize("line, expected", [
    ("!create cat", {"name": "cat"}),
    ("!create <cat> --init a small cat --vectors 4 --overwrite",
     {"name": "cat", "init": "a small cat", "vectors": 4, "overwrite": True}),
    ("!create cat --init \"\" --format pt", {"name": "cat", "init": "", "format": "pt"}),
])
def test_create(line, expected):
    assert parse(line) == expected


@pytest.mark.parametrize("line, fragment", [
    ("!create", "missing NAME"), ("!create a b", "not a usable embedding name"),
    ("!create cat --vectors 0", "out of range"), ("!create cat --vectors 80", "out of range"),
    ("!create cat --overwrite yes", "takes no value"), ("!create cat --size 3", "unknown option --size"),
])
def test_create_errors(line, fragment):
    with pytest.raises(UsageError, match=fragment):
        parse(line)


@pytest.mark.parametrize("sub", ["status", "pause", "resume", "stop"])
def test_train_subcommands(sub):
    assert parse(f"!train {sub}") == {"sub": sub}


def test_train_every_option_of_the_contract(tmp_path):
    line = (f"!train cat --data {tmp_path} --init a cat --vectors 2 --steps 100 --lr 0.005:50, 1e-3 --batch 2 "
            "--accum 3 --size 512x512 --template style --filename-regex (\\w+) --join \" \" --shuffle-tags "
            "--tag-dropout 0.1 --latents random --clip-grad norm:1 --repeats 2 --center-crop --flip "
            "--precision bf16 --gradient-checkpointing --save-every 10 --preview-every 0 --log-every 5 "
            "--preview-prompt a photo of [name] --log-dir logs/cat --seed 42 --format pt --overwrite --wait")
    params = parse(line)["params"]
    assert params == {
        "name": "cat", "data": str(tmp_path), "init": "a cat", "vectors": 2, "steps": 100,
        "lr": "0.005:50, 1e-3", "batch": 2, "accum": 3, "size": "512x512", "template": "style",
        "filename_regex": "(\\w+)", "join": " ", "shuffle_tags": True, "tag_dropout": 0.1, "latents": "random",
        "clip_grad": "norm:1", "repeats": 2, "center_crop": True, "flip": True, "precision": "bf16",
        "gradient_checkpointing": True, "save_every": 10, "preview_every": 0, "log_every": 5,
        "preview_prompt": "a photo of [name]", "log_dir": "logs/cat", "seed": 42, "format": "pt",
        "overwrite": True, "wait": True,
    }
    table_keys = {opt.key for opt in TRAIN_OPTIONS}
    assert table_keys - set(params) == {"property", "resume"}  # the two left out above


def test_train_resume_needs_no_data():
    assert parse("!train cat --resume")["params"] == {"name": "cat", "resume": True, "wait": False}


@pytest.mark.parametrize("line, error, fragment", [
    ("!train", UsageError, "needs a NAME"),
    ("!train cat", UsageError, "--data DIR is required"),
    ("!train two names --data d", UsageError, "one word"),
    ("!train status --data d", UsageError, "takes no options"),
    ("!train cat --data d --lr 0.005:100, 0.001:50", TrainingError, "steps must increase"),
    ("!train cat --data d --latents sometimes", UsageError, "once, deterministic, random"),
    ("!train cat --data d --clip-grad 3", UsageError, "norm:X"),
    ("!train cat --data d --filename-regex (", UsageError, "regular expression"),
    ("!train cat --data d --size 500", UsageError, "multiples of 8"),
    ("!train cat --data d --tag-dropout 1.5", UsageError, "out of range"),
    ("!train cat --data d --template style --property object", TrainingError, "not both"),
    ("!train cat --data d --learning-rate 1", UsageError, "unknown option --learning-rate"),
])
def test_train_errors(line, error, fragment):
    with pytest.raises(error, match=fragment):
        parse(line)


def test_preprocess(tmp_path):
    assert parse("!preprocess raw \"my set\" --size 512 --crop split --flip --caption") == {
        "src": "raw", "dst": "my set", "size": 512, "crop": "split", "flip": True, "caption": True}


@pytest.mark.parametrize("line, fragment", [
    ("!preprocess only-one", "needs SRC and DST"), ("!preprocess a b --crop diagonal", "center, split, none"),
    ("!preprocess a b --size 100", "multiple of 8"), ("!preprocess 'a b", "quote paths"),
])
def test_preprocess_errors(line, fragment):
    with pytest.raises(UsageError, match=fragment):
        parse(line)


def test_convert():
    assert parse("!convert bad-hands-5 --to safetensors --overwrite") == {
        "name": "bad-hands-5", "to": "safetensors", "overwrite": True}


@pytest.mark.parametrize("line, fragment", [
    ("!convert x", "--to is required"), ("!convert x --to onnx", "safetensors, pt, diffusers"),
    ("!convert --to pt", "missing NAME"),
])
def test_convert_errors(line, fragment):
    with pytest.raises(UsageError, match=fragment):
        parse(line)


@pytest.mark.parametrize("line, path", [
    ("!fetch out/1.png", "out/1.png"), ("!fetch 'my pics/1.png'", "my pics/1.png"),
    ("!fetch my pics/1.png", "my pics/1.png"),
])
def test_fetch_paths(line, path):
    assert parse(line) == path


@pytest.mark.parametrize("line", ["!fetch", "!replay"])
def test_file_commands_need_a_file(line):
    with pytest.raises(UsageError, match="missing file name"):
        parse(line)


def test_history_filter():
    assert parse("!history  fox ") == "fox"
    assert parse("!history") == ""
