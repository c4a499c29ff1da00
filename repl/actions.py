"""The executors of generation lines and meta-commands: one request to the daemon, one rendering.

Each ``run_*`` takes the session, the parameters its parser produced, and the callback that learns a
daemon request id (so Ctrl-C can cancel it); it returns an :class:`Outcome` or raises an error
(``RemoteError`` from the daemon, a core ``SdreplError`` from local checks), which the session turns into
the line's ``error``. Paths typed by the user are anchored to the session's folder here, because the
daemon's working folder is not the user's.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdrepl.core.errors import SdreplError, UsageError
from sdrepl.core.limits import float_range, int_range
from sdrepl.core.prompt import MAX_COMMA_WINDOW
from sdrepl.core.status_text import format_status
from sdrepl.repl import render
from sdrepl.repl.parse import (
    GenerationLine,
    escape,
    to_emphasis,
    to_float,
    to_int,
    to_sampler,
    to_seed,
    to_size,
    unquote,
)
from sdrepl.repl.train_args import resolve_paths

if TYPE_CHECKING:
    from sdrepl.repl.session import Session

log = logging.getLogger("sdrepl.repl")
Started = Callable[[int], None] | None
MAX_REPLAY_DEPTH = 8


@dataclass(frozen=True)
class Outcome:
    """What an executor produced: the JSON result, its human text, and what the UI should do next.

    ``error`` marks a line that produced a result and still failed (``!replay`` with failing lines).
    ``pictures`` (``repl.preview.picture.Shown``) are for the interactive REPL to draw, never JSON.
    """

    result: dict[str, Any]
    text: str
    edit_buffer: str | None = None
    quit: bool = False
    error: dict[str, str] | None = None
    pictures: tuple[Any, ...] = ()


# -- generation ---------------------------------------------------------------------------------------

def generation_params(line: GenerationLine, defaults: Any) -> dict[str, Any]:
    """The ``generate`` parameters: what the line says, the session defaults for the rest."""
    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    params: dict[str, Any] = {
        "prompt": line.prompt,
        "negative": pick(line.negative, defaults.negative),
        "steps": pick(line.steps, defaults.steps),
        "cfg": float(pick(line.cfg, defaults.cfg)),
        "seed": line.seed if line.seed_given else defaults.seed,
        "sampler": pick(line.sampler, defaults.sampler),
        "n": pick(line.n, defaults.n),
        "clip_skip": pick(line.clip_skip, defaults.clip_skip),
        **prompt_settings(defaults, line),
    }
    width, height = defaults.size if defaults.size else (None, None)
    width, height = pick(line.width, width), pick(line.height, height)
    if (width is None) != (height is None):
        given = "--width/-W" if line.width is not None else "--height/-H"
        raise UsageError(f"{given} alone needs a default size to complete it: give both, e.g. --size 768x512, "
                         "or set one first with !set size 512x512")
    if width is not None:
        params["width"], params["height"] = width, height
    for key in ("init", "strength", "hires", "hires_steps", "hires_denoise", "hires_upscaler"):
        if getattr(line, key, None) is not None:  # img2img and hires fix: only what the line says
            params[key] = getattr(line, key)
    return params


def prompt_settings(defaults: Any, line: Any = None) -> dict[str, Any]:
    """The emphasis and comma backtrack a request carries: the line's ``--emphasis`` /
    ``--comma-padding-backtrack``, else ``!set``'s; neither: none (the daemon's own apply)."""
    out = {}
    for key in ("emphasis", "comma_padding_backtrack"):
        value = getattr(line, key, None)
        value = getattr(defaults, key, None) if value is None else value
        if value is not None:
            out[key] = value
    return out


async def picture_params(session: Session, params: dict[str, Any]) -> Path | None:
    """What a request that makes pictures (``generate``, ``grid``) carries of this client: its own
    ``--outputs`` (a local daemon writes there), and the img2img picture, anchored to the session's folder
    as ``!fetch``'s path and sent to a remote daemon (which cannot read our files). Returns the resolved
    init picture, or None."""
    remote = getattr(session.client, "remote", False)
    settings = getattr(session.client, "settings", None)  # a repl.connection.Connection knows --outputs
    if settings is not None and not remote:
        params["outputs"] = str(Path(settings.outputs).expanduser().absolute())  # this client's folder
    if "init" not in params:
        return None
    init = session.resolve(params["init"])
    if remote:
        from sdrepl.repl.uploads import upload_init

        params["init"] = await upload_init(session.client, init)
    else:
        params["init"] = str(init)
    return init


async def cancellable(session: Session, kind: str, params: dict[str, Any], started: Started) -> dict[str, Any]:
    """Send request ``kind`` and wait for its result; when the line is interrupted (Ctrl-C cancelled our
    task) the daemon's work is cancelled too."""
    request_id, future = session.client.start(kind, **params)
    if started is not None:
        started(request_id)
    try:
        return await future
    except asyncio.CancelledError:
        task = asyncio.ensure_future(session.client.cancel(request_id))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        raise


