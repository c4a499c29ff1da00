"""The meta-command table: every ``!command`` with its usage, help, argument parser and executor.

One :class:`Command` per row, so ``!help``, completion (names and usages) and the session's dispatch
all read the same table and cannot drift apart. A parser turns the text after the name into plain
parameters and raises :class:`UsageError` (what was wrong, and the usage); an executor gets the session
and those parameters, talks to the daemon through ``session.client`` and returns an :class:`Outcome`.
The executors themselves live in ``actions.py``.
"""

from __future__ import annotations

import difflib
import re
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdrepl.core.display import visible
from sdrepl.core.errors import UsageError
from sdrepl.core.names import name_problem
from sdrepl.repl import (
    actions,
    grid_command,
    inspect_command,
    mix_command,
    network_commands,
    render,
    view_command,
)
from sdrepl.repl.actions import Outcome
from sdrepl.repl.parse import (
    GenerationLine,
    Option,
    generation_help,
    parse_generation,
    split_options,
    to_choice,
    to_int,
    to_text,
)
from sdrepl.repl.train_args import TRAIN_OPTIONS, parse_train
from sdrepl.repl.train_args import USAGE as TRAIN_USAGE

if TYPE_CHECKING:
    from sdrepl.repl.session import Session


Executor = Callable[["Session", Any, "Callable[[int], None] | None"], Awaitable[Outcome]]


@dataclass(frozen=True)
class Command:
    name: str
    usage: str
    summary: str
    help: str
    parse: Callable[[str], Any]
    run: Executor
    aliases: tuple[str, ...] = ()


# -- argument parsers ---------------------------------------------------------------------------------



def _no_args(name: str) -> Callable[[str], None]:
    def parse(args: str) -> None:
        if args.strip():
            raise UsageError(f"!{name} takes no arguments (got {args.strip()!r}); usage: !{name}")
    return parse


def _embedding_name(text: str, usage: str, *, qualified: bool = False) -> str:
    """A name as typed (``<name>`` works); with ``qualified``, ``folder/name`` too (an existing embedding
    whose trigger collides is reached by it: ``!show negatives/bad-hands-5``)."""
    name = text.strip().strip("<>")
    if not name:
        raise UsageError(f"missing NAME; usage: {usage}")
    if qualified and "/" in name.strip("/"):
        parts = name.strip("/").split("/")
        problem = next((p for p in map(name_problem, parts) if p is not None), None)
        if problem is None:
            return "/".join(parts)
    problem = name_problem(name)  # the one rule, core/names.py (the daemon checks it again)
    if problem is not None:
        raise UsageError(f"{visible(repr(name))} is not a usable embedding name ({problem}): one word, no slashes "
                         f"or <>; usage: {usage}")
    return name


def _path_arg(args: str, usage: str) -> str:
    text = args.strip()
    if not text:
        raise UsageError(f"missing file name; usage: {usage}")
    try:
        words = shlex.split(text)
    except ValueError:
        words = [text]
    return words[0] if len(words) == 1 else text


def parse_help(args: str) -> str | None:
    name = args.strip().lstrip("!").lower()
    if not name:
        return None
    if name in ("generate", "generation", "prompt"):
        return "generate"
    return find_command(name).name


def parse_show(args: str) -> str:
    text = args.strip().strip("<>")
    if text.lower().startswith("lora:"):  # ``!show lora:NAME``: a LoRA (folder/name allowed)
        name = text[len("lora:"):].strip()
        if not name or any(c in name for c in "<>:"):
            raise UsageError("missing LoRA NAME; usage: !show lora:NAME")
        return "lora:" + name
    return _embedding_name(args, "!show NAME", qualified=True)


def parse_tokens(args: str) -> GenerationLine:
    line = parse_generation(args)
    if not line.prompt.strip() and not (line.negative or "").strip():
        raise UsageError("!tokens needs a prompt to count: !tokens PROMPT [--neg TEXT], e.g. !tokens a cat <name>")
    return line


SET_KEYS = ("steps", "cfg", "seed", "size", "sampler", "negative", "n", "clip_skip", "emphasis",
            "comma_padding_backtrack", "preview")
SET_ALIASES = {"neg": "negative", "negative_prompt": "negative", "clip-skip": "clip_skip", "cfg_scale": "cfg",
               "comma-padding-backtrack": "comma_padding_backtrack", "comma_backtrack": "comma_padding_backtrack",
               "cfg-scale": "cfg", "batch": "n"}


