"""Tab completion for REPL lines: ``<trigger>`` names, meta-commands, their options and option values.

Completers are given callables (``get_embeddings``, ``get_commands`` ...) rather than copies of data, so a
new embedding file is offered as soon as the daemon's event reaches the state, with nothing rebuilt.
Only path completion touches the disk, so only it runs in a thread (``ThreadedCompleter``); names come
from memory and are ranked on the loop. Every completer is wrapped so that its own bug logs a line and
offers nothing, instead of taking the prompt down.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prompt_toolkit.completion import (
    CompleteEvent,
    Completer,
    Completion,
    PathCompleter,
    ThreadedCompleter,
    merge_completers,
)
from prompt_toolkit.document import Document

from sdrepl.core.display import visible
from sdrepl.repl import commands, grid_command, inspect_command, parse, train_args

log = logging.getLogger("sdrepl.repl")

#: ``<`` then the partial name under the cursor (names may hold ``/`` for ``<folder/name>``).
TRIGGER = re.compile(r"<([^<>\s,()\[\]:]*)$")
#: `` --par`` being typed: an option name.
OPTION_NAME = re.compile(r"(?:^|\s)--([\w-]*)$")
#: the last complete `` --name `` before the cursor and the value typed after it so far.
OPTION_VALUE = re.compile(r"(?:^|\s)--([\w-]+)\s+((?:(?!\s--).)*)$")


# -- the command table: the session's own (sdrepl.repl.commands), so help and completion agree ---------


@dataclass(frozen=True)
class CommandInfo:
    """What completion needs of a meta-command: name, one-line help, its long options (``name -> metavar``)."""

    name: str
    summary: str
    options: dict[str, str] = field(default_factory=dict)


TRAIN_SUBCOMMANDS = train_args.SUBCOMMANDS
#: values offered for options whose metavar does not list them (``--to a|b|c`` does).
OPTION_VALUES: dict[str, tuple[str, ...]] = {
    "template": ("subject", "style", "subject_filewords", "style_filewords", "none"),
    "format": ("safetensors", "pt"),
}


def _long_options(options: Any) -> dict[str, str]:
    """``parse.Option`` rows -> ``{"steps": "N", "overwrite": ""}`` by each option's first long spelling."""
    out = {}
    for opt in options or ():
        long_names = [n for n in opt.names if n.startswith("--")]
        if long_names:
            out[long_names[0][2:]] = opt.metavar or ""
    return out


def generation_options() -> dict[str, str]:
    """The generation line's long options, from the session's parser."""
    return _long_options(parse.GENERATION_OPTIONS)


@functools.lru_cache(maxsize=1)
def command_table() -> dict[str, CommandInfo]:
    """Meta-commands by name (aliases too), read from the session's table so help and completion agree.

    Options come from the option tables the commands parse with (``CREATE_OPTIONS``, ``TRAIN_OPTIONS``, ...).
    """
    tables = {"create": commands.CREATE_OPTIONS, "convert": commands.CONVERT_OPTIONS,
              "preprocess": commands.PREPROCESS_OPTIONS, "train": train_args.TRAIN_OPTIONS,
              "tokens": parse.GENERATION_OPTIONS, "inspect": inspect_command.OPTIONS,
              "grid": grid_command.OPTIONS}
    table = {}
    for cmd in commands.COMMANDS:
        info = CommandInfo(cmd.name, cmd.summary or cmd.usage, _long_options(tables.get(cmd.name)))
        for name in (cmd.name, *cmd.aliases):
            table[name] = info
    return table


def option_values(option: str, metavar: str) -> tuple[str, ...]:
    """Values to offer after ``--option``: a metavar such as ``once|deterministic|random``, else the table."""
    parts = metavar.split("|") if "|" in metavar else []
    if parts and all(p.islower() for p in parts):
        return tuple(parts)
    return OPTION_VALUES.get(option, ())


def set_keys() -> tuple[str, ...]:
    return tuple(commands.SET_KEYS)


PATH_OPTIONS = {"data": True, "log-dir": True, "log": True, "template": False, "init-from": False}
PATH_COMMANDS = {"replay": False, "fetch": False, "view": False, "preprocess": True}


