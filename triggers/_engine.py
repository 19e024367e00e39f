"""The intent state machine, as ledger operations.

Each function here returns an operation ``op(tx: LedgerTx) -> result`` that the ledger store
runs inside one transaction on a worker thread. All of the engine's invariants live here and
only here:

* a claim is a conditional update under a fresh token; every later write for the attempt
  re-checks that token in the same transaction (``_holds``), so exactly one terminal
  transition and one set of terminal facts can ever be written per intent;
* ``cancel`` settles a pending intent itself but never a claimed one: only the attempt holding
  the claim, or the redrive of a lost claim, settles a running intent;
* user commit functions run in a savepoint: if one raises (or returns an awaitable) its writes
  are rolled back and the intent fails with a failure fact instead.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence, Set
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import structlog

from ledger import (
    JSON,
    Event,
    IntentRow,
    IntentStatus,
    LedgerTx,
    NewClaim,
    ProjectionError,
    ms_to_datetime,
)

from ._abort import AbortError, describe, reason_text
from ._errors import FatalError, IntentRejectedError, TriggerDefinitionError
from ._results import Cancellation, CancelResult, CancelStatus, Failure
from ._tx import Tx

if TYPE_CHECKING:
    from ._slots import Slots, Taken
    from ._spec import TriggerDef, TriggerRegistry

Op = Callable[[LedgerTx], Any]

_log = structlog.get_logger("triggers")

CANCEL_REQUESTED = "trigger.cancel_requested"
ATTEMPT_FAILED = "trigger.attempt_failed"
FAILED = "trigger.failed"


def new_token() -> str:
    """A fresh claim token."""
    return os.urandom(12).hex()


# -- enqueue ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EagerClaim:
    """Claim a due-now intent in the transaction that records it (saves a transaction)."""

    host_id: str
    lease_ms: int
    kinds: tuple[str, ...]


@dataclass(slots=True)
class Enqueued:
    """What ``enqueue_op`` did."""

    event: Event
    created: bool
    claimed: Claimed | None = None


def enqueue_op(
    trigger: TriggerDef,
    payload: JSON,
    text: str,
    due_at: int | None,
    idempotency_key: str | None,
    key_retention_ms: int,
    eager: EagerClaim | None = None,
) -> Callable[[LedgerTx], Enqueued]:
    """Record an intent (already validated by ``parse_intent`` and serialized as ``text``).

    With ``eager``, a due-now intent is claimed at once for that host, unless older due
    intents wait in this actor (they go first, through the scheduler).
    """

    def op(tx: LedgerTx) -> Enqueued:
        due = tx.now_ms if due_at is None else due_at
        claim = None
        if (
            eager is not None
            and due <= tx.now_ms
            and not tx.has_due_pending(eager.kinds, from_lock=True)
        ):
            # No older due intent waits, so the scheduler would claim this one next.
            claim = NewClaim(new_token(), eager.host_id, tx.now_ms + eager.lease_ms)
        event, created = tx.append_intent(
            trigger_kind=trigger.kind,
            intent_event_kind=trigger.intent_event_kind,
            payload=payload,
            due_at=due,
            idempotency_key=idempotency_key,
            key_retention_ms=key_retention_ms,
            text=text,
            claim=claim,
        )
        if claim is None or not created:
            return Enqueued(event, created)
        row = claim.row(event.id, trigger.kind, due, tx.now_ms, idempotency_key)
        # Nothing is pending now; the index only needs to know when the lease runs out.
        tx.effects.new_due = claim.lease_until
        return Enqueued(event, created, Claimed(row, payload))

    return op


# -- cancel ----------------------------------------------------------------------------------


def cancel_op(
    registry: TriggerRegistry,
    trigger: TriggerDef,
    intent_event_id: int,
    reason: str | None,
    requested_by: str | None,
) -> Callable[[LedgerTx], CancelResult]:
    """``cancel_trigger`` for a cooperative trigger (``ignored`` never reaches the ledger)."""

    def op(tx: LedgerTx) -> CancelResult:
        row = tx.intent_row(intent_event_id)
        if row is None or row.trigger_kind != trigger.kind:
            return CancelResult(status=CancelStatus.NOT_FOUND, intent_event_id=intent_event_id)
        status = IntentStatus(row.status)
        if status.terminal:
            return CancelResult(
                status=CancelStatus.ALREADY_COMPLETED,
                intent_event_id=intent_event_id,
                terminal_status=status,
            )
        first = tx.request_cancel(row.id, reason=reason, requested_by=requested_by, row=row)
        if status is IntentStatus.PENDING:
            # If commit_cancelled raises, the intent ends failed instead; say so.
            reached = _settle_cancelled(tx, registry, trigger, row, _payload(tx, row.id))
            return CancelResult(
                status=CancelStatus.CANCELLED,
                intent_event_id=intent_event_id,
                terminal_status=reached,
            )
        if first:
            tx.insert_event(
                CANCEL_REQUESTED,
                {"reason": reason, "requested_at": tx.now_ms, "requested_by": requested_by},
                row.id,
            )
        tx.note_cancel(row.id, row.claimed_by, row.cancel_reason if not first else reason)
        return CancelResult(status=CancelStatus.REQUESTED, intent_event_id=intent_event_id)

    return op


# -- claim -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Claimed:
    """An attempt this host now owns."""

    row: IntentRow
    payload: JSON


@dataclass(slots=True)
class ClaimResult:
    claimed: list[Claimed]
    more: bool
    looked_at: int = 0
    """The transaction's clock reading (taken before it began): a change that a hint
    reported before this time was visible to it."""
    next_due: int | None = None
    """When the earliest intent of the host's kinds still pending is due, after the claim: a
    later due time than the one the claim was for may have reached the scheduler only here."""


def claim_op(
    registry: TriggerRegistry,
    *,
    limit: int,
    host_id: str,
    lease_ms: int,
    dead_owners: Sequence[str],
    own_tokens: Set[str],
    max_redrives: int,
    slots: Slots,
    taken: Taken,
) -> Callable[[LedgerTx], ClaimResult]:
    """Claim up to ``limit`` attempts: redrives of lost claims first, then due intents.

    Takes one slot per claimed intent from ``slots`` and records the count in ``taken``
    (the caller gives them back if the transaction does not commit).
    """
    kinds = registry.kinds

    def op(tx: LedgerTx) -> ClaimResult:
        budget = slots.take(limit)
        if budget == 0:
            # No capacity now: the actor stays ready and is claimed when a slot frees.
            return ClaimResult([], more=True, looked_at=tx.now_ms)
        try:
            result = claim(tx, budget)
            _fold_framework_facts(tx)  # a redrive limit's failure facts
        except BaseException:
            slots.give(budget)
            raise
        slots.give(budget - len(result.claimed))
        taken.count = len(result.claimed)
        return result

    def claim(tx: LedgerTx, limit: int) -> ClaimResult:
        lease_until = tx.now_ms + lease_ms
        rows: list[IntentRow] = []
        more = False
        for row in tx.lost_claims(dead_owners):
            if row.trigger_kind not in kinds or row.claim_token in own_tokens:
                # An attempt still running here whose renewal is late is not lost.
                continue
            if row.redrives >= max_redrives:
                trigger = registry.get(row.trigger_kind)
                if row.cancel_requested_at is not None:
                    # The work was asked to stop: settle the request, not a failure.
                    _settle_cancelled(tx, registry, trigger, row, _payload(tx, row.id))
                    continue
                failure = Failure(
                    error_type="RedriveLimitExceeded",
                    message=f"the attempt was lost {row.redrives + 1} times (process crashed or "
                    f"lease expired); giving up after {max_redrives} redrives",
                    attempts=row.attempts,
                )
                _settle_failed(tx, registry, trigger, row, _payload(tx, row.id), failure)
                continue
            if len(rows) >= limit:
                more = True
                break
            rows.append(
                tx.reclaim(row, token=new_token(), host_id=host_id, lease_until=lease_until)
            )
        room = limit - len(rows)
        if room > 0:
            fresh = tx.claim_due(
                limit=room,
                host_id=host_id,
                lease_until=lease_until,
                tokens=iter(new_token, None),
                kinds=kinds,
            )
            rows += fresh
        # What is still pending: due now (the batch was full: more to claim) or later.
        next_due = tx.next_pending_due(kinds)
        if next_due is not None and next_due <= tx.now_ms:
            more = True
        payloads = tx.intent_payloads([row.id for row in rows])
        claimed = [Claimed(row, payloads.get(row.id)) for row in rows]
        return ClaimResult(claimed, more, looked_at=tx.now_ms, next_due=next_due)

    return op


def renew_op(host_id: str, tokens: Sequence[str], lease_ms: int) -> Callable[[LedgerTx], int]:
    """Extend this host's leases for the given claim tokens."""

    def op(tx: LedgerTx) -> int:
        count = tx.renew_leases(host_id, tx.now_ms + lease_ms, tokens)
        tx.effects.due_may_rise = True
        return count

    return op