async def run_generate(session: Session, line: GenerationLine, started: Started) -> Outcome:
    params = generation_params(line, session.defaults)
    init = await picture_params(session, params)
    result = await cancellable(session, "generate", params, started)
    outputs = getattr(session.client, "local_outputs", None)
    if outputs is not None:  # a remote daemon: its pictures come back as bytes
        from sdrepl.repl.remote_pictures import bring_home

        result = await bring_home(session.client, result, outputs)
    if init is not None:
        result["init"] = str(init)  # the picture as this session resolved it (the daemon may have a copy)
    return Outcome(result, render.generation(result, session.cwd))


# -- library ------------------------------------------------------------------------------------------

async def run_help(session: Session, name: str | None, started: Started) -> Outcome:
    from sdrepl.repl.commands import help_text

    result, text = help_text(name)
    return Outcome(result, text)


async def run_embeddings(session: Session, _: None, started: Started) -> Outcome:
    reply = await session.client.request("embeddings")
    result = {"embeddings": reply.get("embeddings", []), "skipped": reply.get("skipped", []),
              "warnings": reply.get("warnings", [])}
    return Outcome(result, render.embeddings(result))


async def run_show(session: Session, name: str, started: Started) -> Outcome:
    reply = await session.client.request("show", name=name)
    return Outcome({"embedding": reply}, render.show(reply))


async def run_tokens(session: Session, line: GenerationLine, started: Started) -> Outcome:
    negative = session.defaults.negative if line.negative is None else line.negative
    steps = session.defaults.steps if line.steps is None else line.steps
    reply = await session.client.request("tokens", prompt=line.prompt, negative=negative, steps=steps,
                                         **prompt_settings(session.defaults, line))
    return Outcome({"tokens": reply}, render.tokens(reply))


async def run_reload(session: Session, _: None, started: Started) -> Outcome:
    reply = await session.client.request("reload")
    return Outcome(reply, render.change(reply))


async def run_create(session: Session, params: dict[str, Any], started: Started) -> Outcome:
    reply = await session.client.request("create", **params)
    emb = reply.get("embedding") or {}
    text = (f"created <{emb.get('name', params['name'])}>: {emb.get('vectors', params.get('vectors', 1))} "
            f"vector(s) from init {params.get('init', '*')!r} -> {reply.get('path', '?')}")
    return Outcome(reply, text)


async def run_convert(session: Session, params: dict[str, Any], started: Started) -> Outcome:
    reply = await session.client.request("convert", **params)
    return Outcome(reply, f"wrote {reply.get('path', '?')}")


async def run_push(session: Session, params: dict[str, Any], started: Started) -> Outcome:
    from sdrepl.repl.uploads import push_file

    reply = await push_file(session.client, session.resolve(params["path"]), params["kind"], params["overwrite"])
    verb = "replaced" if reply.get("overwritten") else "wrote"
    return Outcome(reply, f"{verb} {reply.get('path', '?')} on the daemon ({reply.get('kind')} "
                          f"{reply.get('name')!r}; the watcher loads it)")