def rank(fragment: str, candidates: Iterable[str]) -> list[str]:
    """Candidates matching ``fragment``, best first: prefix, then word-start, substring, in-order letters.

    Case and ``-``/``_``/space are ignored when matching, so ``bh5`` finds ``bad-hands-5`` and
    ``dpmpp`` finds ``DPM++ 2M``.
    """
    def fold(text: str) -> str:
        return text.lower().replace("++", "pp")

    frag = fold(fragment)
    frag_loose = re.sub(r"[\s_\-]+", "", frag)
    scored = []
    for cand in candidates:
        low = fold(cand)
        loose = re.sub(r"[\s_\-]+", "", low)
        if not frag or low.startswith(frag):
            score, pos = 0, 0
        elif re.search(r"(?:^|[\s_\-/])" + re.escape(frag), low):
            score, pos = 1, low.find(frag)
        elif frag in low:
            score, pos = 2, low.find(frag)
        elif _subsequence(frag_loose, loose):
            score, pos = 3, loose.find(frag_loose[:1])
        else:
            continue
        scored.append((score, pos, low, cand))
    return [item[-1] for item in sorted(scored)]


def _non_utf8(name: str) -> bool:
    """A name holding a non-UTF-8 file-name byte (``\\udcXX``): listable, but no prompt can carry it."""
    try:
        name.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _subsequence(needle: str, haystack: str) -> bool:
    it = iter(haystack)
    return all(ch in it for ch in needle)


def embedding_meta(emb: dict[str, Any]) -> str:
    """``3 vectors · cat-toy/learned_embeds.bin``: what the menu says beside a trigger."""
    vectors = emb.get("vectors")
    parts = [] if vectors is None else [f"{vectors} vector{'s' if vectors != 1 else ''}"]
    path = emb.get("path")
    if path:
        p = Path(str(path))
        parts.append(f"{p.parent.name}/{p.name}" if p.parent.name else p.name)
    return " · ".join(parts) or "new"


