"""``run_repl``: the entry point's exits: no daemon, a bad ``--script``, an internal error; never a traceback."""

from __future__ import annotations

import logging

import pytest

from sdrepl.config import Settings
from sdrepl.daemon.client import DaemonUnavailable
from sdrepl.repl import main


@pytest.fixture(autouse=True)
def private_log(tmp_path, monkeypatch):
    """Log into tmp, and give the ``sdrepl`` logger back as it was (other tests read it with caplog)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    logger = logging.getLogger("sdrepl")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    for handler in logger.handlers:
        if handler not in saved[0]:
            handler.close()
    logger.handlers[:], logger.level, logger.propagate = saved


def settings(tmp_path) -> Settings:
    return Settings(socket=tmp_path / "s.sock")


def test_a_missing_script_is_one_line_and_status_2(tmp_path, capsys):
    assert main.run_repl(settings(tmp_path), script=tmp_path / "nope.txt") == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "--script" in err and "no such file" in err


def test_no_daemon_is_one_line_and_status_2(tmp_path, capsys, monkeypatch):
    def refuse(settings, **kwargs):
        raise DaemonUnavailable("--model nope: no such file or folder")

    monkeypatch.setattr("sdrepl.daemon.lifecycle.ensure_daemon", refuse)
    (tmp_path / "lines.txt").write_text("!tokens cat\n")
    assert main.run_repl(settings(tmp_path), script=tmp_path / "lines.txt") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(tmp_path / "s.sock") in err and "--model nope" in err


def test_an_internal_error_names_the_log_and_shows_no_traceback(tmp_path, capsys, monkeypatch):
    async def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("sdrepl.daemon.lifecycle.ensure_daemon", lambda settings, **kwargs: None)
    monkeypatch.setattr(main, "_run", broken)
    (tmp_path / "lines.txt").write_text("")
    assert main.run_repl(settings(tmp_path), script=tmp_path / "lines.txt") == 1
    err = capsys.readouterr().err
    log_file = tmp_path / "state" / "sdrepl" / "repl.log"
    assert err.startswith("sdrepl: internal error: RuntimeError: a bug") and str(log_file) in err
    assert "Traceback" not in err and "Traceback" in log_file.read_text()


def test_log_file_is_never_written_through_a_planted_symlink(tmp_path) -> None:
    """A link at repl.log towards another file of the user's: no log, and the target is untouched."""
    target = tmp_path / "bashrc"
    target.write_text("export PATH=/usr/bin\n")
    path = main.log_path()
    path.parent.mkdir(parents=True)
    path.symlink_to(target)
    assert main.setup_logging() is None
    logging.getLogger("sdrepl.repl").warning("this line must not reach the link's target")
    assert target.read_text() == "export PATH=/usr/bin\n"


def test_log_file_is_private_and_rotates_without_following_links(tmp_path) -> None:
    where = main.setup_logging()
    assert where == main.log_path()
    handler = next(h for h in logging.getLogger("sdrepl").handlers if isinstance(h, main.PrivateLogHandler))
    logging.getLogger("sdrepl.repl").info("first line")
    handler.flush()
    assert (where.stat().st_mode & 0o777) == 0o600 and "first line" in where.read_text()
    handler.doRollover()  # renames repl.log to repl.log.1 and opens a fresh private file
    logging.getLogger("sdrepl.repl").info("after rollover")
    handler.flush()
    assert "after rollover" in where.read_text() and "first line" in (where.parent / "repl.log.1").read_text()