def parse_set(args: str) -> tuple[str | None, str | None]:
    """``(None, None)`` shows all, ``(key, None)`` shows one, ``(key, value)`` sets (checked by the session)."""
    text = args.strip()
    if not text:
        return None, None
    key, _, value = text.partition(" ")
    key = SET_ALIASES.get(key.lower(), key.lower())
    if key not in SET_KEYS:
        raise UsageError(f"!set: unknown key {key!r}{_suggest(key, SET_KEYS)}; keys: {', '.join(SET_KEYS)}")
    return key, (value.strip() if value.strip() else None)


CREATE_OPTIONS = (
    Option("init", ("--init",), to_text, "TEXT"),
    Option("vectors", ("--vectors",), to_int(1, 75), "N"),
    Option("format", ("--format",), to_choice("safetensors", "pt"), "safetensors|pt"),
    Option("overwrite", ("--overwrite",)),
)


def parse_create(args: str) -> dict[str, Any]:
    usage = "!create NAME [--init TEXT] [--vectors N] [--overwrite]"
    head, values = split_options(args, CREATE_OPTIONS, where="!create")
    return {"name": _embedding_name(head, usage), **values}


PREPROCESS_OPTIONS = (
    Option("size", ("--size",), to_int(64, 4096), "N"),
    Option("crop", ("--crop",), to_choice("center", "split", "none"), "center|split|none"),
    Option("flip", ("--flip",)),
    Option("caption", ("--caption",)),
)


def parse_preprocess(args: str) -> dict[str, Any]:
    usage = "!preprocess SRC DST [--size N] [--crop center|split|none] [--flip] [--caption]"
    head, values = split_options(args, PREPROCESS_OPTIONS, where="!preprocess")
    try:
        paths = shlex.split(head)
    except ValueError as exc:
        raise UsageError(f"!preprocess: {exc} in {head!r}; quote paths with spaces: \"my pics\"") from None
    if len(paths) != 2:
        raise UsageError(f"!preprocess needs SRC and DST folders (got {len(paths)} path(s)); usage: {usage}")
    if values.get("size") is not None and values["size"] % 8:
        raise UsageError(f"!preprocess --size {values['size']}: must be a multiple of 8, e.g. 512")
    return {"src": paths[0], "dst": paths[1], **values}


CONVERT_OPTIONS = (
    Option("to", ("--to",), to_choice("safetensors", "pt", "diffusers"), "safetensors|pt|diffusers"),
    Option("overwrite", ("--overwrite",)),
)


def parse_convert(args: str) -> dict[str, Any]:
    usage = "!convert NAME --to safetensors|pt|diffusers [--overwrite]"
    head, values = split_options(args, CONVERT_OPTIONS, where="!convert")
    name = _embedding_name(head, usage, qualified=True)
    if "to" not in values:
        raise UsageError(f"!convert {name}: --to is required; usage: {usage}")
    return {"name": name, "to": values["to"], "overwrite": bool(values.get("overwrite", False))}


PUSH_OPTIONS = (
    Option("lora", ("--lora",)),
    Option("overwrite", ("--overwrite",)),
)


def parse_push(args: str) -> dict[str, Any]:
    """``!push FILE [--lora] [--overwrite]``: a local embedding (or LoRA) file into the daemon's folder."""
    usage = "!push FILE [--lora] [--overwrite]"
    head, values = split_options(args, PUSH_OPTIONS, where="!push")
    return {"path": _path_arg(head, usage), "kind": "lora" if values.get("lora") else "embedding",
            "overwrite": bool(values.get("overwrite", False))}


def parse_model(args: str) -> str | None:
    """``!model`` (show) or ``!model NAME|PATH`` (switch); the daemon validates it as ``--model``."""
    text = args.strip()
    if not text:
        return None
    return _path_arg(text, "!model [NAME|PATH]")


def parse_fetch(args: str) -> str:
    return _path_arg(args, "!fetch IMAGE.png")


def parse_replay(args: str) -> str:
    return _path_arg(args, "!replay FILE")


def parse_history(args: str) -> str:
    return args.strip()


