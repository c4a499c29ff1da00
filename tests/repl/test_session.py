"""The session executor against a fake daemon: requests sent, defaults applied, results and errors."""

from __future__ import annotations

import asyncio
import logging

import pytest
from PIL import Image

from sdrepl.core.pnginfo import build_parameters, png_text_chunks
from sdrepl.core.status_text import format_status
from sdrepl.daemon.client import DaemonUnavailable, RemoteError
from sdrepl.repl.session import LineResult, Session, SessionDefaults


def execute(session: Session, line: str, **kwargs) -> LineResult:
    return asyncio.run(session.execute(line, **kwargs))


def test_generation_applies_defaults(fake):
    result = execute(Session(fake), "a red fox --steps 2 --size 64x64")
    assert result.ok and result.kind == "generate"
    assert fake.calls == [("generate", {"prompt": "a red fox", "negative": "", "steps": 2, "cfg": 7.0,
                                        "seed": None, "sampler": "Euler a", "n": 1, "clip_skip": 1,
                                        "width": 64, "height": 64})]
    assert result.result["images"] == [{"path": "/out/2026-11-22/00001-1234.png", "seed": 1234}]


def test_generation_without_size_lets_the_model_choose(fake):
    execute(Session(fake), "a cat")
    assert "width" not in fake.calls[0][1] and "height" not in fake.calls[0][1]


def test_set_changes_later_lines_and_line_options_win(fake):
    session = Session(fake)
    for line in ["!set steps 30", "!set size 512x768", "!set seed 5", "!set negative blurry, lowres",
                 "!set sampler dpmpp_2m", "!set n 2", "!set cfg 4.5", "!set clip_skip 2"]:
        assert execute(session, line).ok, line
    execute(session, "a cat --steps 3 -W 640")
    assert fake.calls[-1][1] == {"prompt": "a cat", "negative": "blurry, lowres", "steps": 3, "cfg": 4.5,
                                 "seed": 5, "sampler": "DPM++ 2M", "n": 2, "clip_skip": 2, "width": 640,
                                 "height": 768}
    execute(session, "a cat --seed random")
    assert fake.calls[-1][1]["seed"] is None


def test_width_alone_without_a_default_size_is_an_error(fake):
    result = execute(Session(fake), "a cat -W 640")
    assert not result.ok and result.error["type"] == "UsageError" and "--size" in result.error["message"]
    assert fake.calls == []


def test_generation_text_shows_paths_seeds_and_budget(fake, tmp_path):
    fake.replies["generate"] = lambda p: {"images": [{"path": str(tmp_path / "outputs" / "00001-7.png"),
                                                      "seed": 7}],
                                          "tokens": {"count": 12, "limit": 75, "bare": ["EasyNegative"]},
                                          "elapsed_s": 0.84}
    result = execute(Session(fake, cwd=tmp_path), "a cat")
    assert result.text == "outputs/00001-7.png  (seed 7, 12/75 tokens, 0.8 s, bare words as embeddings: EasyNegative)"


def test_generation_reports_its_request_id_for_cancelling(fake):
    started: list[int] = []
    execute(Session(fake), "a cat", on_request_started=started.append)
    assert started == [1]


def test_cancelled_generation_cancels_the_daemon_request(fake):
    async def scenario():
        loop = asyncio.get_running_loop()
        never = loop.create_future()
        fake.start = lambda type_name, **params: (41, never)
        task = loop.create_task(Session(fake).execute("a cat"))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)

    asyncio.run(scenario())
    assert fake.cancelled == [41]


@pytest.mark.parametrize("line, kind, type_name", [
    ("a cat --stpes 3", "generate", "UsageError"),
    ("a cat --steps x", "generate", "PromptError"),
    ("!nosuch", "command", "UsageError"),
    ("!set steps many", "set", "UsageError"),
    ("!set sampler warp", "set", "SamplerError"),
])
def test_local_errors(fake, line, kind, type_name):
    result = execute(Session(fake), line)
    assert (result.ok, result.kind, result.error["type"]) == (False, kind, type_name)
    assert result.text.startswith(f"error: {type_name}: ")


