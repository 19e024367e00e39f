"""Attempt slots: the host's concurrency bound, shared by the loop and the ledger thread."""

from __future__ import annotations

import threading


class Slots:
    """A thread-safe count of free attempt slots.

    Claim operations take slots *inside* their transaction on the ledger worker thread, for
    exactly the intents they claim, so claims in flight never hold capacity they do not use;
    the event loop gives slots back as attempts end.
    """

    __slots__ = ("_free", "_lock", "total")

    def __init__(self, total: int) -> None:
        self.total = total
        self._free = total
        self._lock = threading.Lock()

    @property
    def free(self) -> int:
        """Slots free now."""
        return self._free

    def take(self, wanted: int) -> int:
        """Take up to ``wanted`` slots; returns how many were taken."""
        with self._lock:
            taken = min(wanted, self._free)
            self._free -= taken
            return taken

    def give(self, count: int) -> None:
        """Return ``count`` slots."""
        with self._lock:
            self._free += count


class Taken:
    """How many slots an operation kept; read by the loop once the operation has run."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0
