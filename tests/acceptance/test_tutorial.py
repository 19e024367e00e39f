"""The tutorial example runs end to end and prints every cancel status it promises."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def tutorial(*args: str, env: dict[str, str] | None = None) -> list[str]:
    result = subprocess.run(
        [sys.executable, "examples/tutorial_cancel.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, **(env or {})},
    )
    assert result.stderr == ""
    return result.stdout.splitlines()


def test_tutorial_prints_each_status(tmp_path: Path) -> None:
    """examples/tutorial_cancel.py cancels pending and running work and reads the facts."""
    lines = tutorial(str(tmp_path / "data"))
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


def test_tutorial_columns_are_aligned(tmp_path: Path) -> None:
    """Every step's values start in the same column, after at least two spaces, however
    long its label ("cancel_trigger, cancellation ignored" once ran into its values)."""
    lines = tutorial(str(tmp_path / "data"))
    steps = [line for line in lines if re.search(r"\s\w+=", line)]
    assert len(steps) >= 10
    columns = set()
    for line in steps:
        gap = re.search(r" {2,}(?=\w+=)", line)
        assert gap is not None, line
        columns.add(gap.end())
    assert len(columns) == 1, "\n".join(steps)


def test_tutorial_leaves_its_ledgers_and_says_how_to_read_them(tmp_path: Path) -> None:
    """Without DATA_DIR it makes a temporary directory and leaves it, saying so, with the
    ``actors`` commands that read it; those commands run as printed."""
    lines = tutorial(env={"TMPDIR": str(tmp_path)})
    kept = [line for line in lines if "are left in a temporary directory: " in line]
    assert len(kept) == 1
    data_dir = Path(kept[0].rsplit(": ", 1)[1])
    assert data_dir.parent == tmp_path
    assert list((data_dir / "actors").rglob("*.db")), "the ledgers are still there"
    assert f"Remove the directory when done: rm -r {data_dir}" in lines
    shown_at = lines.index("Look at them with the actors command:") + 1
    commands = [shlex.split(line) for line in lines[shown_at : shown_at + 2]]
    assert [command[1] for command in commands] == ["inspect", "events"]
    for command in commands:
        shown = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
        assert "chat:123" in shown.stdout or "tutorial.cancelable" in shown.stdout, shown.stdout
