"""Terminal detection by environment: a table of env -> protocol, tmux and screen cases, the DA1 answer."""

from __future__ import annotations

import os
import subprocess

import pytest

from sdrepl.repl.preview import detect as d

BASE = {"TERM": "xterm-256color"}

CASES = [
    # (extra environment, DA1 says sixel, tmux allow-passthrough, protocol, wrapped for tmux)
    ({"KITTY_WINDOW_ID": "1", "TERM": "xterm-kitty"}, None, None, "kitty", False),
    ({"TERM": "xterm-kitty"}, None, None, "kitty", False),
    ({"TERM_PROGRAM": "ghostty", "TERM": "xterm-ghostty"}, None, None, "kitty", False),
    ({"KONSOLE_VERSION": "230805"}, None, None, "kitty", False),
    ({"TERM_PROGRAM": "iTerm.app"}, None, None, "iterm", False),
    ({"LC_TERMINAL": "iTerm2"}, None, None, "iterm", False),  # over ssh: LC_* is forwarded
    ({"TERM_PROGRAM": "WezTerm"}, None, None, "iterm", False),
    ({"WEZTERM_PANE": "0"}, None, None, "iterm", False),
    ({"TERM_PROGRAM": "mintty"}, None, None, "iterm", False),
    ({"TERM": "foot"}, None, None, "sixel", False),
    ({"TERM": "mlterm"}, None, None, "sixel", False),
    ({}, True, None, "sixel", False),  # xterm -ti vt340 answers DA1 with 4
    ({}, False, None, "blocks", False),
    ({}, None, None, "blocks", False),
    ({"VTE_VERSION": "7600"}, None, None, "blocks", False),
    ({"TERM_PROGRAM": "vscode"}, None, None, "blocks", False),
    ({"TERM": "linux"}, None, None, "blocks", False),
    # tmux: TERM_PROGRAM is tmux's own; KITTY_WINDOW_ID/LC_TERMINAL come from where the server started
    ({"TMUX": "/tmp/t,1,0", "TERM": "tmux-256color", "TERM_PROGRAM": "tmux"}, None, None, "blocks", False),
    ({"TMUX": "/tmp/t,1,0", "TERM": "screen-256color", "KITTY_WINDOW_ID": "3"}, None, True, "kitty", True),
    ({"TMUX": "/tmp/t,1,0", "TERM": "screen-256color", "KITTY_WINDOW_ID": "3"}, None, False, "blocks", False),
    ({"TMUX": "/tmp/t,1,0", "TERM": "screen-256color", "KITTY_WINDOW_ID": "3"}, None, None, "blocks", False),
    ({"TMUX": "/tmp/t,1,0", "TERM": "tmux-256color", "LC_TERMINAL": "iTerm2"}, None, True, "iterm", True),
    ({"TMUX": "/tmp/t,1,0", "TERM": "tmux-256color"}, True, None, "sixel", False),  # tmux 3.4 with sixel
    ({"TMUX": "/tmp/t,1,0", "TERM": "tmux-256color", "LC_TERMINAL": "iTerm2"}, True, False, "sixel", False),
    ({"TMUX": "/tmp/t,1,0", "TERM": "tmux-256color"}, None, True, "blocks", False),  # no outer terminal known
    # GNU screen: no passthrough worth the name
    ({"STY": "1.pts", "TERM": "screen", "KITTY_WINDOW_ID": "1"}, None, None, "blocks", False),
    ({"TERM": "screen.xterm-256color"}, True, None, "blocks", False),
]


@pytest.mark.parametrize(("extra", "sixel", "passthrough", "protocol", "wrapped"), CASES)
def test_detection_table(extra, sixel, passthrough, protocol, wrapped):
    found = d.detect({**BASE, **extra}, sixel=sixel, tmux_passthrough=passthrough)
    assert (found.protocol, found.tmux) == (protocol, wrapped), found.reason
    assert found.reason


@pytest.mark.parametrize("env", [{"TERM": "dumb"}, {}, {"TERM": ""}])
def test_no_pictures_without_a_usable_term(env):
    assert d.detect(env).protocol is None


def test_no_pictures_when_not_a_terminal():
    assert d.detect({"TERM": "xterm-kitty", "KITTY_WINDOW_ID": "1"}, is_tty=False).protocol is None


