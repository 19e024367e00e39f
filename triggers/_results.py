"""Frozen values the trigger engine hands out: cancel results, cancellations, failures."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from ledger import IntentStatus


class CancelStatus(StrEnum):
    """What ``cancel_trigger`` did: exactly one of five statuses."""

    CANCELLED = "cancelled"
    """The intent was pending: ``commit_cancelled`` ran in the cancel's own transaction."""
    REQUESTED = "requested"
    """The intent is running: the request is recorded and the attempt's signal aborted."""
    IGNORED = "ignored"
    """The trigger declared ``cancellation: "ignored"``: nothing was read or written."""
    NOT_FOUND = "not_found"
    """No intent with that id for that kind in this actor: nothing was written."""
    ALREADY_COMPLETED = "already_completed"
    """The intent had already ended; ``terminal_status`` says how."""


class CancelResult(BaseModel):
    """The answer of ``cancel_trigger``.

    Attributes:
        status: what the call did.
        intent_event_id: the intent asked about.
        terminal_status: how the intent ended, when the call found it ended
            (``already_completed``) or ended it (``cancelled``: normally ``cancelled``, or
            ``failed`` if ``commit_cancelled`` raised and the failure was recorded instead).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    status: CancelStatus
    intent_event_id: int
    terminal_status: IntentStatus | None = None


class Cancellation(BaseModel):
    """Why an intent was cancelled; passed to ``commit_cancelled``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    reason: str | None = None
    requested_at: datetime | None = None
    requested_by: str | None = None


class Failure(BaseModel):
    """Why an intent failed; passed to ``commit_failed`` and recorded as a fact."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    error_type: str
    message: str
    attempts: int