# -- training -----------------------------------------------------------------------------------------

async def run_train(session: Session, parsed: dict[str, Any], started: Started) -> Outcome:
    if parsed["sub"] is not None:
        reply = await session.client.request(f"train_{parsed['sub']}")
        notes = (render.loss_trend(reply.get("job")) + render.job_notes(reply.get("job"))
                 if parsed["sub"] == "status" else "")
        return Outcome(reply, render.job(reply.get("job")) + notes)
    params = resolve_paths(parsed["params"], session.cwd)
    if getattr(session.client, "remote", False) and "data" in params:  # the daemon cannot read our folders
        from sdrepl.repl.uploads import upload_folder

        params["data"] = await upload_folder(session.client, Path(params["data"]))
    if not params.get("wait"):
        reply = await session.client.request("train", **params)
        return Outcome(reply, render.job(reply.get("job")) + "  (!train status to follow it)"
                       + render.job_notes(reply.get("job")))
    try:
        reply = await session.client.request("train", **params)
    except asyncio.CancelledError:
        # Ctrl-C stops the waiting, not the job: say so (the interactive REPL prints this, not "cancelled").
        session.cancel_note = (f"stopped waiting; training {params.get('name', '?')} goes on in the daemon "
                               "(!train status follows it, !train stop stops it)")
        raise
    return Outcome(reply, render.trained(reply) + render.job_notes(reply.get("job")))


async def run_preprocess(session: Session, params: dict[str, Any], started: Started) -> Outcome:
    src, dst = session.resolve(params["src"]), session.resolve(params["dst"])
    if not src.is_dir():
        raise UsageError(f"!preprocess: source folder {params['src']!r} does not exist ({src})")
    reply = await session.client.request("preprocess", **{**params, "src": str(src), "dst": str(dst)})
    return Outcome(reply, render.preprocess(reply))


# -- session-local commands ---------------------------------------------------------------------------

def defaults_dict(defaults: Any) -> dict[str, Any]:
    values = {f.name: getattr(defaults, f.name) for f in fields(defaults)}
    if values.get("size"):
        values["size"] = f"{values['size'][0]}x{values['size'][1]}"
    return values


_SETTERS: dict[str, Callable[[str], Any]] = {
    "steps": to_int(*int_range("steps")), "cfg": to_float(*float_range("cfg")), "seed": to_seed,
    "sampler": to_sampler, "n": to_int(*int_range("n")), "clip_skip": to_int(*int_range("clip_skip")),
    "negative": unquote,
    "size": lambda v: None if v.strip().lower() in ("native", "auto", "none") else to_size(v),
    "emphasis": lambda v: to_emphasis(unquote(v)),
    "comma_padding_backtrack": to_int(0, MAX_COMMA_WINDOW),
    "preview": lambda v: to_preview(unquote(v)),
}


def to_preview(value: str) -> str:
    """``!set preview``: off, auto, or a protocol (repl/preview/detect.py)."""
    from sdrepl.repl.preview.detect import MODES

    mode = value.strip().lower()
    if mode not in MODES:
        raise ValueError(f"expected one of {', '.join(MODES)} (auto: what the terminal supports)")
    return mode



async def run_set(session: Session, parsed: tuple[str | None, str | None], started: Started) -> Outcome:
    key, value = parsed
    if key is None:
        values = defaults_dict(session.defaults)
        return Outcome({"defaults": values}, render.defaults(values))
    if value is None:
        shown = {key: defaults_dict(session.defaults)[key]}
        return Outcome({"defaults": shown}, render.defaults(shown))
    if value.strip().lower() == "default":
        new = getattr(type(session.defaults)(), key)
    else:
        try:
            new = _SETTERS[key](value)
        except ValueError as exc:
            raise UsageError(f"!set {key} {value!r}: {exc}") from None
    if key == "negative" and new:
        await check_negative(session, value, new)
    setattr(session.defaults, key, new)
    values = defaults_dict(session.defaults)
    return Outcome({"defaults": values, "set": {key: values[key]}},
                   f"{key} = {render.format_value(key, values[key])}")