async def _show(session: Any, name: str, started: Any) -> Outcome:
    """``!show NAME`` for embeddings, ``!show lora:NAME`` for LoRAs."""
    if name.startswith(network_commands.LORA_PREFIX):
        return await network_commands.run_show_lora(session, name[len(network_commands.LORA_PREFIX):], started)
    return await actions.run_show(session, name, started)


async def _train(session: Any, parsed: dict[str, Any], started: Any) -> Outcome:
    """``!train plot [NAME]`` shows the loss plot (view_command.py); everything else is ``actions.run_train``."""
    if parsed.get("sub") == "plot":
        return await view_command.run_train_plot(session, parsed.get("name"), started)
    return await actions.run_train(session, parsed, started)


# -- the table ----------------------------------------------------------------------------------------

_OPT_LIST = ", ".join(opt.spelling for opt in TRAIN_OPTIONS)

COMMANDS: tuple[Command, ...] = (
    Command("help", "!help [CMD]", "help, per command",
            "Without CMD: every command with its usage, and the form of a generation line. With CMD (with or "
            "without the !): that command's usage and what it does. `!help generate` explains generation "
            "lines.", parse_help, actions.run_help),
    Command("embeddings", "!embeddings", "loaded embeddings and skipped files",
            "Lists the loaded embeddings (trigger, vectors, width, format, file, step, short hash), then every "
            "file in the embeddings folders that was not loaded, with the reason (wrong width for this model, "
            "broken file, ...), then warnings such as name collisions. On an SDXL model, SDXL pairs (clip_l + "
            "clip_g) load and SD 1.x embeddings are skipped, as A1111 does (ComfyUI would apply them to CLIP-L "
            "only); the reason says so.",
            _no_args("embeddings"), actions.run_embeddings),
    Command("show", "!show NAME | lora:NAME", "one embedding (or LoRA) in detail",
            "Everything known about one embedding: file, format, vectors, width, training step, init text, "
            "full sha256, per-vector norms, size and modification time. NAME may be written <NAME>. "
            "`!show lora:NAME` shows a LoRA: layout, rank, alpha, base model, keys matched per module group, "
            "metadata and its training tags (ss_tag_frequency) summarised.",
            parse_show, _show),
    Command("inspect", inspect_command.USAGE, "an embedding's vectors against the vocabulary",
            inspect_command.HELP, inspect_command.parse_inspect, inspect_command.run_inspect),
    Command("mix", mix_command.USAGE, "a new embedding from others: sums, slices, concatenation",
            mix_command.HELP, mix_command.parse_mix, mix_command.run_mix),
    Command("grid", grid_command.USAGE, "an X/Y/Z plot: a labelled grid of pictures over axis values",
            grid_command.HELP, grid_command.parse_grid, grid_command.run_grid),
    Command("loras", "!loras", "loaded LoRAs and skipped files",
            "Lists the LoRA / LyCORIS files of the LoRA folders (name, layout, rank, base model, keys matched, "
            "file, A1111 short hash), then every file that was not loaded with the reason (made for another "
            "model, keys that match nothing, broken file). Use one with <lora:NAME:WEIGHT> in a prompt.",
            _no_args("loras"), network_commands.run_loras),
    Command("hypernetworks", "!hypernetworks", "loaded hypernetworks and skipped files",
            "Lists the A1111 hypernetworks of the hypernetwork folders, then skipped files with the reason. "
            "Use one with <hypernet:NAME:STRENGTH> in a prompt.",
            _no_args("hypernetworks"), network_commands.run_hypernetworks),
    Command("tokens", "!tokens PROMPT [--neg TEXT]", "the token budget of a prompt, without generating",
            "Counts the tokens of PROMPT (and of --neg TEXT, else the session's negative prompt) the way "
            "generation will: 75 per chunk, embeddings costing their vectors. Shows which embeddings were "
            "found, which bare words were taken as embeddings, and each chunk's text when there is more than "
            "one. A prompt with editing ([a:b:0.5]) or alternation ([a|b]) shows the largest count any step "
            "uses and each text with its steps (for --steps, else !set steps); AND parts show their own "
            "budgets and weights. Any generation line may follow !tokens; its other options are ignored.",
            parse_tokens, actions.run_tokens),
    Command("set", "!set [KEY [VALUE]]", "show or set session defaults",
            f"Without arguments: all session defaults. With KEY: that one. With KEY VALUE: sets it for the "
            f"following generation lines (an option on a line still wins). Keys: {', '.join(SET_KEYS)}. "
            "`!set seed random` (or -1) draws a new seed per picture; `!set size native` uses the model's "
            "size; `!set negative \"\"` clears the negative prompt; `!set emphasis Original|No norm|Ignore|None` "
            "and `!set comma_padding_backtrack N` (0-74) are A1111's prompt settings (unset: the daemon's); "
            "`!set preview off|auto|kitty|iterm|sixel|blocks` chooses how the interactive REPL shows pictures "
            "(auto: what the terminal supports, else coloured half-blocks; scripted sessions never do); "
            "`!set KEY default` restores the default.",
            parse_set, actions.run_set),
    Command("create", "!create NAME [--init TEXT] [--vectors N] [--overwrite]", "a new, untrained embedding",
            "Writes a new embedding file into the first embeddings folder and loads it. Its vectors start as "
            "the token embeddings of --init TEXT (default *), spread over --vectors N (default 1). "
            "--format pt writes an A1111 .pt instead of .safetensors. An existing NAME needs --overwrite.",
            parse_create, actions.run_create),
    Command("train", TRAIN_USAGE, "train an embedding on the resident model",
            "Starts a textual-inversion job on the daemon's model; generation keeps working while it runs. "
            "NAME is created (as !create) if it does not exist. `!train status` shows the job, `!train pause`, "
            "`!train resume` and `!train stop` (which saves a resumable checkpoint) control it; --resume "
            "continues NAME's last checkpoint. --wait blocks until the job ends (for scripts). `!train plot "
            "[NAME]` shows the loss plot (loss.png of the log folder) of the current or last job, or of NAME's "
            f"newest run. Options: {_OPT_LIST}.", parse_train, _train),
    Command("preprocess", "!preprocess SRC DST [--size N] [--crop center|split|none] [--flip] [--caption]",
            "prepare a training folder",
            "Copies the pictures of folder SRC into DST at --size N (default: the model's native size), "
            "cropping to the centre (default), splitting long pictures into overlapping squares, or only "
            "resizing (none); --flip adds mirrored copies; --caption writes a caption .txt beside each. Quote "
            "paths with spaces.", parse_preprocess, actions.run_preprocess),
    Command("convert", "!convert NAME --to safetensors|pt|diffusers [--overwrite]",
            "write an embedding in another format",
            "Writes embedding NAME beside the original as safetensors, an A1111 .pt, or a diffusers "
            "learned_embeds.bin folder. The original is kept; an existing output needs --overwrite.",
            parse_convert, actions.run_convert),
    Command("push", "!push FILE [--lora] [--overwrite]", "send an embedding or LoRA file to the daemon",
            "Sends FILE (on this machine) into the daemon's first embeddings folder (--lora: its LoRA folder), "
            "also when the daemon runs on another machine. It is read and checked there as the library reads "
            "files, then published atomically; an existing file is kept unless --overwrite.",
            parse_push, actions.run_push),
    Command("fetch", "!fetch IMAGE.png", "the command that made a picture",
            "Reads the A1111 parameters text of a picture (sdrepl's or AUTOMATIC1111's) and rebuilds the "
            "generation line that makes it again: prompt, --neg, --steps, --cfg, --seed, --size, --sampler "
            "(a !grid picture: the !grid line with its axes). Interactive: the line goes into the edit buffer "
            "to change and run. Scripted: it is printed.",
            parse_fetch, actions.run_fetch),
    Command("view", view_command.USAGE, "show a picture in the terminal", view_command.HELP,
            view_command.parse_view, view_command.run_view),
    Command("replay", "!replay FILE", "run a file of REPL lines",
            "Runs every line of FILE in this session, as a scripted session would (comments, blank lines and "
            "\"\"\" blocks work; !set changes stay). Every line runs even when one fails; the result lists "
            "each line's outcome.", parse_replay, actions.run_replay),
    Command("history", "!history [TEXT]", "numbered history, filtered by TEXT",
            "The lines entered so far, numbered, oldest first; with TEXT, only those containing it (case "
            "does not matter).", parse_history, actions.run_history),
    Command("reload", "!reload", "rescan the embeddings folders now",
            "Rescans every embeddings folder at once and says what changed. The folder watcher normally makes "
            "this unnecessary; use it on file systems that send no change events (network mounts).",
            _no_args("reload"), actions.run_reload),
    Command("status", "!status", "the daemon's state, as sdrepl status",
            "Daemon pid and version, model (family, device, dtype, native size), memory, embeddings loaded "
            "and skipped, the queue and the training job.", _no_args("status"), actions.run_status),
    Command("model", "!model [NAME|PATH]", "show or switch the daemon's model",
            "Without NAME: the model the daemon serves. With NAME or PATH (what --model takes: tiny, tiny-sd2, "
            "a diffusers folder, a .safetensors/.ckpt file, a hub id): the daemon unloads its model and loads "
            "that one, checked as --model is (on failure the old model comes back); every connected client is "
            "told, and embeddings that do not fit the new model are skipped. Refused while a job trains.",
            parse_model, actions.run_model),
    Command("quit", "!quit", "leave the REPL (the daemon keeps running)",
            "Ends the session (also !exit and Ctrl-D). The daemon and any training job keep running; "
            "`sdrepl stop` stops them.", _no_args("quit"), actions.run_quit, aliases=("exit",)),
)