@pytest.mark.parametrize(("colorterm", "expected"), [("truecolor", True), ("24bit", True), ("", False),
                                                     ("yes", False)])
def test_truecolour_follows_colorterm(colorterm, expected):
    assert d.detect({**BASE, "COLORTERM": colorterm}).truecolor is expected


@pytest.mark.parametrize(("reply", "expected"), [
    (b"\x1b[?62;4;6;22c", True), (b"\x1b[?64;1;2;6;9;15;18;21;22c", False), (b"\x1b[?1;2c", False),
    (b"noise\x1b[?63;1;4c", True), (b"", None), (b"\x1b[?62;", None),
])
def test_da1_replies(reply, expected):
    assert d.parse_da1(reply) is expected


def test_tmux_wrap_doubles_every_escape():
    assert d.tmux_wrap("\x1b_Ga=T;AAAA\x1b\\") == "\x1bPtmux;\x1b\x1b_Ga=T;AAAA\x1b\x1b\\\x1b\\"


def test_modes_are_the_set_preview_values():
    assert d.MODES == ("off", "auto", "kitty", "iterm", "sixel", "blocks")


def test_the_da1_query_reads_a_terminal_answer_and_nothing_after_it():
    """A pseudo-terminal whose other end answers DA1 as a sixel terminal would (and then types 'x')."""
    import pty

    master, slave = pty.openpty()
    try:
        pid = os.fork()
        if pid == 0:  # the "terminal": wait for the query, answer it
            try:
                os.close(slave)
                got = b""
                while not got.endswith(b"\x1b[c"):
                    got += os.read(master, 16)
                os.write(master, b"\x1b[?62;4;22cx")
            finally:
                os._exit(0)
        assert d.query_sixel(slave, slave, timeout=5) is True
        os.waitpid(pid, 0)
        assert os.read(slave, 16) == b"x"  # what followed the answer stays for the prompt
    finally:
        os.close(master)
        os.close(slave)


def test_the_da1_query_gives_up_quietly_when_nobody_answers():
    import pty

    master, slave = pty.openpty()
    try:
        assert d.query_sixel(slave, slave, timeout=0.05) is None
    finally:
        os.close(master)
        os.close(slave)


def test_probe_asks_nothing_when_the_user_turned_queries_off(monkeypatch):
    calls = []
    monkeypatch.setattr(d, "query_sixel", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(d.os, "isatty", lambda fd: True)
    found = d.probe({**BASE, "PROMPT_TOOLKIT_NO_CPR": "1"})
    assert found.protocol == "blocks" and calls == []
    found = d.probe({"TERM": "xterm-kitty"})
    assert found.protocol == "kitty" and calls == []  # kitty needs no question


def test_tmux_passthrough_option_is_read_from_tmux(tmp_path, monkeypatch):
    import shutil

    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    socket = str(tmp_path / "tmux")
    subprocess.run(["tmux", "-S", socket, "new-session", "-d", "-s", "p", "sleep 30"], check=True, timeout=30)
    try:
        subprocess.run(["tmux", "-S", socket, "set", "-g", "allow-passthrough", "on"], check=True, timeout=30)
        pane_env = subprocess.run(["tmux", "-S", socket, "display", "-p", "#{socket_path},#{pid},0"],
                                  capture_output=True, text=True, check=True, timeout=30).stdout.strip()
        monkeypatch.setenv("TMUX", pane_env)
        assert d.tmux_allows_passthrough() is True
        subprocess.run(["tmux", "-S", socket, "set", "-g", "allow-passthrough", "off"], check=True, timeout=30)
        assert d.tmux_allows_passthrough() is False
    finally:
        subprocess.run(["tmux", "-S", socket, "kill-server"], capture_output=True, timeout=30)


def test_the_da1_query_is_not_sent_over_keys_typed_ahead():
    import pty

    master, slave = pty.openpty()
    try:
        os.write(master, b"a cat\r")  # typed while the REPL started
        assert d.query_sixel(slave, slave, timeout=1) is None
        assert os.read(slave, 16) == b"a cat\n"  # still there for the prompt (the pty's cooked mode maps \r)
        os.set_blocking(master, False)
        try:
            assert b"\x1b[c" not in os.read(master, 64)
        except BlockingIOError:
            pass  # nothing was written to the terminal: no query
    finally:
        os.close(master)
        os.close(slave)
