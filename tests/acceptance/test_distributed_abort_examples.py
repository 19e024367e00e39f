"""The distributed abort controller examples run end to end and show what they promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_example(name: str, tmp_path: Path) -> list[str]:
    result = subprocess.run(
        [sys.executable, f"examples/distributed_abort/{name}.py", str(tmp_path / "data")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout.splitlines()


def test_single_process(tmp_path: Path) -> None:
    """One process: create twice (same controller), abort stops the operation, a second
    abort keeps the first reason."""
    lines = run_example("single_process", tmp_path)
    assert lines == [
        "created 'chat:user-123' run_id=1 same=1",
        "operation: stopped, reason='User cancelled'",
        "signal reason after a second abort: 'User cancelled'",
    ]


def test_cross_process(tmp_path: Path) -> None:
    """Three processes: B's abort stops A's work and fires C's listener, with B's reason."""
    lines = run_example("cross_process", tmp_path)
    assert "B: aborted" in lines
    assert "A: build stopped, reason='Cancelled by admin'" in lines
    assert "C: task was cancelled, reason='Cancelled by admin'" in lines


def test_custom_ttl(tmp_path: Path) -> None:
    """A short TTL expires with an "(expired)" reason; a late subscriber within the grace gets
    the fired controller; a 7-day controller stays unfired."""
    lines = run_example("custom_ttl", tmp_path)
    assert lines == [
        "quick-task fired: 'controller ttl of 0.5s elapsed (expired)'",
        "quick-task expired: cleaning up",
        "late subscriber: same=True fired at once",
        "batch-job aborted: False",
    ]
