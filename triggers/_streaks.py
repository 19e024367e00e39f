"""Logging a recurring task's failures without flooding the log during an outage."""

from __future__ import annotations

from typing import Any


def worth_a_warning(failures: int) -> bool:
    """True at the 1st, 2nd, 4th, 8th... failure in a row: the ones logged as warnings (the
    others go out at debug level)."""
    return failures & (failures - 1) == 0


class FailureStreak:
    """Consecutive failures of one recurring task (a poll, a renewal): ``failed`` logs
    ``event`` as a warning at the 1st, 2nd, 4th, 8th... failure in a row and at debug level
    otherwise, with the count; ``succeeded`` logs ``<event>`` with ``_failed`` replaced by
    ``_recovered`` (info) once the streak ends.
    """

    __slots__ = ("event", "failures", "log")

    def __init__(self, log: Any, event: str) -> None:
        self.log = log
        self.event = event
        self.failures = 0

    def failed(self, **fields: Any) -> None:
        self.failures += 1
        write = self.log.warning if worth_a_warning(self.failures) else self.log.debug
        write(self.event, failures=self.failures, **fields)

    def succeeded(self, **fields: Any) -> None:
        if self.failures:
            recovered = self.event.removesuffix("_failed") + "_recovered"
            self.log.info(recovered, failures=self.failures, **fields)
            self.failures = 0
