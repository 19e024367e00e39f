"""The cyclic garbage collector's first threshold, raised while hosts run.

A busy host keeps thousands of short-lived objects in flight (requests, futures, attempts),
and nearly none of them form cycles: reference counting frees them. At CPython's default
first-generation threshold (700 allocations) the collector runs every few intents, finds
them alive, promotes them, and so makes every full collection larger. Measured with the
workload of ``bench/throughput.py`` (1,000 callers, SQLite): collections took about 60 µs
per intent and found almost no cyclic garbage; with the threshold at 10,000 the host's CPU
per intent fell from 345 to 298 µs (medians of six interleaved runs).

The setting belongs to the process, so it is shared: the first host to enter raises it, the
last to leave puts back what it found, unless someone changed the thresholds meanwhile.
A threshold set higher than the host's is left as it is.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

_lock = threading.Lock()
_holders = 0
_found: tuple[int, int, int] | None = None
"""The thresholds before the first holder raised them (None: nothing raised)."""
_set: tuple[int, int, int] | None = None
"""The thresholds as last raised, to tell whether someone changed them since."""


def check_threshold(threshold: int | None) -> None:
    """Refuse anything but None or a positive int (``ActorHost(gc_threshold=)``)."""
    if threshold is None:
        return
    if not isinstance(threshold, int) or isinstance(threshold, bool):
        raise TypeError(f"gc_threshold must be an int or None, not {type(threshold).__name__}")
    if threshold < 1:
        raise ValueError("gc_threshold must be at least 1")


@contextlib.contextmanager
def raised_threshold(threshold: int | None) -> Iterator[None]:
    """While inside, the collector's first threshold is at least ``threshold`` (None: leave
    the collector alone)."""
    if threshold is None:
        yield
        return
    _enter(threshold)
    try:
        yield
    finally:
        _leave()


def _enter(threshold: int) -> None:
    global _holders, _found, _set
    with _lock:
        current = gc.get_threshold()
        _holders += 1
        if current[0] >= threshold:
            return
        if _found is None:
            _found = current
        _set = (threshold, current[1], current[2])
        gc.set_threshold(*_set)


def _leave() -> None:
    global _holders, _found, _set
    with _lock:
        _holders -= 1
        if _holders > 0:
            return
        if _found is not None and gc.get_threshold() == _set:
            gc.set_threshold(*_found)
        _found = _set = None
