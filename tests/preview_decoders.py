"""Decoders for the escape sequences of ``repl.preview.encoders``, written from the protocols' documents.

They parse the bytes back the way a terminal would, so the tests check the documented forms, not our code.
"""

from __future__ import annotations

import base64
import re

import numpy as np

KITTY = re.compile(r"\x1b_G([^;\x1b]*);([A-Za-z0-9+/=]*)\x1b\\")
ITERM = re.compile(r"\x1b\]1337;File=([^:\x07]*):([A-Za-z0-9+/=]*)\x07")
SGR = re.compile(r"\x1b\[([\d;]*)m")


def kitty(text: str) -> tuple[list[dict[str, str]], bytes]:
    """Every escape's keys and the payload they carry together; the text must be escapes only."""
    escapes = KITTY.findall(text)
    assert KITTY.sub("", text) == "", "something other than kitty escapes in the output"
    keys = [dict(kv.split("=", 1) for kv in head.split(",")) for head, _ in escapes]
    for _, chunk in escapes:
        assert len(chunk) <= 4096
    return keys, base64.b64decode("".join(chunk for _, chunk in escapes), validate=True)


def iterm(text: str) -> tuple[dict[str, str], bytes]:
    match = ITERM.fullmatch(text)
    assert match is not None, f"not one OSC 1337 File sequence: {text[:80]!r}"
    args = dict(kv.split("=", 1) for kv in match.group(1).split(";"))
    return args, base64.b64decode(match.group(2), validate=True)


def sixel(text: str) -> tuple[np.ndarray, dict[int, tuple[int, int, int]], tuple[int, int]]:
    """(colour index per pixel, -1 where none was drawn; palette in percent; raster width, height)."""
    assert text.startswith("\x1bP") and text.endswith("\x1b\\")
    body = text[2:-2]
    q = body.index("q")
    assert re.fullmatch(r"[\d;]*", body[:q])
    body = body[q + 1:]
    raster = re.match(r'"(\d+);(\d+);(\d+);(\d+)', body)
    assert raster is not None, "no raster attributes"
    width, height = int(raster.group(3)), int(raster.group(4))
    body = body[raster.end():]
    pixels = np.full((height + 6, width), -1, dtype=np.int32)
    palette: dict[int, tuple[int, int, int]] = {}
    colour, x, band, pos = 0, 0, 0, 0
    while pos < len(body):
        ch = body[pos]
        if ch == "#":
            m = re.match(r"#(\d+)(?:;(\d+);(\d+);(\d+);(\d+))?", body[pos:])
            assert m is not None
            colour = int(m.group(1))
            if m.group(2) is not None:
                assert m.group(2) == "2", "only RGB palette entries are expected"
                palette[colour] = (int(m.group(3)), int(m.group(4)), int(m.group(5)))
            pos += m.end()
            continue
        if ch == "$":
            x = 0
        elif ch == "-":
            x, band = 0, band + 1
        elif ch == "!":
            m = re.match(r"!(\d+)(.)", body[pos:])
            assert m is not None
            for _ in range(int(m.group(1))):
                _draw(pixels, band, x, ord(m.group(2)) - 63, colour)
                x += 1
            pos += m.end()
            continue
        else:
            assert 63 <= ord(ch) <= 126, f"not a sixel character: {ch!r}"
            _draw(pixels, band, x, ord(ch) - 63, colour)
            x += 1
        pos += 1
    return pixels[:height], palette, (width, height)


def _draw(pixels: np.ndarray, band: int, x: int, bits: int, colour: int) -> None:
    for row in range(6):
        if bits & (1 << row):
            pixels[band * 6 + row, x] = colour


def blocks(text: str) -> list[list[tuple[str, object, object]]]:
    """Per line, per cell: (character, foreground, background) as SGR parameters left them.

    A colour is ``("rgb", r, g, b)``, ``("256", n)`` or None (the terminal's default).
    """
    out = []
    for line in text.rstrip("\n").split("\n"):
        fg = bg = None
        cells = []
        pos = 0
        while pos < len(line):
            m = SGR.match(line, pos)
            if m:
                params = [int(p) for p in m.group(1).split(";") if p != ""] or [0]
                i = 0
                while i < len(params):
                    p = params[i]
                    if p == 0:
                        fg = bg = None
                    elif p in (38, 48):
                        if params[i + 1] == 2:
                            value = ("rgb", *params[i + 2:i + 5])
                            i += 4
                        else:
                            value = ("256", params[i + 2])
                            i += 2
                        fg, bg = (value, bg) if p == 38 else (fg, value)
                    elif p == 49:
                        bg = None
                    elif p == 39:
                        fg = None
                    i += 1
                pos = m.end()
                continue
            assert line[pos] != "\x1b", f"an escape that is not SGR: {line[pos:pos + 10]!r}"
            cells.append((line[pos], fg, bg))
            pos += 1
        assert (fg, bg) == (None, None), "a line must end with its colours reset"
        out.append(cells)
    return out
