"""Shared helpers of the benchmark scripts: percentiles, process statistics, output."""

from __future__ import annotations

import os
import resource
import statistics
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, nearest-rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def summary_ms(values_s: Sequence[float]) -> str:
    """``p50 / p99 / max`` of durations given in seconds, printed in milliseconds."""
    ms = [v * 1000 for v in values_s]
    return (
        f"p50 {statistics.median(ms):.3f} ms  p99 {percentile(ms, 99):.3f} ms  "
        f"max {max(ms):.3f} ms  (n={len(ms)})"
    )


def peak_rss_mib() -> float:
    """Peak resident set size of this process, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def open_fds() -> int:
    """File descriptors open in this process now."""
    return len(os.listdir("/proc/self/fd"))


def metric(name: str, value: object) -> None:
    """Print one ``name: value`` line (the format every benchmark uses)."""
    print(f"{name}: {value}", flush=True)
