"""Which picture protocol this terminal speaks: from the environment, a tmux option, and one DA1 query.

:func:`detect` is a pure function of the environment (and two facts learnt once at start-up), so its
table is tested row by row. The rules, most specific first:

- not a terminal, ``TERM=dumb`` or unset: no pictures;
- kitty (``KITTY_WINDOW_ID``, ``TERM=xterm-kitty``), Ghostty (``TERM_PROGRAM=ghostty``, ``TERM=xterm-ghostty``),
  Konsole (``KONSOLE_VERSION``): the kitty graphics protocol;
- iTerm2 (``TERM_PROGRAM=iTerm.app``, ``LC_TERMINAL=iTerm2``, which ssh forwards), WezTerm (``WEZTERM_*``,
  ``TERM_PROGRAM=WezTerm``), mintty (``TERM_PROGRAM=mintty``): iTerm2 inline images;
- foot, mlterm, contour (by ``TERM``), or a terminal whose DA1 answer lists attribute 4: sixel;
- everything else (VTE terminals, xterm without sixel, the Linux console...): unicode half-blocks.

Inside tmux (``TMUX``) the variables describe the terminal the tmux server was started from, and an
escape reaches the outer terminal only through ``ESC Ptmux; ... ESC \\`` with tmux's ``allow-passthrough``
on: kitty/iTerm2 are used then only, wrapped; otherwise sixel when tmux itself answers DA1 with sixel
(tmux 3.4 built with it draws sixel itself), else half-blocks. GNU screen (``STY``): half-blocks (its
passthrough is cut at 768 bytes). When unsure, half-blocks: they work everywhere colour does.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass

PROTOCOLS = ("kitty", "iterm", "sixel", "blocks")
#: ``!set preview`` values.
MODES = ("off", "auto", *PROTOCOLS)
#: How long the DA1 answer may take (a local terminal answers in a millisecond; ssh adds a round trip).
DA1_TIMEOUT_S = 0.25

_SIXEL_TERMS = re.compile(r"^(foot|mlterm|contour|yaft)")


@dataclass(frozen=True)
class Terminal:
    """What was detected: the protocol (None: no pictures), tmux wrapping, colour depth, and why."""

    protocol: str | None
    truecolor: bool
    tmux: bool = False
    reason: str = ""


def truecolor(env: Mapping[str, str]) -> bool:
    """24-bit colour: ``COLORTERM`` says so (``truecolor``/``24bit``), as every modern terminal sets it."""
    return env.get("COLORTERM", "").lower() in ("truecolor", "24bit")


def _outer_protocol(env: Mapping[str, str]) -> tuple[str | None, str]:
    """kitty or iterm from the variables that name the terminal emulator, with the variable that said so."""
    term = env.get("TERM", "")
    program = env.get("TERM_PROGRAM", "")
    if env.get("KITTY_WINDOW_ID") or term == "xterm-kitty":
        return "kitty", "kitty (KITTY_WINDOW_ID/TERM)"
    if program.lower() == "ghostty" or term == "xterm-ghostty":
        return "kitty", "Ghostty"
    if program == "iTerm.app" or env.get("LC_TERMINAL") == "iTerm2":
        return "iterm", "iTerm2 (TERM_PROGRAM/LC_TERMINAL)"
    if program == "WezTerm" or any(k.startswith("WEZTERM_") for k in env):
        return "iterm", "WezTerm"
    if program == "mintty":
        return "iterm", "mintty"
    if env.get("KONSOLE_VERSION"):
        return "kitty", "Konsole (KONSOLE_VERSION)"
    return None, ""


def detect(env: Mapping[str, str], *, is_tty: bool = True, sixel: bool | None = None,
           tmux_passthrough: bool | None = None) -> Terminal:
    """The protocol for ``env`` (see the module docstring); ``sixel`` is the DA1 answer (None: not asked),
    ``tmux_passthrough`` tmux's ``allow-passthrough`` (None: not known, treated as off)."""
    colour = truecolor(env)
    term = env.get("TERM", "")
    if not is_tty:
        return Terminal(None, colour, reason="not a terminal")
    if not term or term == "dumb":
        return Terminal(None, colour, reason=f"TERM={term or '(unset)'}")
    outer, why = _outer_protocol(env)
    if env.get("TMUX"):
        if outer is not None and tmux_passthrough:
            return Terminal(outer, colour, tmux=True, reason=f"{why} through tmux passthrough")
        if sixel:
            return Terminal("sixel", colour, reason="tmux answers DA1 with sixel")
        hint = f"{why} in tmux without allow-passthrough" if outer else "tmux"
        return Terminal("blocks", colour, reason=hint)
    if env.get("STY") or term.startswith("screen"):
        return Terminal("blocks", colour, reason="GNU screen")
    if outer is not None:
        return Terminal(outer, colour, reason=why)
    if _SIXEL_TERMS.match(term):
        return Terminal("sixel", colour, reason=f"TERM={term}")
    if sixel:
        return Terminal("sixel", colour, reason="the terminal answers DA1 with sixel")
    if term == "linux":
        return Terminal("blocks", False, reason="the Linux console")
    return Terminal("blocks", colour, reason="no graphics protocol detected")


