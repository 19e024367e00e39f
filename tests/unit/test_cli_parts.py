"""Pieces of the ``actors`` command line: the progress bar, loading APP, logging setup."""

from __future__ import annotations

import io
import json

import pytest
import structlog

from actors._cli import CliError, Progress, configure_logging, load_app
from actors._spec import AgentSpec


class Terminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_on_a_terminal_only() -> None:
    """On a terminal the bar ends full with the count; elsewhere nothing is written."""
    screen = Terminal()
    bar = Progress(4, "inspecting", stream=screen)
    for _ in range(4):
        bar.advance()
    bar.done()
    assert screen.getvalue().endswith("inspecting [" + "#" * 30 + "] 4/4\n")
    piped = io.StringIO()
    quiet = Progress(4, "inspecting", stream=piped)
    quiet.advance()
    quiet.done()
    assert piped.getvalue() == ""


def test_load_app() -> None:
    """APP names a define_agent_do() spec as module:attribute; anything else is a usage error."""
    assert isinstance(load_app("tests.cli_app:AgentDO"), AgentSpec)
    for bad in ("tests.cli_app", "tests.cli_app:positive", ":x", "nowhere_at_all:x"):
        with pytest.raises(CliError) as caught:
            load_app(bad)
        assert caught.value.code == 2


def test_json_logging_writes_one_object_per_line() -> None:
    """``--log-json`` logging: each event is one JSON object with its key/values and level."""
    out = io.StringIO()
    try:
        configure_logging(json_lines=True, stream=out)
        structlog.get_logger("actors").info("attempt_finished", actor="a", outcome="completed")
    finally:
        structlog.reset_defaults()
    record = json.loads(out.getvalue())
    assert record["event"] == "attempt_finished"
    assert (record["actor"], record["outcome"], record["level"]) == ("a", "completed", "info")