def test_remote_errors_keep_the_daemons_type(make_fake):
    fake = make_fake({"generate": RemoteError("PromptError", "unknown embedding <nosuch>; did you mean <x>?")})
    result = execute(Session(fake), "a <nosuch> cat")
    assert result.error == {"type": "PromptError", "message": "unknown embedding <nosuch>; did you mean <x>?"}


def test_unexpected_errors_are_one_line_internal_errors(make_fake, caplog):
    fake = make_fake({"embeddings": lambda p: {}["boom"]})
    with caplog.at_level(logging.ERROR, logger="sdrepl.repl"):
        result = execute(Session(fake), "!embeddings")
    assert result.error["type"] == "InternalError" and "KeyError" in result.error["message"]
    assert "\n" not in result.error["message"] and "Traceback" not in result.text
    assert any(r.exc_info for r in caplog.records)


def test_lost_daemon_is_daemon_unavailable(make_fake):
    fake = make_fake({"status": DaemonUnavailable("daemon went away (closed)")})
    assert execute(Session(fake), "!status").error["type"] == "DaemonUnavailable"


def test_blank_and_comment_lines_do_nothing(fake):
    for line in ["", "   ", "# a comment"]:
        result = execute(Session(fake), line)
        assert result.ok and result.kind == "empty"
    assert fake.calls == []


def test_a_whole_block_can_be_executed(fake):
    result = execute(Session(fake), '"""\na long\nprompt\n""" --steps 3')
    assert result.ok and fake.calls[0][1]["prompt"] == "a long\nprompt" and fake.calls[0][1]["steps"] == 3


def test_tokens_uses_the_session_negative_unless_given(fake):
    session = Session(fake, defaults=SessionDefaults(negative="lowres"))
    result = execute(session, "!tokens a photo of <bad-hands-5>")
    assert fake.calls[-1] == ("tokens", {"prompt": "a photo of <bad-hands-5>", "negative": "lowres", "steps": 20})
    assert result.result["tokens"]["count"] == 5
    assert result.text.splitlines()[0] == "tokens 5/75 · neg 0/75 · embeddings: bad-hands-5"
    execute(session, "!tokens x --neg ugly")
    assert fake.calls[-1][1]["negative"] == "ugly"


def test_tokens_text_shows_chunks_and_bare_words(make_fake):
    fake = make_fake({"tokens": {"count": 80, "limit": 150, "chunks": 2, "embeddings": ["EasyNegative"],
                                 "bare": ["EasyNegative"], "chunk_texts": ["first part", "second part"],
                                 "negative": {"count": 0, "limit": 75}}})
    text = execute(Session(fake), "!tokens long").text
    assert text.splitlines() == ["tokens 80/150 · neg 0/75 · embeddings: EasyNegative", "  chunk 1: first part",
                                 "  chunk 2: second part", "  bare words taken as embeddings: EasyNegative"]


def test_embeddings_table(fake):
    result = execute(Session(fake), "!embeddings")
    assert result.result["embeddings"][0]["name"] == "bad-hands-5"
    assert result.result["skipped"] == [{"path": "/emb/sd2.pt", "reason": "width 1024 does not fit this model (768)"}]
    lines = result.text.splitlines()
    assert lines[0].split() == ["trigger", "vectors", "width", "format", "file", "step", "hash"]
    assert lines[1].split() == ["bad-hands-5", "2", "768", "a1111-pt", "bad-hands-5.pt", "1419", "0123456789ab"]
    assert lines[2:] == ["skipped 1 file(s):", "  sd2.pt: width 1024 does not fit this model (768)",
                         "warning: two files are called x"]


def test_show_reload_status(fake):
    session = Session(fake)
    shown = execute(session, "!show <bad-hands-5>")
    assert fake.calls[-1] == ("show", {"name": "bad-hands-5"}) and "norms:" in shown.text
    assert execute(session, "!reload").text == "added: cat"
    status = execute(session, "!status")
    assert status.result["status"]["pid"] == 1 and "model:      tiny" in status.text
    assert status.text == format_status(status.result["status"])  # !status is as `sdrepl status`


def test_status_of_a_daemon_whose_model_keep_alive_unloaded():
    text = format_status({"pid": 1, "state": "unloaded", "model": None, "uptime_s": 3725})
    assert "model:      not loaded: unloaded" in text and "up 1h02m" in text