def tmux_allows_passthrough(timeout: float = 1.0) -> bool | None:
    """tmux's ``allow-passthrough`` (3.3+: ``on``/``all``) for the current pane; None when it cannot tell."""
    try:
        done = subprocess.run(["tmux", "show-options", "-pqv", "allow-passthrough"], capture_output=True,
                              text=True, timeout=timeout, check=False)
        value = done.stdout.strip()
        if not value:
            done = subprocess.run(["tmux", "show-options", "-gqv", "allow-passthrough"], capture_output=True,
                                  text=True, timeout=timeout, check=False)
            value = done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return value in ("on", "all") if value else None


DA1 = "\x1b[c"
_DA1_REPLY = re.compile(rb"\x1b\[\?([\d;]*)c")


def parse_da1(reply: bytes) -> bool | None:
    """Whether a DA1 reply (``ESC [?62;4;22c``) lists attribute 4 (sixel); None if it holds no reply."""
    match = _DA1_REPLY.search(reply)
    if match is None:
        return None
    return "4" in match.group(1).decode("ascii").split(";")


def query_sixel(fd_in: int, fd_out: int, timeout: float = DA1_TIMEOUT_S) -> bool | None:
    """Ask the terminal for its primary device attributes (DA1) and whether they include sixel.

    Called once at start-up, before prompt_toolkit owns the terminal and before anything can have been
    typed: echo and line mode are off while waiting (at most ``timeout`` seconds), and reading stops at
    the reply's final ``c``, so the answer is never echoed nor left for the prompt. Not asked when keys
    typed ahead are already waiting (they come before the answer and would be lost). Every terminal
    answers DA1 (it is how tools probe for sixel); None: no answer in time, or not asked.
    """
    import termios

    try:
        saved = termios.tcgetattr(fd_in)
    except termios.error:
        return None
    quiet = list(saved)
    quiet[3] &= ~(termios.ECHO | termios.ICANON)
    quiet[6] = list(saved[6])
    quiet[6][termios.VMIN], quiet[6][termios.VTIME] = 0, 0
    reply = b""
    try:
        if select.select([fd_in], [], [], 0)[0]:
            return None  # keys typed ahead are waiting: reading past them to the answer would lose them
        termios.tcsetattr(fd_in, termios.TCSANOW, quiet)
        os.write(fd_out, DA1.encode("ascii"))
        deadline = time.monotonic() + timeout
        while not reply.endswith(b"c") or _DA1_REPLY.search(reply) is None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd_in], [], [], left)[0]:
                break
            chunk = os.read(fd_in, 1)
            if not chunk:
                break
            reply += chunk
            if len(reply) > 256:
                break
    except OSError:
        return None
    finally:
        try:
            termios.tcsetattr(fd_in, termios.TCSANOW, saved)
        except termios.error:
            pass
    return parse_da1(reply)


def probe(env: Mapping[str, str] | None = None, *, stdin: int = 0, stdout: int = 1) -> Terminal:
    """:func:`detect` for this process's terminal, asking tmux and (when it can decide) the terminal itself.

    The DA1 query is skipped where the answer cannot change the outcome (kitty/iTerm2 found), where the
    user turned terminal queries off for prompt_toolkit (``PROMPT_TOOLKIT_NO_CPR=1``) or for sdrepl
    (``SDREPL_NO_TERMINAL_QUERY=1``), and when stdin/stdout are not one terminal.
    """
    env = os.environ if env is None else env
    try:
        is_tty = os.isatty(stdin) and os.isatty(stdout)
    except (OSError, ValueError):
        is_tty = False
    first = detect(env, is_tty=is_tty)
    if first.protocol is None:
        return first
    outer, _ = _outer_protocol(env)
    passthrough = tmux_allows_passthrough() if env.get("TMUX") and outer else None
    if passthrough and outer:
        return detect(env, is_tty=is_tty, tmux_passthrough=True)
    decided = first.protocol in ("kitty", "iterm", "sixel") and not env.get("TMUX")
    quiet = env.get("PROMPT_TOOLKIT_NO_CPR") == "1" or env.get("SDREPL_NO_TERMINAL_QUERY") == "1"
    sixel = None if decided or quiet or first.reason == "GNU screen" else query_sixel(stdin, stdout)
    return detect(env, is_tty=is_tty, sixel=sixel, tmux_passthrough=passthrough)


def tmux_wrap(sequence: str) -> str:
    """One escape sequence passed through tmux to the outer terminal (each ESC inside doubled)."""
    return "\x1bPtmux;" + sequence.replace("\x1b", "\x1b\x1b") + "\x1b\\"
