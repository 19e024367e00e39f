"""Errors raised by the ledger."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _rebuilt(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


def reduce_error(error: BaseException) -> tuple[Any, ...]:
    """``__reduce__`` for errors whose ``__init__`` does not take their ``args`` (a path and a
    detail, say, where ``args`` holds the message): they unpickle without calling it, with
    their message and attributes as they were."""
    return _rebuilt, (type(error), error.args, dict(error.__dict__))


class LedgerError(Exception):
    """Root of every error the ledger raises."""

    __reduce__ = reduce_error


class LedgerCorruptError(LedgerError):
    """A ledger file is damaged or is not a ledger of this actor.

    Attributes:
        path: the file that failed to open or to verify.
    """

    def __init__(self, path: Path | str, detail: str) -> None:
        self.path = Path(path)
        self.detail = detail
        super().__init__(
            f"ledger file {self.path} is corrupt or foreign: {detail}. Other actors keep "
            "working; restore this file from a backup or move it aside to start it afresh."
        )


class LedgerBusyError(LedgerError):
    """The ledger stayed locked by another connection for longer than the lock timeout."""

    def __init__(self, path: Path | str, waited_s: float) -> None:
        self.path = Path(path)
        self.waited_s = waited_s
        super().__init__(
            f"{_where(path)} stayed locked by another process for {waited_s:.1f}s; "
            "nothing was written. Retry later or find the process holding the lock."
        )


class LedgerWriteError(LedgerError):
    """The storage refused a write (disk full, read-only file, I/O error, lost database
    connection); nothing was written unless the message says the outcome is unknown.

    With ``reading=True``: a store that only reads could not open the file (permissions,
    no file descriptors left); the message then says so.
    """

    def __init__(self, path: Path | str, detail: str, *, reading: bool = False) -> None:
        self.path = Path(path)
        self.detail = detail
        if reading:
            super().__init__(f"could not read {_where(path)}: {detail}")
        else:
            super().__init__(f"could not write {_where(path)}: {detail}; nothing was written")


class LedgerUnavailableError(LedgerWriteError):
    """The storage could not be reached: the database connection was lost and could not be
    made again, or the server left a statement unanswered. Unlike other write errors, it
    says nothing about the operation itself: trying again once the storage is back may
    succeed. Nothing was written unless the message says the outcome is unknown."""


def is_locked(error: BaseException) -> bool:
    """True if SQLite refused because another connection holds the file ("database is
    locked" or "busy"): a wait or a retry may succeed, unlike any other error."""
    message = str(error)
    return "locked" in message or "busy" in message


def _where(path: Path | str) -> str:
    """``ledger file PATH``, or ``ledger database URL`` for a database URL."""
    text = str(path)
    if "://" in text:
        return f"ledger database {text}"
    return f"ledger file {Path(path)}"


class PayloadError(LedgerError, ValueError):
    """A payload or chunk cannot be stored as JSON (not serializable, NaN, too large...)."""


class ProjectionError(LedgerError):
    """A projection's ``apply`` raised on an event, or returned a state that is not JSON: a
    bug in the projection. The write that needed it did not happen. Its cause is the error
    ``apply`` raised.

    Attributes:
        projection: the projection's name.
        kind: the kind of the event it could not apply.
        event_id: that event's id.
    """

    def __init__(self, projection: str, kind: str, event_id: int, error: str) -> None:
        self.projection = projection
        self.kind = kind
        self.event_id = event_id
        super().__init__(
            f"projection {projection!r} could not apply event {event_id} ({kind!r}): {error}"
        )


class IntentNotFoundError(LedgerError, LookupError):
    """No intent with this id exists in the actor's ledger.

    Attributes:
        actor_id: the actor that was asked.
        intent_event_id: the id that was not found.
    """

    def __init__(self, actor_id: str, intent_event_id: int) -> None:
        self.actor_id = actor_id
        self.intent_event_id = intent_event_id
        super().__init__(f"actor {actor_id!r} has no intent with id {intent_event_id}")


class LedgerNotFoundError(LedgerError, LookupError):
    """The actor has no ledger yet (raised only for operations that must not create one)."""

    def __init__(self, actor_id: str) -> None:
        self.actor_id = actor_id
        super().__init__(f"actor {actor_id!r} has no ledger yet")