async def check_negative(session: Session, typed: str, negative: str) -> None:
    """A default negative is checked when set (an unknown ``<name>`` would otherwise fail every later line)."""
    try:
        await session.client.request("tokens", prompt="", negative=negative)
    except SdreplError as exc:
        if getattr(exc, "type_name", "") in ("DaemonUnavailable",) or isinstance(exc, ConnectionError):
            raise
        message = getattr(exc, "message", None) or str(exc)
        raise UsageError(f"!set negative {typed}: {message}; the default negative is unchanged") from None


async def run_history(session: Session, text: str, started: Started) -> Outcome:
    entries = [(n, line) for n, line in enumerate(session.history_lines(), start=1)
               if text.lower() in line.lower()]
    return Outcome({"history": [{"n": n, "line": line} for n, line in entries]}, render.history(entries))


def recall(session: Session, number: int) -> Outcome:
    """``!NN``: history entry NN, for the edit buffer (interactive) or printed (scripted); it is not run."""
    lines = session.history_lines()
    if not 1 <= number <= len(lines):
        raise UsageError(f"!{number}: no history entry {number} (there are {len(lines)}); !history lists them")
    line = lines[number - 1]
    return Outcome({"command": line, "history": number}, line, edit_buffer=line)


async def run_status(session: Session, _: None, started: Started) -> Outcome:
    reply = await session.client.request("status")
    return Outcome({"status": reply}, format_status(reply))


async def run_model(session: Session, spec: str | None, started: Started) -> Outcome:
    """``!model``: show the daemon's model, or switch it (a path is anchored to the session's folder)."""
    if spec is None:
        model = (await session.client.request("status")).get("model") or {}
        return Outcome({"model": model}, f"model {render.model(model)}")
    path = session.resolve(spec)
    target = str(path) if ("/" in spec or spec.startswith(("~", ".")) or path.exists()) else spec
    reply = await session.client.request("model", model=target)
    settings = getattr(session.client, "settings", None)
    if settings is not None:  # a later auto-start brings this model back, and no "serves another" notice
        settings.model = target
    emb = reply.get("embeddings") or {}
    return Outcome(reply, f"model switched: {render.model(reply.get('model') or {})}; embeddings "
                          f"{emb.get('loaded', '?')} loaded, {emb.get('skipped', '?')} skipped")


async def run_quit(session: Session, _: None, started: Started) -> Outcome:
    return Outcome({}, "", quit=True)


# -- fetch and replay ---------------------------------------------------------------------------------

#: A1111 fields that describe a picture without changing how it is made again here (informational).
INFORMATIONAL_FIELDS = frozenset({"Model hash", "Model", "TI hashes", "Version", "Lora hashes", "Emphasis",
                                  "VAE hash", "VAE", "Hashes", "Schedule type", "Prediction type",
                                  "Comma padding backtrack"})
#: img2img and hires fix fields ``fetch_line`` turns into ``--strength`` / ``--hires ...`` options.
IMG2IMG_FIELDS = frozenset({"Denoising strength", "Hires upscale", "Hires steps", "Hires upscaler"})
#: The name an img2img picture's missing init picture has in ``unsupported`` (A1111 does not store it either).
INIT_NOT_STORED = "Init image"


