"""AUTOMATIC1111's ``parameters`` text: what a picture was made with, written into its PNG and read back.

The format (A1111 ``create_infotext`` / ``parse_generation_parameters``), which every tool of the field
reads (A1111's PNG Info tab, civitai, ComfyUI importers)::

    a portrait of <cat-toy>, oil
    Negative prompt: EasyNegative, blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: abcdef1234, Model: tiny, TI hashes: "cat-toy: 0123456789ab, EasyNegative: ba9876543210", Version: sdrepl 0.1.0

The prompt may span lines; the negative prompt starts at a line beginning ``Negative prompt:``; the last
line holds ``Key: value`` pairs separated by ``, ``, a value with a comma, colon or newline in it being a
JSON string (double quotes, backslash escapes). ``Negative prompt`` and ``Clip skip`` (when not 1) appear
only when they say something, as in A1111.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdrepl.core.errors import SdreplError
from sdrepl.core.picture_files import MAX_PICTURE_FILE_BYTES

#: A1111's pattern for one ``Key: value`` pair of the last line (a quoted value may hold commas).
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")
NEGATIVE_PREFIX = "Negative prompt:"


class PngInfoError(SdreplError):
    """A picture whose generation parameters cannot be read (not an image, unreadable, damaged)."""


def quote(value: object) -> str:
    """A1111's quoting: a value with ``,``, ``:`` or a newline becomes a JSON string, others stay bare."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text and not text.startswith('"'):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text.startswith('"') and text.endswith('"'):
        try:
            return str(json.loads(text))
        except ValueError:
            return text
    return text


