"""The workflow examples run end to end and print what they promise."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.helpers import run_example

if TYPE_CHECKING:
    from pathlib import Path


def test_workflow_basics(tmp_path: Path) -> None:
    """examples/workflows/basics.py: replay after a durable sleep, a hook resumed from outside,
    an abort error not retried, and a run cancelled at its next step with its finally run."""
    assert run_example("workflows/basics.py", tmp_path / "data") == [
        "1. report: 'published q3'; fetch_report ran 1x",
        "2. approval: 'published launch (approved by ann)'",
        "3. no_retry: 'gave up after 1 attempt(s): aborted: the provider cancelled the job'; "
        "call_provider ran 1x",
        "4. cancellable: cancel answered requested; run cancelled: user pressed stop; "
        "['cleanup ran']",
    ]


def test_workflow_abort_patterns(tmp_path: Path) -> None:
    """examples/workflows/abort_patterns.py: a timeout by race with a durable sleep, fetch
    with timeout, first responder, a pipeline sharing one signal, a watchdog step's abort."""
    assert run_example("workflows/abort_patterns.py", tmp_path / "data") == [
        "1. cancellable with timeout: timed out; step signal aborted=True",
        "2. fetch with timeout: https://slow.example: timed out",
        "2. fetch in time: body of https://fast.example",
        "3. first responder: body of provider-b?q=weather",
        "4. pipeline: ['extract done', 'transform done', "
        "'load skipped (aborted: the source changed; stop the pipeline)']",
        "5. step-initiated abort: crunch stopped: aborted: over budget (0.1s)",
        "6. user-triggered cancellation: export-9: stopped by {'by': 'ann'}",
    ]