_BY_NAME = {name: cmd for cmd in COMMANDS for name in (cmd.name, *cmd.aliases)}

GENERATION_HELP = (
    f"{generation_help()}\n"
    "A line that does not start with ! makes pictures. An option's value runs to the next ' --', so no "
    "quoting is needed; write \\-- for a literal '--word' in a prompt. Embeddings are named <name> (or by "
    "their bare name). Options not given come from !set. Also accepted: --negative, --cfg-scale, --width/"
    "--height, --clip-skip, --emphasis MODE, --comma-padding-backtrack N, --seed -1 (random), and "
    "InvokeAI's -s -S -C -W -H -A -n. img2img: --init IMAGE --strength F (0..1, 0.75; InvokeAI's -I -f). "
    "A1111's Hires. fix: --hires SCALE [--hires-steps N] [--hires-denoise F] [--hires-upscaler latent|lanczos]. "
    "\"\"\" on its own line starts a multi-line prompt, closed by \"\"\". "
    "A1111's prompt language works in full: [from:to:when] editing, [a|b] alternation, AND with :weights."
)


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def find_command(name: str) -> Command:
    """The command called ``name`` (without ``!``), or a UsageError listing them with a suggestion."""
    key = name.lower()
    if key in _BY_NAME:
        return _BY_NAME[key]
    names = [f"!{c.name}" for c in COMMANDS]
    raise UsageError(
        f"unknown command !{name}{_suggest(key, _BY_NAME).replace('mean ', 'mean !')}; commands: {', '.join(names)}"
    )


