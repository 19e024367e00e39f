"""How a ledger file's checks at open classify SQLite's errors."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from ledger import LedgerCorruptError
from ledger._file import _verify


class _Refusing:
    """A connection whose every statement fails the way SQLite failed it."""

    def __init__(self, error: sqlite3.Error) -> None:
        self.error = error

    def execute(self, *args: Any) -> Any:
        raise self.error


def test_a_lock_met_while_reading_the_metadata_is_not_corruption() -> None:
    """Another process locking the file between the opener's reads is a busy file (the opener
    puts the actor off), not a damaged one (whose advice is to restore or move it). The lock
    cannot be timed from a test, so the connection is a stand-in that fails as SQLite does."""
    locked = sqlite3.OperationalError("database is locked")
    with pytest.raises(sqlite3.OperationalError) as info:
        _verify(_Refusing(locked), Path("a.db"), "a")  # type: ignore[arg-type]
    assert info.value is locked


@pytest.mark.parametrize(
    "error",
    [sqlite3.OperationalError("no such table: meta"), sqlite3.DatabaseError("malformed")],
)
def test_missing_or_unreadable_metadata_is_corruption(error: sqlite3.Error) -> None:
    with pytest.raises(LedgerCorruptError, match="no ledger metadata"):
        _verify(_Refusing(error), Path("a.db"), "a")  # type: ignore[arg-type]