def _number(value: float) -> str:
    """``7`` rather than ``7.0``, as A1111 prints CFG scale."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def build_parameters(
    *,
    prompt: str,
    negative: str = "",
    steps: int,
    sampler: str,
    cfg: float,
    seed: int,
    width: int,
    height: int,
    model_hash: str | None = None,
    model: str | None = None,
    clip_skip: int = 1,
    ti_hashes: Mapping[str, str] | None = None,
    extra: Mapping[str, object] | None = None,
) -> str:
    """The ``parameters`` text for one picture (``ti_hashes``: trigger -> 12-hex short hash)."""
    pairs: list[tuple[str, object]] = [
        ("Steps", steps),
        ("Sampler", sampler),
        ("CFG scale", _number(cfg)),
        ("Seed", seed),
        ("Size", f"{width}x{height}"),
    ]
    if model_hash:
        pairs.append(("Model hash", model_hash))
    if model:
        pairs.append(("Model", model))
    if clip_skip and clip_skip != 1:
        pairs.append(("Clip skip", clip_skip))
    if ti_hashes:
        pairs.append(("TI hashes", ", ".join(f"{name}: {digest}" for name, digest in ti_hashes.items())))
    for key, value in (extra or {}).items():
        pairs.append((key, value))
    lines = [prompt]
    if negative:
        lines.append(f"{NEGATIVE_PREFIX} {negative}")
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in pairs if value is not None))
    return "\n".join(lines)


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def parse_ti_hashes(text: str) -> dict[str, str]:
    """``"name: hash, other: hash"`` -> ``{"name": "hash", ...}`` (names may hold ``/``, ``-``, spaces)."""
    out: dict[str, str] = {}
    for part in text.split(","):
        name, sep, digest = part.rpartition(":")
        if sep and name.strip():
            out[name.strip()] = digest.strip()
    return out


def parse_parameters(text: str) -> dict[str, Any]:
    """Read a ``parameters`` text back (ours or A1111's) into a dict.

    Keys: ``prompt``, ``negative``, ``steps``, ``sampler``, ``cfg``, ``seed``, ``width``, ``height``,
    ``model_hash``, ``model``, ``clip_skip`` (1 when absent), ``ti_hashes`` (name -> hash, ``{}`` when
    absent), and ``extra`` (every other ``Key: value`` pair, values unquoted). Missing values are None.
    """
    lines = text.strip("\n").split("\n")
    pairs: dict[str, str] = {}
    if lines:
        found = _PAIR.findall(lines[-1])
        if len(found) >= 3:  # A1111's test that the last line is the parameters line
            pairs = {key.strip(): unquote(value) for key, value in found}
            lines = lines[:-1]
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        if not in_negative and line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX):].lstrip(" ")
        (negative_lines if in_negative else prompt_lines).append(line)
    width = height = None
    size = _SIZE.match(pairs.get("Size", ""))
    if size:
        width, height = int(size.group(1)), int(size.group(2))
    known = {"Steps", "Sampler", "CFG scale", "Seed", "Size", "Model hash", "Model", "Clip skip", "TI hashes"}
    return {
        "prompt": "\n".join(prompt_lines),
        "negative": "\n".join(negative_lines),
        "steps": _int(pairs.get("Steps")),
        "sampler": pairs.get("Sampler"),
        "cfg": _float(pairs.get("CFG scale")),
        "seed": _int(pairs.get("Seed")),
        "width": width,
        "height": height,
        "model_hash": pairs.get("Model hash"),
        "model": pairs.get("Model"),
        "clip_skip": _int(pairs.get("Clip skip")) or 1,
        "ti_hashes": parse_ti_hashes(pairs["TI hashes"]) if "TI hashes" in pairs else {},
        "extra": {key: value for key, value in pairs.items() if key not in known},
    }


def _exif_user_comment(image: Any) -> str | None:
    """A1111 stores the text of JPEG/WebP pictures in EXIF UserComment (``UNICODE\\0`` + UTF-16)."""
    try:
        raw = image.getexif().get_ifd(0x8769).get(0x9286)
    except Exception:
        return None
    if isinstance(raw, str):
        return raw or None
    if not isinstance(raw, bytes) or len(raw) < 8:
        return None
    prefix, body = raw[:8], raw[8:]
    if prefix == b"UNICODE\0":
        for codec in ("utf-16-be", "utf-16-le"):
            try:
                text = body.decode(codec)
            except UnicodeDecodeError:
                continue
            if text.isprintable() or "\n" in text:
                return text
        return None
    return body.decode("utf-8", errors="replace").rstrip("\0") or None


#: The largest picture ``!fetch`` reads (the limit every picture reader shares), and the longest
#: ``parameters`` text it takes from one.
MAX_PICTURE_BYTES = MAX_PICTURE_FILE_BYTES
MAX_PARAMETERS_BYTES = 1024 * 1024


def read_png_parameters(path: Path | str) -> str | None:
    """The ``parameters`` text of a picture, or None when it has none.

    The file is read through :func:`sdrepl.core.safe_open.read_regular_file` (a FIFO or device path never
    blocks, at most :data:`MAX_PICTURE_BYTES`); a PNG's text comes from its chunk list, so no pixel is
    decoded whatever size the picture declares. Raises :class:`PngInfoError` naming the file when it is
    missing or not a readable image.
    """
    import io

    from PIL import Image, UnidentifiedImageError

    from sdrepl.core.formats.png_chunks import PNG_MAGIC, PngRefused, read_png_header
    from sdrepl.core.safe_open import UnsafeFile, read_regular_file

    path = Path(path)
    try:
        data, _ = read_regular_file(path, MAX_PICTURE_BYTES)
        if data.startswith(PNG_MAGIC):
            text = read_png_header(data, "parameters", MAX_PARAMETERS_BYTES).text
        else:
            with Image.open(io.BytesIO(data)) as image:  # lazy: the header and metadata, no pixels
                text = image.info.get("parameters")
                if text is None and image.format in ("JPEG", "WEBP"):
                    text = _exif_user_comment(image)
    except FileNotFoundError as exc:
        raise PngInfoError(f"{path}: no such file; give the path of a picture made by sdrepl or A1111") from exc
    except UnsafeFile as exc:
        raise PngInfoError(f"{path}: {exc.reason}; give the path of a picture made by sdrepl or A1111") from None
    except PngRefused as exc:
        raise PngInfoError(f"{path}: not a readable image ({exc.reason}); expected a PNG with a 'parameters' text "
                           "chunk") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise PngInfoError(f"{path}: not a readable image ({exc}); expected a PNG with a 'parameters' text "
                           "chunk") from exc
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return text or None


def png_text_chunks(parameters: str) -> Any:
    """A ``PngInfo`` holding ``parameters`` as an iTXt chunk when it needs Unicode, else tEXt (as A1111)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    try:
        parameters.encode("latin-1")
    except UnicodeEncodeError:
        info.add_itxt("parameters", parameters)
    else:
        info.add_text("parameters", parameters)
    return info
