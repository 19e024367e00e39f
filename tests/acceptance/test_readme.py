"""The README's quickstart runs as printed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_starts_with_the_two_commands() -> None:
    """The README opens with the demo command and the test command, and .ci/run uses the latter."""
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```sh\n(.*?)```", readme, re.S)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert commands == ["python3 dev.py demo", "python3 dev.py test"]
    assert readme.index("```sh") < readme.index("##"), "the commands come first"
    assert "python3 dev.py test" in (ROOT / ".ci" / "run").read_text()


def test_readme_quickstart_runs(tmp_path: Path) -> None:
    """The quickstart enqueues, cancels and waits; it prints a cancel status and a state."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    quickstart = next(block for block in blocks if "anyio.run(main)" in block)
    script = tmp_path / "quickstart.py"
    script.write_text(quickstart)
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = result.stdout.strip().splitlines()
    assert lines[0] in ("cancelled", "requested")
    assert "status=<IntentStatus.CANCELLED: 'cancelled'>" in lines[-1]
    assert list((tmp_path / "data" / "actors").rglob("*.db"))
