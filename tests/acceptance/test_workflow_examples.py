"""The workflow examples run end to end and print what they promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_workflow_basics(tmp_path: Path) -> None:
    """examples/workflows/basics.py: replay after a durable sleep, a hook resumed from outside,
    an abort error not retried, and a run cancelled at its next step with its finally run."""
    result = subprocess.run(
        [sys.executable, "examples/workflows/basics.py", str(tmp_path / "data")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "1. report: 'published q3'; fetch_report ran 1x",
        "2. approval: 'published launch (approved by ann)'",
        "3. no_retry: 'gave up after 1 attempt(s): aborted: the provider cancelled the job'; "
        "call_provider ran 1x",
        "4. cancellable: cancel answered requested; run cancelled: user pressed stop; "
        "['cleanup ran']",
    ]