# -- settle ----------------------------------------------------------------------------------


class Outcome(StrEnum):
    """How an attempt ended, as the scheduler saw it."""

    RETURNED = "returned"
    RAISED = "raised"
    TIMED_OUT = "timed_out"
    SHUTDOWN = "shutdown"


class PutBack(Exception):
    """Raised by the ``acquire`` of one of the framework's own triggers that cannot run this
    intent on this host (a workflow run of a workflow the host lacks): the claim is
    released, the intent due again at ``due_at_ms``, with no attempt spent, its redrive mark
    and any cancel request kept for the host that runs it."""

    def __init__(self, due_at_ms: int) -> None:
        super().__init__(due_at_ms)
        self.due_at_ms = due_at_ms


class Settled(StrEnum):
    """What the settle operation did."""

    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"
    RETRY = "retry"
    RESCHEDULED = "rescheduled"
    RELEASED = "released"
    LOST = "lost"
    """The claim token no longer held: another attempt owns the intent; nothing written."""


def settle_op(
    registry: TriggerRegistry,
    trigger: TriggerDef,
    intent_event_id: int,
    token: str,
    payload: JSON,
    outcome: Outcome,
    value: Any,
    backoff_s: float,
) -> Callable[[LedgerTx], Settled]:
    """End an attempt: commit, commit_cancelled, retry, fail, or release (shutdown, or an
    intent put back for another host: ``PutBack``).

    The facts the trigger's own functions write must suit the actor's projections, or the
    function fails (``ProjectionError``). The framework's facts (``trigger.failed``, an
    attempt's failure) are written whatever the projections make of them: one that cannot take
    them is left behind, with a warning, rather than hold the intent unsettled (its attempt
    would be run again and again).
    """

    def op(tx: LedgerTx) -> Settled:
        settled = settle(tx)
        _fold_framework_facts(tx)
        return settled

    def settle(tx: LedgerTx) -> Settled:
        row = tx.intent_row(intent_event_id)
        if row is None or row.status != IntentStatus.RUNNING or row.claim_token != token:
            return Settled.LOST
        if outcome is Outcome.SHUTDOWN:
            tx.release(row.id, token, due_at=tx.now_ms, count_attempt=False, redrive=True)
            return Settled.RELEASED
        if outcome is Outcome.RETURNED:
            return _settle_completed(tx, registry, trigger, row, payload, value)
        error: BaseException = value
        if outcome is Outcome.RAISED and isinstance(error, PutBack):
            due, redrive = error.due_at_ms, bool(row.redrive)
            tx.release(row.id, token, due_at=due, count_attempt=False, redrive=redrive)
            return Settled.RELEASED
        cancel_requested = row.cancel_requested_at is not None
        if cancel_requested or (outcome is Outcome.RAISED and isinstance(error, AbortError)):
            if not cancel_requested:
                assert isinstance(error, AbortError)
                tx.request_cancel(
                    row.id, reason=reason_text(error.reason), requested_by=None, row=row
                )
            reached = _settle_cancelled(tx, registry, trigger, row, payload)
            return Settled.CANCELLED if reached is IntentStatus.CANCELLED else Settled.FAILED
        failure = Failure(
            error_type="TimeoutError" if outcome is Outcome.TIMED_OUT else type(error).__name__,
            message=(
                f"attempt exceeded the trigger's timeout of {trigger.timeout}s"
                if outcome is Outcome.TIMED_OUT
                else describe(error)
            ),
            attempts=row.attempts,
        )
        fatal = isinstance(error, FatalError | IntentRejectedError)
        if fatal or row.attempts >= trigger.retry.max_attempts:
            _settle_failed(tx, registry, trigger, row, payload, failure)
            return Settled.FAILED
        retry_at = tx.now_ms + round(backoff_s * 1000)
        tx.insert_event(
            ATTEMPT_FAILED,
            {**failure.model_dump(), "attempt": row.attempts, "retry_at": retry_at},
            row.id,
        )
        tx.release(row.id, token, due_at=retry_at, count_attempt=True, redrive=False)
        return Settled.RETRY

    return op


