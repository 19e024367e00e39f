"""The tutorial example runs end to end and prints every cancel status it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tutorial_prints_each_status(tmp_path: Path) -> None:
    """examples/tutorial_cancel.py cancels pending and running work and reads the facts."""
    result = subprocess.run(
        [sys.executable, "examples/tutorial_cancel.py", str(tmp_path / "data")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = result.stdout.splitlines()
    statuses = {line.split(" status=")[0].strip(): line for line in lines if " status=" in line}
    assert "status=cancelled" in statuses["cancel_trigger on pending work"]
    assert "status=requested" in statuses["cancel_trigger on running work"]
    assert "status=cancelled" in statuses["the attempt settled"]
    assert "status=already_completed" in statuses["cancel_trigger again"]
    assert "status=not_found" in statuses["cancel_trigger on an unknown id"]
    assert "status=ignored" in statuses["cancel_trigger, cancellation ignored"]
    facts = [line for line in lines if line.startswith("fact in the ledger")]
    assert len(facts) == 2
    assert all("tutorial.cancelable.cancelled" in fact and "'user'" in fact for fact in facts)
    assert list((tmp_path / "data" / "actors").rglob("*.db")), "one SQLite file per actor"
