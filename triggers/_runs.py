"""Starting and following workflow runs: ``start``, ``get_run``, ``Run``."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ledger import JSON, Event, IntentState, IntentStatus

from ._engine import CANCEL_REQUESTED
from ._errors import IntentRejectedError, UnknownTriggerError
from ._results import CancelResult, CancelStatus, Failure
from ._workflow import (
    RUN_COMPLETED,
    RUN_FAILED,
    WORKFLOW_KIND,
    RunCancelledError,
    Workflow,
    WorkflowError,
    check_actor,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from ledger import LedgerTx

    from ._abort import AbortSignal

T = TypeVar("T")

__all__ = ["Run", "RunFailedError", "get_run", "start"]


class WorkflowActor(Protocol):
    """What runs need of an actor (``actors.Agent`` is one)."""

    @property
    def actor_id(self) -> str: ...

    async def enqueue_trigger(self, *, trigger_kind: str, payload: JSON = None) -> Event: ...

    async def intent(self, intent_event_id: int) -> IntentState: ...

    async def wait_for_intent(self, intent_event_id: int) -> IntentState: ...

    def stream(self, intent_event_id: int, *, start: int = 0) -> AsyncIterator[JSON]: ...

    def call(self, *, trigger_kind: str, payload: JSON, signal: AbortSignal | None) -> Any: ...

    async def events(
        self, *, kinds: Sequence[str] | None = None, intent_event_id: int | None = None
    ) -> list[Event]: ...

    async def _ledger_op(self, fn: Callable[[LedgerTx], T], *, write: bool = True) -> T | None:
        """Run a ledger operation on the actor (None if it has no ledger)."""
        ...


class RunFailedError(WorkflowError):
    """The run failed: its body raised, or storage failed past its retries.

    Attributes:
        failure: the recorded failure (error type, message, attempts).
    """

    def __init__(self, failure: Failure) -> None:
        self.failure = failure
        super().__init__(f"workflow run failed: {failure.error_type}: {failure.message}")


class Run:
    """A workflow run, from ``start`` or ``get_run``; usable from any process.

    Attributes:
        run_id: the run's id (its intent's id in the actor's ledger).
        actor_id: the actor whose ledger holds the run.
    """

    __slots__ = ("_actor", "run_id")

    def __init__(self, actor: WorkflowActor, run_id: int) -> None:
        self._actor = actor
        self.run_id = run_id

    def __repr__(self) -> str:
        return f"<Run {self.run_id} of {self._actor.actor_id!r}>"

    @property
    def actor_id(self) -> str:
        """The actor whose ledger holds the run."""
        return self._actor.actor_id

    async def status(self) -> IntentStatus:
        """``pending`` (not started, or asleep), ``running``, ``completed``, ``cancelled`` or
        ``failed``."""
        return (await self._actor.intent(self.run_id)).status

    async def result(self) -> Any:
        """Wait for the run to end; returns the workflow's return value.

        Raises:
            RunCancelledError: the run was cancelled (``.reason`` says why).
            RunFailedError: the run failed.
        """
        state = await self._actor.wait_for_intent(self.run_id)
        if state.status is IntentStatus.CANCELLED:
            raise RunCancelledError(state.cancel_reason)
        facts = await self._actor.events(intent_event_id=self.run_id)
        if state.status is IntentStatus.COMPLETED:
            (done,) = [e for e in facts if e.kind == RUN_COMPLETED]
            assert isinstance(done.payload, dict)
            return done.payload["result"]
        failed = [e for e in facts if e.kind == "trigger.failed"]
        if failed and isinstance(failed[-1].payload, dict):
            raise RunFailedError(_run_failure(facts, Failure.model_validate(failed[-1].payload)))
        raise RunFailedError(
            Failure(error_type="Unknown", message="no failure fact", attempts=state.attempts)
        )

    def get_readable(self, *, start: int = 0) -> AsyncIterator[JSON]:
        """The run's output stream (``get_writable()`` chunks) from index ``start``, followed
        until the run ends, whatever the way it ends."""
        return self._actor.stream(self.run_id, start=start)

    async def cancel(self, reason: str | None = None) -> CancelResult:
        """Cancel the run; the answer is ``requested`` unless it had ended
        (``already_completed``, with ``terminal_status``). Cancelling twice is harmless.

        A running run gets ``RunCancelledError`` at the call its body awaits (a step already
        running finishes and is recorded first) or, with none, at its next call. A run that
        waits (asleep, on a hook, in a retry backoff) is resumed at once: its body is
        replayed to where it waits, which raises ``RunCancelledError``. Either way its
        ``finally`` blocks run, cleanup steps included, and ``result()`` then raises
        ``RunCancelledError`` (unless the body catches it and returns: the run then ends
        ``completed`` with that value). A run that never started ends without running its
        body.

        (``cancel_trigger`` on the actor ends a waiting run at once, without its ``finally``
        blocks.)

        Raises:
            TypeError: ``reason`` is not a str or None.
        """
        if reason is not None and not isinstance(reason, str):
            raise TypeError("reason must be a str or None")
        run_id = self.run_id

        # As cancel_trigger does, except for a waiting run: cancel_trigger would settle it in
        # this transaction, never running its body again; it is woken instead.
        def op(tx: LedgerTx) -> CancelResult:
            row = tx.intent_row(run_id)
            if row is None or row.trigger_kind != WORKFLOW_KIND:
                return CancelResult(status=CancelStatus.NOT_FOUND, intent_event_id=run_id)
            status = IntentStatus(row.status)
            if status.terminal:
                return CancelResult(
                    status=CancelStatus.ALREADY_COMPLETED,
                    intent_event_id=run_id,
                    terminal_status=status,
                )
            first = tx.request_cancel(run_id, reason=reason, requested_by=None)
            if first:
                fact = {"reason": reason, "requested_at": tx.now_ms, "requested_by": None}
                tx.insert_event(CANCEL_REQUESTED, fact, run_id)
            if status is IntentStatus.RUNNING:
                tx.note_cancel(run_id, row.claimed_by, reason if first else row.cancel_reason)
            else:
                # Waiting: its next attempt, now, starts cancelled and ends where it waits.
                tx.wake(run_id, tx.now_ms)
            return CancelResult(status=CancelStatus.REQUESTED, intent_event_id=run_id)

        found = await self._actor._ledger_op(op)
        return found or CancelResult(status=CancelStatus.NOT_FOUND, intent_event_id=run_id)


def _run_failure(facts: Sequence[Event], failure: Failure) -> Failure:
    """The failure of a run: the error its body raised, from its ``run_failed`` fact, when that
    is what ended it (the framework's ``failure`` then names the ``FatalError`` that stopped
    the retries); else ``failure`` (storage trouble past the retries, a redrive limit)."""
    body = [e.payload for e in facts if e.kind == RUN_FAILED and isinstance(e.payload, dict)]
    if body:
        error_type, message = str(body[-1]["error_type"]), str(body[-1]["message"])
        if failure.error_type == "FatalError" and failure.message == f"{error_type}: {message}":
            return Failure(error_type=error_type, message=message, attempts=failure.attempts)
    return failure


async def start(
    wf: Workflow[..., Any],
    args: Sequence[JSON] = (),
    *,
    actor: WorkflowActor,
    signal: AbortSignal | None = None,
) -> Run:
    """Start a run of ``wf`` with ``args`` in the ledger of ``actor``.

    ``signal``, if given, cancels the run (durably, through the actor's ``cancel_trigger``)
    when it aborts, for as long as this process runs: a waiting run then ends at once, without
    its ``finally`` blocks (``Run.cancel`` runs them). A hook is the durable way to cancel
    from elsewhere. An already aborted signal raises before anything is written.

    Raises:
        TypeError: ``args`` is not a list (or tuple) of arguments: ``start(wf, ["x"])``, or
            the body cannot be called with them (too many, too few), or ``actor`` is not an
            actor's handle (``host.get(name)``).
        AbortError: ``signal`` is already aborted; nothing was written.
        WorkflowError: ``wf`` is not registered on the actor's class
            (``define_agent_do(workflows=[...])``).
        ledger.PayloadError: ``args`` are not JSON values.
    """
    if not isinstance(wf, Workflow):
        raise TypeError(f"start() needs a @workflow function, not {wf!r}")
    check_actor(actor)
    if isinstance(args, str | bytes) or not isinstance(args, Sequence):
        raise TypeError(f"start() takes the body's arguments as a list, not {args!r}")
    _check_arguments(wf, args)
    payload = {"workflow": wf.name, "args": list(args)}
    try:
        if signal is None:
            event = await actor.enqueue_trigger(trigger_kind=WORKFLOW_KIND, payload=payload)
            return Run(actor, event.id)
        # A call handle turns the signal's abort into a durable cancel of the run.
        handle = actor.call(trigger_kind=WORKFLOW_KIND, payload=payload, signal=signal)
        return Run(actor, await handle.wait_recorded())
    except (UnknownTriggerError, IntentRejectedError):
        raise WorkflowError(
            f"workflow {wf.name!r} is not registered on this actor class: "
            "pass it in define_agent_do(workflows=[...])"
        ) from None


def _check_arguments(wf: Workflow[..., Any], args: Sequence[JSON]) -> None:
    """Refuse, before anything is written, arguments the body cannot be called with (the run
    would fail at once)."""
    try:
        signature = inspect.signature(wf.fn)
    except (TypeError, ValueError):  # no signature to check against: the run will tell
        return
    try:
        signature.bind(*args)
    except TypeError as exc:
        empty = inspect.Parameter.empty
        bare = signature.replace(
            parameters=[p.replace(annotation=empty) for p in signature.parameters.values()],
            return_annotation=empty,
        )
        raise TypeError(
            f"workflow {wf.name!r} takes {bare}, not {len(args)} argument(s): {exc}"
        ) from None


async def get_run(run_id: int, *, actor: WorkflowActor) -> Run:
    """Reconnect to a run by its id, from any process.

    Raises:
        TypeError: ``actor`` is not an actor's handle (``host.get(name)``).
        ledger.IntentNotFoundError: no intent with that id in the actor's ledger.
        WorkflowError: the intent is not a workflow run.
    """
    check_actor(actor)
    state = await actor.intent(run_id)
    if state.trigger_kind != WORKFLOW_KIND:
        raise WorkflowError(f"intent {run_id} of {actor.actor_id!r} is not a workflow run")
    return Run(actor, run_id)