def test_create_and_convert(fake):
    session = Session(fake)
    created = execute(session, "!create cat --init a cat --vectors 2")
    assert fake.calls[-1] == ("create", {"name": "cat", "init": "a cat", "vectors": 2})
    assert created.result["path"] == "/emb/cat.safetensors" and "cat" in created.text
    converted = execute(session, "!convert cat --to pt")
    assert fake.calls[-1] == ("convert", {"name": "cat", "to": "pt", "overwrite": False})
    assert converted.text == "wrote /emb/cat.pt"


def test_train_wait_resolves_paths_and_returns_the_embedding(fake, tmp_path):
    (tmp_path / "pics").mkdir()
    result = execute(Session(fake, cwd=tmp_path), "!train cat --data pics --steps 10 --log-dir logs --wait")
    assert fake.calls[-1] == ("train", {"name": "cat", "data": str(tmp_path / "pics"), "steps": 10,
                                        "log_dir": str(tmp_path / "logs"), "wait": True})
    assert result.result["embedding"] == {"name": "cat", "path": "/emb/cat.safetensors", "steps": 10,
                                          "final_loss": 0.1}
    assert result.text == "trained cat: 10 steps, final loss 0.1 -> /emb/cat.safetensors"


def test_train_checks_the_data_folder_before_sending(fake, tmp_path):
    result = execute(Session(fake, cwd=tmp_path), "!train cat --data missing")
    assert result.error["type"] == "UsageError" and "no such folder" in result.error["message"]
    assert fake.calls == []


def test_train_template_file_is_resolved(fake, tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "t.txt").write_text("a photo of [name]\n")
    execute(Session(fake, cwd=tmp_path), "!train cat --data pics --template t.txt")
    assert fake.calls[-1][1]["template"] == str(tmp_path / "t.txt")


@pytest.mark.parametrize("sub", ["status", "pause", "resume", "stop"])
def test_train_subcommands_send_their_request(fake, sub):
    result = execute(Session(fake), f"!train {sub}")
    assert fake.calls[-1] == (f"train_{sub}", {}) and result.ok


def test_preprocess_resolves_folders(fake, tmp_path):
    (tmp_path / "raw").mkdir()
    result = execute(Session(fake, cwd=tmp_path), "!preprocess raw ready --size 64 --flip")
    assert fake.calls[-1] == ("preprocess", {"src": str(tmp_path / "raw"), "dst": str(tmp_path / "ready"),
                                             "size": 64, "flip": True})
    assert result.text.splitlines()[0].startswith("wrote 3 picture(s)")
    missing = execute(Session(fake, cwd=tmp_path), "!preprocess nowhere ready")
    assert "does not exist" in missing.error["message"]


def write_png(path, parameters: str | None) -> None:
    image = Image.new("RGB", (8, 8))
    image.save(path, pnginfo=png_text_chunks(parameters) if parameters else None)


def test_fetch_rebuilds_the_generation_line(fake, tmp_path):
    text = build_parameters(prompt="a portrait of <cat-toy> --not-an-option", negative="EasyNegative, blurry",
                            steps=25, sampler="DPM++ 2M Karras", cfg=6.5, seed=99, width=512, height=768,
                            clip_skip=2)
    write_png(tmp_path / "a.png", text)
    result = execute(Session(fake, cwd=tmp_path), "!fetch a.png")
    line = ("a portrait of <cat-toy> \\--not-an-option --neg EasyNegative, blurry --steps 25 --cfg 6.5 --seed 99 "
            "--size 512x768 --sampler DPM++ 2M Karras --clip-skip 2")
    assert result.result == {"command": line, "unsupported": []} and result.edit_buffer == line and result.text == line
    execute(Session(fake), line)
    sent = fake.calls[-1][1]
    assert (sent["prompt"], sent["negative"], sent["seed"], sent["width"]) == (
        "a portrait of <cat-toy> --not-an-option", "EasyNegative, blurry", 99, 512)


def test_fetch_of_a_multiline_prompt_gives_a_block(fake, tmp_path):
    write_png(tmp_path / "m.png", build_parameters(prompt="line one\nline two", steps=2, sampler="Euler",
                                                   cfg=7, seed=1, width=64, height=64))
    line = execute(Session(fake, cwd=tmp_path), "!fetch m.png").edit_buffer
    assert line.startswith('"""\nline one\nline two\n--steps 2') and line.endswith('\n"""')
    execute(Session(fake), line)
    assert fake.calls[-1][1]["prompt"] == "line one\nline two"


