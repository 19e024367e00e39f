"""Frozen values that cross the ledger boundary."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

JSON = Any
"""A JSON value: ``None``, ``bool``, ``int``, ``float``, ``str``, lists and str-keyed dicts."""


class IntentStatus(StrEnum):
    """Where an intent is in its lifecycle; the values are what the ledger stores."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        """True for ``completed``, ``cancelled`` and ``failed``."""
        return self in _TERMINAL


_TERMINAL = frozenset({IntentStatus.COMPLETED, IntentStatus.CANCELLED, IntentStatus.FAILED})


class Event(BaseModel):
    """One fact in an actor's ledger.

    ``id`` increases in commit order within the actor; ``ts`` is epoch milliseconds;
    ``intent_event_id`` links the fact to the intent it belongs to (an intent event carries its
    own id there).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: int
    ts: int
    kind: str
    payload: JSON
    intent_event_id: int | None = None


_new_object = object.__new__
_set_attribute = object.__setattr__


def make_event(id: int, ts: int, kind: str, payload: JSON, intent_event_id: int | None) -> Event:
    """An ``Event`` from values the ledger trusts (read back or just written), unvalidated.

    The same object ``Event.model_construct`` builds with every field given, built directly:
    the ledger makes one per event it writes or reads, and the generic constructor costs
    several times more than the rest of an event's insert.
    """
    event = _new_object(Event)
    _set_attribute(
        event,
        "__dict__",
        {"id": id, "ts": ts, "kind": kind, "payload": payload, "intent_event_id": intent_event_id},
    )
    _set_attribute(event, "__pydantic_fields_set__", {"id", "ts", "kind", "payload",
                                                      "intent_event_id"})  # fmt: skip
    _set_attribute(event, "__pydantic_extra__", None)
    _set_attribute(event, "__pydantic_private__", None)
    return event


class IntentState(BaseModel):
    """The schedule row of one intent: the cursor the scheduler works from, not the truth."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    intent_event_id: int
    trigger_kind: str
    status: IntentStatus
    attempts: int
    redrives: int
    due_at: datetime
    created_at: datetime
    finished_at: datetime | None = None
    cancel_requested_at: datetime | None = None
    cancel_reason: str | None = None
    cancel_requested_by: str | None = None
    terminal_event_ids: tuple[int, ...] = ()
    idempotency_key: str | None = None


S = TypeVar("S")


@dataclass(frozen=True)
class Projection(Generic[S]):
    """A fold of an actor's events, kept current in the transaction that writes them.

    Args:
        name: unique name within the actor class.
        initial: the state before any event; must be JSON-serializable. Each actor's fold
            starts from its own copy (as stored: lists, not tuples), so an ``apply`` that
            changes its state in place changes no other actor's.
        apply: ``(state, event) -> state``, pure and synchronous. It sees every event of the
            actor in id order and returns the next state (return ``state`` unchanged for events
            it does not care about). The state is stored as JSON, so return JSON values.

    Raises:
        TypeError: ``name`` is not a non-empty str, or ``apply`` is not callable.
        PayloadError: ``initial`` is not storable as JSON.
    """

    name: str
    initial: S
    apply: Callable[[S, Event], S]

    def __post_init__(self) -> None:
        from ._tx import dump_json  # (``_tx`` imports this module)

        if not isinstance(self.name, str) or not self.name or "\x00" in self.name:
            raise TypeError(f"Projection name must be a non-empty str without NUL: {self.name!r}")
        if not callable(self.apply):
            raise TypeError(f"Projection {self.name!r}: apply must be a callable (state, event)")
        text = dump_json(self.initial, what=f"Projection {self.name!r}: initial")
        object.__setattr__(self, "_initial_text", text)

    def initial_state(self) -> S:
        """A fresh copy of ``initial``, as stored (what a fold of no events gives)."""
        state: S = json.loads(self._initial_text)  # type: ignore[attr-defined]
        return state


def ms_to_datetime(ms: int) -> datetime:
    """Convert epoch milliseconds to an aware UTC datetime."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def datetime_to_ms(value: datetime, what: str = "datetime") -> int:
    """Convert an aware datetime to epoch milliseconds (``what`` names it in errors).

    Raises:
        TypeError: ``value`` is not a ``datetime`` (a ``date``, a number, a string...).
        ValueError: ``value`` is naive (no timezone).
    """
    if not isinstance(value, datetime):
        raise TypeError(
            f"{what} must be a timezone-aware datetime (for example datetime.now(UTC) +"
            f" timedelta(minutes=5)), not {type(value).__name__}"
        )
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware (for example datetime.now(UTC))")
    return round(value.timestamp() * 1000)


LONGEST_MS = round(100 * 365.25 * 86_400_000)
"""The longest duration a setting takes: about a century (a longer one is a unit mistake)."""


def duration_ms(value: timedelta | float, what: str, *, positive: bool = False) -> int:
    """A ``timedelta`` or a number of seconds as milliseconds (``what`` names it in errors);
    a positive duration is at least 1 ms.

    Raises:
        TypeError: ``value`` is neither.
        ValueError: it is negative (or zero when ``positive``), not finite, or longer than a
            century.
    """
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise TypeError(f"{what} must be a timedelta or a number of seconds, not {value!r}")
    if not math.isfinite(seconds) or seconds < 0 or (positive and seconds == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{what} must be finite and {bound}, not {value!r}")
    if seconds * 1000 > LONGEST_MS:
        raise ValueError(f"{what} is at most a century (a longer one is a unit mistake)")
    return max(1 if positive else 0, round(seconds * 1000))
