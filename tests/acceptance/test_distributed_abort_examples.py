"""The distributed abort controller examples run end to end and show what they promise."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.helpers import run_example

if TYPE_CHECKING:
    from pathlib import Path


def test_single_process(tmp_path: Path) -> None:
    """One process: create twice (same controller), abort stops the operation, a second
    abort keeps the first reason."""
    lines = run_example("distributed_abort/single_process.py", tmp_path / "data")
    assert lines == [
        "created 'chat:user-123' run_id=1 same=1",
        "operation: stopped, reason='User cancelled'",
        "signal reason after a second abort: 'User cancelled'",
    ]


def test_cross_process(tmp_path: Path) -> None:
    """Three processes: B's abort stops A's work and fires C's listener, with B's reason."""
    lines = run_example("distributed_abort/cross_process.py", tmp_path / "data")
    assert "B: aborted" in lines
    assert "A: build stopped, reason='Cancelled by admin'" in lines
    assert "C: task was cancelled, reason='Cancelled by admin'" in lines


def test_custom_ttl(tmp_path: Path) -> None:
    """A short TTL expires with an "(expired)" reason; a late subscriber within the grace gets
    the fired controller; a 7-day controller stays unfired."""
    lines = run_example("distributed_abort/custom_ttl.py", tmp_path / "data")
    assert lines == [
        "quick-task fired: 'controller ttl of 0.5s elapsed (expired)'",
        "quick-task expired: cleaning up",
        "late subscriber: same=True fired at once",
        "batch-job aborted: False",
    ]