def menu_names(embeddings: list[dict[str, Any]], *, qualified: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """``(what to insert, embedding)`` per embedding: its trigger, or its ``folder/name`` when the trigger
    is shared by another file (the menu never lists a name twice without telling them apart) or when the
    user is typing a folder (``<negatives/``)."""
    counts: dict[str, int] = {}
    for emb in embeddings:
        counts[str(emb["name"]).lower()] = counts.get(str(emb["name"]).lower(), 0) + 1
    out = []
    for emb in embeddings:
        name, full = str(emb["name"]), str(emb.get("qualified") or emb["name"])
        if qualified or counts[name.lower()] > 1:
            out.append((full, emb))
            if qualified and full != name and counts[name.lower()] == 1:
                out.append((name, emb))
        else:
            out.append((name, emb))
    return out


class EmbeddingCompleter(Completer):
    """``<bir`` -> ``<birb-style>`` anywhere in a line; the whole ``<...`` fragment is replaced."""

    def __init__(self, get_embeddings: Callable[[], list[dict[str, Any]]]) -> None:
        self.get_embeddings = get_embeddings

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterator[Completion]:
        match = TRIGGER.search(document.text_before_cursor)
        if not match:
            return
        fragment = match.group(1)
        by_name = {}
        for label, emb in menu_names(self.get_embeddings(), qualified="/" in fragment):
            if not _non_utf8(label):  # a prompt must be UTF-8 text
                by_name.setdefault(label, emb)
        closing = 1 if document.text_after_cursor.startswith(">") else 0
        for name in rank(fragment, by_name):
            yield Completion(f"<{name}>"[: len(name) + 2 - closing], start_position=-len(fragment) - 1,
                             display=visible(f"<{name}>"), display_meta=visible(embedding_meta(by_name[name])))


#: ``<lora:`` / ``<lyco:`` / ``<hypernet:`` then the partial name under the cursor.
NETWORK_TAG = re.compile(r"<(lora|lyco|hypernet):([^<>:\s]*)$", re.IGNORECASE)


def network_meta(net: dict[str, Any]) -> str:
    """``rank 4 · kohya · SD 1.x · style.safetensors``: what the menu says beside a LoRA."""
    parts = []
    if net.get("rank"):
        parts.append(f"rank {net['rank']}")
    if net.get("layout"):
        parts.append(str(net["layout"]))
    if net.get("base"):
        parts.append(str(net["base"]))
    if net.get("path"):
        parts.append(Path(str(net["path"])).name)
    return " · ".join(parts) or "new"


class NetworkCompleter(Completer):
    """``<lora:sty`` -> ``<lora:style:1>``; the name fragment is replaced, the weight offered as 1."""

    def __init__(self, get_networks: Callable[[], dict[str, list[dict[str, Any]]]]) -> None:
        self.get_networks = get_networks

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterator[Completion]:
        match = NETWORK_TAG.search(document.text_before_cursor)
        if not match:
            return
        kind, fragment = match.group(1).lower(), match.group(2)
        items = self.get_networks().get("hypernet" if kind == "hypernet" else "lora", [])
        by_name = {}
        for net in items:
            by_name.setdefault(str(net.get("name", "")), net)
        after = document.text_after_cursor
        for name in rank(fragment, [n for n in by_name if n]):
            text = name if after.startswith((":", ">")) else f"{name}:1>"
            yield Completion(text, start_position=-len(fragment), display=visible(name),
                             display_meta=visible(network_meta(by_name[name])))


class LineCompleter(Completer):
    """Everything but triggers: ``!commands``, ``--options``, and option/argument values.

    Paths go to a threaded :class:`PathCompleter` (see :meth:`get_completions_async`); the rest is
    computed from the callables on each keystroke.
    """

    def __init__(self, get_embeddings: Callable[[], list[dict[str, Any]]],
                 get_commands: Callable[[], dict[str, Any]] = command_table,
                 get_samplers: Callable[[], list[str]] | None = None,
                 get_cwd: Callable[[], str] | None = None) -> None:
        self.get_embeddings = get_embeddings
        self.get_commands = get_commands
        self.get_samplers = get_samplers or _default_samplers
        self.get_cwd = get_cwd or (lambda: ".")
        self.get_lora_names: Callable[[], list[str]] = lambda: []
        self._paths = {only_dirs: ThreadedCompleter(PathCompleter(only_directories=only_dirs, expanduser=True,
                                                                   get_paths=lambda: [self.get_cwd()]))
                       for only_dirs in (False, True)}

    # -- context: what is being typed ---------------------------------------------------------------

    def context(self, text: str) -> tuple[str, Any, str]:
        """Classify the text before the cursor: ``(kind, detail, fragment)``.

        kinds: ``trigger``, ``command``, ``option`` (detail: command or None), ``value`` (detail:
        (command, option)), ``path`` (detail: only directories), ``positional`` (detail: (command, index)),
        ``none``.
        """
        if TRIGGER.search(text):
            return "trigger", None, ""
        stripped = text.lstrip()
        command = None
        if stripped.startswith("!"):
            head = re.match(r"!(\S*)", stripped)
            if head.end() == len(stripped):
                return "command", None, head.group(1)
            command = head.group(1).lower()
        if m := OPTION_NAME.search(text):
            return "option", command, m.group(1)
        if m := OPTION_VALUE.search(text):
            option = m.group(1).lower()
            if option in PATH_OPTIONS:
                return "path", PATH_OPTIONS[option], m.group(2)
            if option == "init" and command is None:  # img2img's picture (!create's --init is text)
                return "path", False, m.group(2)
            return "value", (command, option), m.group(2)
        if command is None:
            return "none", None, ""
        rest = stripped[len(command) + 1:]
        if command in ("replay", "fetch", "view"):
            return "path", PATH_COMMANDS[command], rest.lstrip()
        words = rest.split()
        index = len(words) if rest.endswith((" ", "\t")) or not words else len(words) - 1
        fragment = "" if rest.endswith((" ", "\t")) or not words else words[-1]
        if command == "preprocess":
            return "path", True, fragment
        if command == "set" and index >= 1 and words[0].lower() == "sampler":  # a value with spaces
            return "value", ("set", "sampler"), rest.lstrip()[len(words[0]):].lstrip()
        return "positional", (command, index, words[:index]), fragment

    # -- completions -------------------------------------------------------------------------------

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterator[Completion]:
        kind, detail, fragment = self.context(document.text_before_cursor)
        if kind == "path":
            yield from self._paths[detail].completer.get_completions(Document(fragment), complete_event)
        else:
            yield from self._names(kind, detail, fragment)

    async def get_completions_async(self, document: Document,
                                    complete_event: CompleteEvent) -> AsyncGenerator[Completion, None]:
        kind, detail, fragment = self.context(document.text_before_cursor)
        if kind == "path":  # the disk may be slow: list it in a thread, never on the loop
            async for completion in self._paths[detail].get_completions_async(Document(fragment), complete_event):
                yield completion
        else:
            for completion in self._names(kind, detail, fragment):
                yield completion

    def _names(self, kind: str, detail: Any, fragment: str) -> Iterator[Completion]:
        start = -len(fragment)
        commands = self.get_commands()
        if kind == "command":
            for name in rank(fragment, commands):
                yield Completion(name, start, display=f"!{name}", display_meta=commands[name].summary)
        elif kind == "option":
            options = self._options(detail, commands)
            for opt in rank(fragment, options):
                yield Completion(opt, start, display=f"--{opt}", display_meta=options[opt])
        elif kind == "value":
            command, option = detail
            if option == "sampler":
                values = self.get_samplers()
            elif command == "grid" and option in ("x", "y", "z"):
                values = grid_command.axis_completions(fragment, [e["name"] for e in self.get_embeddings()],
                                                       self.get_lora_names(), self.get_samplers())
            else:
                values = option_values(option, self._options(command, commands).get(option, ""))
            for value in rank(fragment, values):
                yield Completion(value, start, display=visible(value))
        elif kind == "positional":
            command, index, before = detail
            for value in rank(fragment, self._positional_values(command, index, before, commands)):
                yield Completion(value, start, display=visible(value))

    @staticmethod
    def _options(command: str | None, commands: dict[str, CommandInfo]) -> dict[str, str]:
        if command is None:
            return generation_options()
        info = commands.get(command)
        return info.options if info else {}

    def _positional_values(self, command: str, index: int, before: list[str], commands) -> list[str]:
        names = [e["name"] for e in self.get_embeddings()]
        if command == "set":
            if index == 1 and before and before[0].lower() == "preview":
                from sdrepl.repl.preview.detect import MODES

                return list(MODES)
            return list(set_keys()) if index == 0 else []
        if command == "train" and index == 1 and before and before[0].lower() == "plot":
            return names  # !train plot NAME
        if index != 0:
            return []
        if command == "show":
            return names + [f"lora:{n}" for n in self.get_lora_names()]
        if command in ("convert", "inspect"):
            return names
        if command == "help":
            return list(commands)
        if command == "train":
            return list(TRAIN_SUBCOMMANDS) + names
        return []


class SafeCompleter(Completer):
    """Runs another completer; its exception becomes a log line and no completions, not a dead prompt."""

    def __init__(self, completer: Completer) -> None:
        self.completer = completer

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterator[Completion]:
        try:
            yield from self.completer.get_completions(document, complete_event)
        except Exception:
            log.exception("completion failed for %r", document.text_before_cursor)

    async def get_completions_async(self, document: Document,
                                    complete_event: CompleteEvent) -> AsyncGenerator[Completion, None]:
        try:
            async for completion in self.completer.get_completions_async(document, complete_event):
                yield completion
        except Exception:
            log.exception("completion failed for %r", document.text_before_cursor)


def make_completer(get_embeddings: Callable[[], list[dict[str, Any]]], *,
                   get_commands: Callable[[], dict[str, Any]] = command_table,
                   get_samplers: Callable[[], list[str]] | None = None,
                   get_cwd: Callable[[], str] | None = None,
                   get_networks: Callable[[], dict[str, list[dict[str, Any]]]] | None = None) -> Completer:
    """The REPL's completer: triggers and ``<lora:`` names anywhere, plus commands/options/values; reads
    state through callables."""
    return SafeCompleter(merge_completers([
        EmbeddingCompleter(get_embeddings),
        NetworkCompleter(get_networks or (lambda: {})),
        _with_loras(LineCompleter(get_embeddings, get_commands, get_samplers, get_cwd), get_networks),
    ]))


def _with_loras(completer: LineCompleter, get_networks) -> LineCompleter:
    if get_networks is not None:
        completer.get_lora_names = lambda: [str(n.get("name")) for n in get_networks().get("lora", [])]
    return completer


def _default_samplers() -> list[str]:
    from sdrepl.core.samplers import sampler_names

    return sampler_names()
