"""The call-handles example runs end to end and shows each behaviour it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_call_handles_example(tmp_path: Path) -> None:
    """examples/call_handles.py: completion, timeout, manual abort, pre-aborted signal,
    composite signal, a killed shell command, and a cancelled wait that leaves the work."""
    result = subprocess.run(
        [sys.executable, "examples/call_handles.py", str(tmp_path / "data")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = result.stdout.splitlines()

    def line(section: str) -> str:
        (found,) = [text for text in lines if text.startswith(section + " ")]
        return found

    assert "('call.done', {'text': 't0 t1 t2'})" in line("completed")
    assert "signal timed out after 0.3s" in line("timeout")
    assert "signal_aborted=True" in line("timeout")
    assert "status=requested" in line("abort() answered")
    assert "reason=user-cancel" in line("manual abort")
    assert "intents_written=0" in line("pre-aborted")
    assert "reason=user-requested-stop" in line("composite signal")
    # The await raised only once run_process had stopped and reaped `sleep 30`.
    assert "reason=stop the shell" in line("shell killed")
    assert "stdout=still here" in line("next shell command")
    assert "intent_status=running" in line("stopped waiting")
    assert "facts=['call.done']" in line("awaited again")