def img2img_options(p: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The ``--strength`` or ``--hires ...`` options of a parameters text, and the fields among them that
    cannot be honoured (an A1111 upscaler sdrepl lacks, an unreadable value; the init picture itself)."""
    extra = p.get("extra") or {}
    options: list[str] = []
    left_out: list[str] = []

    def number(key: str, convert: Callable[[str], Any]) -> Any:
        try:
            return convert(str(extra[key]).strip())
        except (ValueError, KeyError):
            left_out.append(key)
            return None

    if "Hires upscale" in extra:
        scale = number("Hires upscale", to_float(*float_range("hires_scale")))
        if scale is None:  # without the scale nothing of hires fix can be honoured
            return [], [key for key in IMG2IMG_FIELDS if key in extra]
        options.append(f"--hires {scale:g}")
        if "Hires steps" in extra:
            steps = number("Hires steps", to_int(*int_range("hires_steps")))
            if steps:
                options.append(f"--hires-steps {steps}")
        if "Denoising strength" in extra:
            denoise = number("Denoising strength", to_float(*float_range("hires_denoise")))
            if denoise is not None:
                options.append(f"--hires-denoise {denoise:g}")
        if "Hires upscaler" in extra:
            upscaler = str(extra["Hires upscaler"]).strip().lower()
            if upscaler in ("latent", "lanczos"):
                options.append(f"--hires-upscaler {upscaler}")
            else:  # ESRGAN, "Latent (bicubic)", ...: A1111 upscalers sdrepl does not have
                shown = re.sub(r"[^\w .+()-]", "?", str(extra["Hires upscaler"]))[:30]  # a stranger's text
                left_out.append(f"Hires upscaler {shown}")
    elif any(key.startswith("Hires ") for key in extra):  # hires fix to a fixed size (Hires resize-1/-2)
        left_out += [key for key in IMG2IMG_FIELDS if key in extra]
    elif "Denoising strength" in extra:  # an img2img picture
        strength = number("Denoising strength", to_float(*float_range("strength")))
        if strength is not None:
            options.append(f"--strength {strength:g}")
            left_out.append(INIT_NOT_STORED)
    return options, left_out


def schedule_sampler(p: dict[str, Any]) -> str | None:
    """The sampler with A1111 1.9's separate ``Schedule type`` folded in (``DPM++ 2M`` + ``Karras``)."""
    sampler = p.get("sampler")
    schedule = str((p.get("extra") or {}).get("Schedule type") or "")
    if sampler and schedule and schedule.lower() not in ("automatic", "normal", "uniform"):
        try:
            return to_sampler(f"{sampler} {schedule}")
        except SdreplError:
            return sampler
    return sampler


def unsupported_fields(p: dict[str, Any]) -> list[str]:
    """The fields of a parameters text sdrepl cannot honour (Hires, Denoising, ADetailer...), by name.

    ``!fetch`` and a pasted parameters block name them in a notice: a setting is never dropped silently.
    """
    extra = p.get("extra") or {}
    names = [key for key in extra if key not in INFORMATIONAL_FIELDS and key not in IMG2IMG_FIELDS]
    names += img2img_options(p)[1]
    schedule = str(extra.get("Schedule type") or "")
    if schedule and schedule.lower() not in ("automatic", "normal", "uniform") and \
            schedule_sampler(p) == p.get("sampler"):
        names.append("Schedule type")
    return names


def unsupported_notice(names: list[str]) -> str:
    """One line naming them (keys match ``core.pnginfo``'s ``\\w[\\w -/]+``: no escapes to fear; capped)."""
    shown = ", ".join(n[:40] for n in names[:20])
    note = f"note: not supported by sdrepl, left out: {shown}"
    if INIT_NOT_STORED in names:
        note += ("; an img2img picture's metadata does not hold its init picture (A1111 does not store it "
                 "either): add --init IMAGE to the line")
    return note


def fetch_line(p: dict[str, Any]) -> str:
    """The generation line that remakes a picture, from ``core.pnginfo.parse_parameters`` output.

    A prompt with newlines comes back as a ``\"\"\"`` block, so it runs as it was written.
    """
    options: list[str] = []
    if p.get("negative"):
        options.append(f"--neg {escape(p['negative'])}")
    for key, value in (("steps", p.get("steps")), ("cfg", p.get("cfg")), ("seed", p.get("seed"))):
        if value is not None:
            options.append(f"--{key} {value:g}" if isinstance(value, float) else f"--{key} {value}")
    if p.get("width") and p.get("height"):
        options.append(f"--size {p['width']}x{p['height']}")
    sampler = schedule_sampler(p)
    if sampler:
        try:
            options.append(f"--sampler {to_sampler(sampler)}")
        except SdreplError:
            options.append(f"--sampler {sampler}")  # kept: running the line will say what is wrong
    if p.get("clip_skip") not in (None, 1):
        options.append(f"--clip-skip {p['clip_skip']}")
    extra = p.get("extra") or {}
    try:  # A1111 writes Emphasis when it is not Original; sdrepl also a comma window that is not 20
        if extra.get("Emphasis"):
            options.append(f"--emphasis {to_emphasis(str(extra['Emphasis']))}")
        if extra.get("Comma padding backtrack") not in (None, ""):
            options.append(f"--comma-padding-backtrack {int(str(extra['Comma padding backtrack']))}")
    except ValueError:
        pass  # an unreadable value: the setting is left to the session, as an unknown field would be
    options += img2img_options(p)[0]
    prompt = escape(p.get("prompt") or "")
    if "\n" in prompt or "\n" in (p.get("negative") or ""):
        return '"""\n' + prompt + "\n" + " ".join(options) + '\n"""'
    return " ".join([prompt, *options]).strip()


async def run_fetch(session: Session, path: str, started: Started) -> Outcome:
    from sdrepl.core.pnginfo import PngInfoError, parse_parameters, read_png_parameters

    file = session.resolve(path)
    text = read_png_parameters(file)
    if not text:
        raise PngInfoError(f"{file}: no generation parameters in this picture (no A1111 'parameters' text); "
                           "only pictures made by sdrepl or AUTOMATIC1111 can be fetched")
    parsed = parse_parameters(text)
    line = fetch_line(parsed)
    unsupported = unsupported_fields(parsed)
    from sdrepl.repl.grid_command import fetched_grid

    line, unsupported = fetched_grid(parsed, line, unsupported)  # a grid picture: its !grid line
    shown = "\n".join([line, unsupported_notice(unsupported)]) if unsupported else line
    return Outcome({"command": line, "unsupported": unsupported}, shown, edit_buffer=line)


async def run_replay(session: Session, path: str, started: Started) -> Outcome:
    from sdrepl.repl.lines import read_lines

    file = session.resolve(path)
    if not file.is_file():
        raise UsageError(f"!replay: no such file {path!r} ({file}); give a text file of REPL lines")
    if session.replay_depth >= MAX_REPLAY_DEPTH:
        raise UsageError(f"!replay {path}: replays nested {MAX_REPLAY_DEPTH} deep; does the file replay itself?")
    entries: list[dict[str, Any]] = []
    texts: list[str] = []
    session.replay_depth += 1
    try:
        with open(file, encoding="utf-8") as handle:
            for logical in read_lines(handle):
                result = await session.execute_logical(logical, on_request_started=started)
                entry = {"line": logical.number, "input": logical.source, "ok": result.ok}
                entry.update({"error": result.error} if not result.ok else result.result)
                entries.append(entry)
                texts.append(f"{file.name}:{logical.number}> {logical.source}")
                texts.append(result.text if result.ok else f"error: {result.error['type']}: {result.error['message']}")
                if session.on_replay_result is not None:
                    session.on_replay_result(logical.number, logical.source, result)
                if result.quit:
                    break
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"!replay {path}: cannot read the file ({exc})") from None
    finally:
        session.replay_depth -= 1
    failed = [e for e in entries if not e["ok"]]
    summary = f"replayed {len(entries)} line(s) from {file.name}: {len(entries) - len(failed)} ok, {len(failed)} failed"
    text = summary if session.on_replay_result is not None else "\n".join([*filter(None, texts), summary])
    error = None
    if failed:
        first = failed[0]
        error = {"type": first["error"]["type"],
                 "message": f"{len(failed)} of {len(entries)} line(s) of {file} failed; first, line "
                            f"{first['line']}: {first['error']['message']}"}
    return Outcome({"file": str(file), "lines": entries, "failed": len(failed)}, text, error=error)


def resolve(cwd: Path, text: str) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else cwd / path
