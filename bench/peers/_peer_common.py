"""Stdlib-only helpers shared by every workload script of ``bench/peers/``.

The workload scripts run in two different virtual environments (the project's ``.venv`` for
this project, ``bench/peers/.venv`` for the peers), so this module imports nothing outside the
standard library. Each script prints exactly one line starting with :data:`MARKER` followed by
a JSON object; the runner ignores every other line (peers log to stdout).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

MARKER = "PEER-RESULT "
TICK = 0.01
"""Seconds between two checks of a cooperative body that has to poll (Huey) or sleep in
slices (every body, so the workloads have the same shape)."""


def now() -> float:
    """CLOCK_MONOTONIC in seconds (the harness and the bodies run in one process)."""
    return time.monotonic()


def emit(result: dict[str, Any]) -> None:
    """Print the result line the runner parses."""
    print(MARKER + json.dumps(result), flush=True)


def parser(description: str) -> argparse.ArgumentParser:
    """The arguments every workload script accepts."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("workload", choices=["throughput", "cancel", "race"])
    p.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    p.add_argument("--dir", help="a fresh directory for SQLite files")
    p.add_argument("--url", help="a postgresql:// URL of a fresh database")
    p.add_argument("--n", type=int, default=1000, help="throughput: no-op units")
    p.add_argument("--workers", type=int, default=2, help="units running at once")
    p.add_argument("--trials", type=int, default=5, help="cancel / race: trials")
    p.add_argument("--body-seconds", type=float, default=1.5, help="cancel: natural body length")
    p.add_argument("--race-seconds", type=float, default=0.04, help="race: body length")
    p.add_argument("--variant", default="", help="a peer-specific variant of the workload")
    return p


def cancel_offsets(trials: int, seed: int = 7) -> list[float]:
    """Seconds after the body started at which the cancel workload cancels (0.2-0.5 s, so a
    peer polling once a second is not always hit at the same phase)."""
    rng = random.Random(seed)
    return [0.2 + 0.3 * rng.random() for _ in range(trials)]


def race_offsets(trials: int, body: float, seed: int = 11) -> list[float]:
    """Seconds after the body started at which the race workload cancels: spread over
    ``[0.5 body, 2 body]``, around the moment the body ends and its completion is recorded."""
    rng = random.Random(seed)
    return [body * (0.5 + 1.5 * rng.random()) for _ in range(trials)]


def throughput_result(
    system: str, backend: str, n: int, workers: int, enqueued: float, finished: float, **extra: Any
) -> dict[str, Any]:
    """The result of a throughput run; times are seconds from the first enqueue."""
    return {
        "system": system,
        "backend": backend,
        "workload": "throughput",
        "n": n,
        "workers": workers,
        "enqueue_s": enqueued,
        "total_s": finished,
        "rate": n / finished,
        **extra,
    }