def _fold_framework_facts(tx: LedgerTx) -> None:
    """Fold the framework's facts into the projections, or leave a projection that cannot take
    them behind (a warning; reading it raises until its ``apply`` is fixed): an intent's end
    must not wait on user code that is not the trigger's own."""
    try:
        tx.flush_projections()
    except ProjectionError as exc:
        _log.warning("projection_left_behind", actor=tx.actor_id, error=str(exc))
        tx.discard_pending_events()


def _settle_completed(
    tx: LedgerTx,
    registry: TriggerRegistry,
    trigger: TriggerDef,
    row: IntentRow,
    payload: JSON,
    outcome: Any,
) -> Settled:
    utx = Tx(tx, row.id, registry)
    if row.cancel_requested_at is not None:
        utx._cancel_reason = (row.cancel_reason,)
    try:
        with tx.savepoint():
            _call_sync(trigger, "commit", trigger.commit, outcome, utx)
    except Exception as exc:
        failure = Failure(
            error_type=type(exc).__name__, message=describe(exc), attempts=row.attempts
        )
        _settle_failed(tx, registry, trigger, row, payload, failure)
        return Settled.FAILED
    finally:
        utx._close()
    if utx.rescheduled_at is not None:
        if row.cancel_requested_at is not None:
            # A cancel was requested while this occurrence ran: its facts stand, and the
            # series ends here, cancelled (another attempt, started aborted, could return
            # again and again if its acquire does not look at the signal).
            reached = _settle_cancelled(tx, registry, trigger, row, payload)
            return Settled.CANCELLED if reached is IntentStatus.CANCELLED else Settled.FAILED
        tx.reschedule(row.id, utx.rescheduled_at)
        return Settled.RESCHEDULED
    tx.finish(row.id, IntentStatus.COMPLETED, utx.event_ids)
    return Settled.COMPLETED