def split_command(line: str) -> tuple[str, str]:
    """``"!set steps 30"`` -> ``("set", "steps 30")``."""
    body = line.strip()[1:]
    match = re.match(r"\s*(\S*)\s*", body, re.S)
    assert match is not None
    return match.group(1), body[match.end():]


def _short_usage(usage: str) -> str:
    """``!create NAME [--init TEXT] [--vectors N]`` -> ``!create NAME [options]`` (for the overview)."""
    usage = usage.split(" | ")[0]
    if len(usage) <= 32:
        return usage
    return re.sub(r"(?: \[--[^\]]*\])+", " [options]", usage)


def help_text(name: str | None) -> tuple[dict[str, Any], str]:
    """``!help`` and ``!help CMD``: the JSON result and its human text."""
    if name is None:
        rows = [[_short_usage(c.usage), c.summary] for c in COMMANDS]
        lines = ["generation: " + generation_help(), "", *render.table(rows, ["command", "does"]),
                 "", "!help CMD for details; !help generate for generation lines."]
        result = {"commands": [{"name": c.name, "usage": c.usage, "summary": c.summary} for c in COMMANDS]}
        return result, "\n".join(lines)
    if name == "generate":
        return {"command": "generate", "usage": generation_help(), "help": GENERATION_HELP}, GENERATION_HELP
    cmd = find_command(name)
    aliases = f" (also {', '.join('!' + a for a in cmd.aliases)})" if cmd.aliases else ""
    return ({"command": cmd.name, "usage": cmd.usage, "help": cmd.help},
            f"{cmd.usage}{aliases}\n{cmd.help}")