@pytest.mark.parametrize("name, parameters, fragment", [
    ("none.png", None, "no generation parameters"), ("missing.png", "", "no such file"),
])
def test_fetch_errors(fake, tmp_path, name, parameters, fragment):
    if parameters is None:
        write_png(tmp_path / name, None)
    result = execute(Session(fake, cwd=tmp_path), f"!fetch {name}")
    assert result.error["type"] == "PngInfoError" and fragment in result.error["message"]


def test_history_is_the_lines_seen_so_far_filtered(fake):
    session = Session(fake)
    for line in ["a red fox", "!set steps 3", "a blue fox"]:
        execute(session, line)
    result = execute(session, "!history fox")
    assert result.result == {"history": [{"n": 1, "line": "a red fox"}, {"n": 3, "line": "a blue fox"}]}
    assert result.text.splitlines() == ["1  a red fox", "3  a blue fox"]


def test_history_comes_from_the_provider_when_given(fake):
    session = Session(fake, history=lambda: ["old one", "older fox"])
    assert execute(session, "!history FOX").result == {"history": [{"n": 2, "line": "older fox"}]}


def test_set_shows_one_or_all_and_resets(fake):
    session = Session(fake)
    assert execute(session, "!set seed").text == "seed  random"
    assert execute(session, "!set").result["defaults"] == {"steps": 20, "cfg": 7.0, "seed": None, "size": None,
                                                           "sampler": "Euler a", "negative": "", "n": 1,
                                                           "clip_skip": 1, "emphasis": None,
                                                           "comma_padding_backtrack": None, "preview": "auto"}
    execute(session, "!set steps 50")
    assert execute(session, "!set steps default").text == "steps = 20"
    execute(session, "!set negative ugly")
    assert execute(session, '!set negative ""').result["set"] == {"negative": ""}
    assert execute(session, "!set size native").result["set"] == {"size": None}


def test_replay_runs_each_line_and_reports_per_line(fake, tmp_path):
    (tmp_path / "r.txt").write_text('# setup\n!set steps 4\n\na cat\n!set steps x\n"""\nblock\n"""\n')
    session = Session(fake, cwd=tmp_path)
    seen: list[int] = []
    result = execute(session, "!replay r.txt")
    assert not result.ok and result.result["failed"] == 1
    assert [(e["line"], e["ok"]) for e in result.result["lines"]] == [(2, True), (4, True), (5, False), (6, True)]
    assert result.error["type"] == "UsageError" and "line 5" in result.error["message"]
    assert fake.calls[0][1]["steps"] == 4 and session.defaults.steps == 4
    assert "r.txt:4> a cat" in result.text and result.text.splitlines()[-1].startswith("replayed 4 line(s)")
    session.on_replay_result = lambda number, source, line_result: seen.append(number)
    (tmp_path / "ok.txt").write_text("a dog\n!quit\na never\n")
    again = execute(session, "!replay ok.txt")
    assert again.ok and seen == [1, 2] and again.text == "replayed 2 line(s) from ok.txt: 2 ok, 0 failed"
    assert not again.quit  # !quit ends the replay, not the session


def test_replay_refuses_endless_recursion(fake, tmp_path):
    (tmp_path / "self.txt").write_text("!replay self.txt\n")
    result = execute(Session(fake, cwd=tmp_path), "!replay self.txt")
    assert not result.ok and "nested" in str(result.result)


def test_replay_of_a_missing_file(fake, tmp_path):
    result = execute(Session(fake, cwd=tmp_path), "!replay nope.txt")
    assert result.error["type"] == "UsageError" and "no such file" in result.error["message"]


@pytest.mark.parametrize("line", ["!quit", "!exit", "!QUIT"])
def test_quit(fake, line):
    result = execute(Session(fake), line)
    assert result.ok and result.quit and result.kind == "quit"


def test_help_is_local(fake):
    result = execute(Session(fake), "!help tokens")
    assert result.ok and result.result["command"] == "tokens" and fake.calls == []