def _settle_cancelled(
    tx: LedgerTx, registry: TriggerRegistry, trigger: TriggerDef, row: IntentRow, payload: JSON
) -> IntentStatus:
    cancellation = Cancellation(
        reason=row.cancel_reason,
        requested_at=(
            None if row.cancel_requested_at is None else ms_to_datetime(row.cancel_requested_at)
        ),
        requested_by=row.cancel_requested_by,
    )
    utx = Tx(tx, row.id, registry)
    try:
        with tx.savepoint():
            _call_sync(
                trigger, "commit_cancelled", trigger.commit_cancelled, _intent(trigger, payload),
                cancellation, utx,
            )  # fmt: skip
    except Exception as exc:
        failure = Failure(
            error_type=type(exc).__name__, message=describe(exc), attempts=row.attempts
        )
        _settle_failed(tx, registry, trigger, row, payload, failure)
        return IntentStatus.FAILED
    finally:
        utx._close()
    tx.finish(row.id, IntentStatus.CANCELLED, utx.event_ids)
    return IntentStatus.CANCELLED


def _settle_failed(
    tx: LedgerTx,
    registry: TriggerRegistry,
    trigger: TriggerDef,
    row: IntentRow,
    payload: JSON,
    failure: Failure,
) -> None:
    """Fail the intent: ``commit_failed``'s facts (if any), then the ``trigger.failed`` fact.

    The framework's failure fact is always written, last, so every failed intent carries its
    error type, message and attempts in the same place, whatever the trigger records.
    """
    event_ids: list[int] = []
    if trigger.commit_failed is not None:
        utx = Tx(tx, row.id, registry)
        try:
            with tx.savepoint():
                _call_sync(
                    trigger, "commit_failed", trigger.commit_failed, _intent(trigger, payload),
                    failure, utx,
                )  # fmt: skip
        except Exception as exc:
            failure = Failure(
                error_type=failure.error_type,
                message=(
                    f"{failure.message} (and commit_failed raised {type(exc).__name__}:"
                    f" {describe(exc)})"
                ),
                attempts=failure.attempts,
            )
        else:
            event_ids = utx.event_ids
        finally:
            utx._close()
    event = tx.insert_event(FAILED, failure.model_dump(), row.id)
    tx.finish(row.id, IntentStatus.FAILED, [*event_ids, event.id])


def _call_sync(trigger: TriggerDef, key: str, fn: Callable[..., Any], *args: Any) -> None:
    result = fn(*args)
    if inspect.isawaitable(result):
        close = getattr(result, "close", None)
        if close is not None:
            close()
        raise TriggerDefinitionError(
            trigger.kind, key, "returned an awaitable; it must be synchronous (its writes were "
            "rolled back)",
        )  # fmt: skip


def _intent(trigger: TriggerDef, payload: JSON) -> Any:
    """The typed intent, or the raw payload if it no longer parses."""
    try:
        return trigger.parse(payload)
    except IntentRejectedError:
        return payload


def _payload(tx: LedgerTx, intent_event_id: int) -> JSON:
    return tx.intent_payloads([intent_event_id]).get(intent_event_id)
