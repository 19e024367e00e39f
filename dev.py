#!/usr/bin/env python3
"""Project entry points that need nothing but Python 3.11.

    python3 dev.py demo     run the tutorial (examples/tutorial_cancel.py)
    python3 dev.py test     ruff, mypy and the whole test suite  [pytest args...]
    python3 dev.py bench    run a benchmark script from bench/    NAME [args...]

Each command creates the project's virtual environment in ``.venv`` on first use and
reuses it afterwards; it reinstalls the project when ``pyproject.toml`` changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".installed"


def _run(*cmd: str | Path) -> int:
    return subprocess.call([str(c) for c in cmd], cwd=ROOT)


def ensure_venv() -> None:
    """Create ``.venv`` if needed and install the project with its test extras."""
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if PYTHON.exists() and STAMP.exists() and STAMP.read_text() == wanted:
        return
    if not PYTHON.exists():
        print("creating virtual environment in .venv", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("installing durable-triggers and its test tools into .venv", flush=True)
    code = _run(
        PYTHON, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
        "-e", ".[test]",
    )  # fmt: skip
    if code:
        sys.exit(code)
    STAMP.write_text(wanted)


def demo() -> int:
    return _run(PYTHON, "examples/tutorial_cancel.py")


def test(args: list[str]) -> int:
    steps: list[list[str | Path]] = [
        [BIN / "ruff", "format", "--check", "."],
        [BIN / "ruff", "check", "."],
        [BIN / "mypy"],
        [PYTHON, "-m", "pytest", *args],
    ]
    for step in steps:
        print("$", " ".join(Path(str(s)).name if i == 0 else str(s) for i, s in enumerate(step)))
        code = _run(*step)
        if code:
            return code
    return 0


def bench(args: list[str]) -> int:
    if not args:
        names = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if not p.stem.startswith("_"))
        print("usage: python3 dev.py bench NAME [args...]; NAME is one of:", ", ".join(names))
        return 2
    return _run(PYTHON, f"bench/{args[0]}.py", *args[1:])


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test", "bench"}:
        print(__doc__)
        return 2
    ensure_venv()
    if argv[0] == "demo":
        return demo()
    if argv[0] == "test":
        return test(argv[1:])
    return bench(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