def test_to_json_shapes():
    ok = LineResult(True, "tokens", {"tokens": {"count": 1}}, None, "t")
    assert ok.to_json(3, "!tokens a") == {"line": 3, "input": "!tokens a", "ok": True, "tokens": {"count": 1}}
    bad = LineResult(False, "generate", {}, {"type": "PromptError", "message": "m"}, "error: ...")
    assert bad.to_json(4, "x") == {"line": 4, "input": "x", "ok": False,
                                   "error": {"type": "PromptError", "message": "m"}}


def test_set_emphasis_and_comma_backtrack_travel_with_generations_and_tokens(fake):
    session = Session(fake)
    assert execute(session, "!set emphasis no norm").text == "emphasis = No norm"
    assert execute(session, "!set comma-padding-backtrack 0").text == "comma_padding_backtrack = 0"
    execute(session, "a cat --steps 3")
    assert fake.calls[-1][1]["emphasis"] == "No norm" and fake.calls[-1][1]["comma_padding_backtrack"] == 0
    execute(session, "!tokens a [cat:dog:0.5] --steps 8")
    assert fake.calls[-1][0] == "tokens"
    assert {k: fake.calls[-1][1][k] for k in ("steps", "emphasis", "comma_padding_backtrack")} == {
        "steps": 8, "emphasis": "No norm", "comma_padding_backtrack": 0}
    execute(session, "!set emphasis default")
    execute(session, "a cat")
    assert "emphasis" not in fake.calls[-1][1]  # not set: the daemon's own setting applies


@pytest.mark.parametrize(("line", "message"), [("!set emphasis strong", "Original, No norm, Ignore, None"),
                                               ("!set comma_padding_backtrack 75", "75")])
def test_bad_prompt_settings_are_refused_with_the_choices(fake, line, message):
    result = execute(Session(fake), line)
    assert not result.ok and message in result.error["message"]


def test_a_line_may_carry_its_own_prompt_settings(fake):
    session = Session(fake, defaults=SessionDefaults(emphasis="Ignore"))
    execute(session, "a cat --emphasis No norm --comma-padding-backtrack 5")
    assert {k: fake.calls[-1][1][k] for k in ("emphasis", "comma_padding_backtrack")} == {
        "emphasis": "No norm", "comma_padding_backtrack": 5}
    execute(session, "a cat")
    assert fake.calls[-1][1]["emphasis"] == "Ignore"
    result = execute(session, "a cat --emphasis loud")
    assert not result.ok and "Original, No norm, Ignore, None" in result.error["message"]


def test_fetch_brings_back_emphasis_and_the_comma_window():
    from sdrepl.core.pnginfo import build_parameters, parse_parameters
    from sdrepl.repl.actions import fetch_line, unsupported_fields
    from sdrepl.repl.parse import parse_generation

    text = build_parameters(prompt="a (cat:1.2)", steps=4, sampler="Euler", cfg=7, seed=1, width=64, height=64,
                            extra={"Emphasis": "No norm", "Comma padding backtrack": 0})
    parsed = parse_parameters(text)
    line = fetch_line(parsed)
    assert line.endswith("--emphasis No norm --comma-padding-backtrack 0")
    again = parse_generation(line)
    assert (again.prompt, again.emphasis, again.comma_padding_backtrack) == ("a (cat:1.2)", "No norm", 0)
    assert unsupported_fields(parsed) == []


def test_tokens_text_shows_and_parts_and_a_trailing_weight():
    from sdrepl.repl import render

    neg = {"count": 0, "limit": 75}
    two = render.tokens({"count": 2, "limit": 75, "negative": neg, "parts": [
        {"text": "a cat", "weight": 1.0, "count": 2, "limit": 75},
        {"text": " a dog", "weight": 0.5, "count": 2, "limit": 75}]})
    assert two.splitlines()[1:] == ["  AND part 1 (weight 1): 2/75  a cat", "  AND part 2 (weight 0.5): 2/75  a dog"]
    one = render.tokens({"count": 3, "limit": 75, "negative": neg,
                         "parts": [{"text": "masterpiece, score", "weight": 9.0, "count": 3, "limit": 75}]})
    assert one.splitlines()[1].startswith("  weight 9 (a trailing :number is the prompt's weight")
