"""A recurring task's failures in a row are logged without flooding the log."""

from __future__ import annotations

import structlog
import structlog.testing

from triggers._streaks import FailureStreak, worth_a_warning


def test_warnings_at_powers_of_two() -> None:
    assert [n for n in range(1, 20) if worth_a_warning(n)] == [1, 2, 4, 8, 16]


def test_a_streak_warns_sparingly_and_says_when_it_ends() -> None:
    log = structlog.get_logger("test")
    streak = FailureStreak(log, "index_poll_failed")
    with structlog.testing.capture_logs() as logs:
        streak.succeeded()  # no streak yet: nothing to say
        for _ in range(5):
            streak.failed(error="down")
        streak.succeeded()
        streak.failed(error="down again")  # a new streak starts from one
    assert [(e["event"], e["log_level"], e.get("failures")) for e in logs] == [
        ("index_poll_failed", "warning", 1),
        ("index_poll_failed", "warning", 2),
        ("index_poll_failed", "debug", 3),
        ("index_poll_failed", "warning", 4),
        ("index_poll_failed", "debug", 5),
        ("index_poll_recovered", "info", 5),
        ("index_poll_failed", "warning", 1),
    ]
