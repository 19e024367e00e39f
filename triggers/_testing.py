"""``TriggerEnvironment``: a trigger's functions against an in-memory ledger (see
``triggers.testing``)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from ledger import JSON, Clock, Event, dump_json, ms_to_datetime, system_clock

from ._abort import AbortController, AbortSignal, describe
from ._context import TriggerContext
from ._engine import _call_sync
from ._results import Cancellation, Failure
from ._spec import TriggerRegistry, as_payload
from ._tx import Tx

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping
    from datetime import datetime

    from pydantic import BaseModel

    from ledger import LedgerTx

    from ._spec import DurableTrigger, TriggerDef


class TriggerEnvironment:
    """One trigger, an in-memory ledger and a controllable attempt, for unit tests.

    Each :meth:`acquire` call records a new intent (as ``enqueue_trigger`` would) and runs one
    attempt of it; the commit methods then settle that intent. Everything written is in
    :attr:`events`.

    Args:
        trigger: the trigger under test (validated like a registration: a bad spec raises
            ``TriggerDefinitionError``).
        triggers: other triggers its commits may ``tx.enqueue``.
        actor_id: the actor the context reports.
        bindings: what ``ctx.bindings`` holds (fakes of your clients, usually).
        clock: epoch-millisecond time source for ``ctx.now()``, ``tx.now`` and event times.
        attempt: ``ctx.attempt`` of the attempts run.
        redrive: ``ctx.redrive`` of the attempts run.
    """

    def __init__(
        self,
        trigger: DurableTrigger[Any, Any],
        *,
        triggers: Iterable[DurableTrigger[Any, Any]] = (),
        actor_id: str = "test-actor",
        bindings: Mapping[str, Any] | None = None,
        clock: Clock = system_clock,
        attempt: int = 1,
        redrive: bool = False,
    ) -> None:
        self._registry = TriggerRegistry([trigger, *triggers])
        self.trigger: TriggerDef = self._registry.get(trigger["kind"])
        self.actor_id = actor_id
        self.bindings = dict(bindings or {})
        self.attempt = attempt
        self.redrive = redrive
        self._ledger = _MemoryLedger(actor_id, clock)
        self._controller = AbortController()
        self._intent: tuple[int, JSON] | None = None
        self.context: TriggerContext | None = None
        """The context of the latest attempt (``None`` before the first)."""
        self.rescheduled_at: datetime | None = None
        """Where the latest ``commit`` rescheduled the intent with ``tx.reschedule``, if it did."""

    # -- what the attempt sees and leaves --------------------------------------------------

    @property
    def events(self) -> list[Event]:
        """Every event of the in-memory ledger, in id order."""
        return list(self._ledger.events)

    @property
    def signal(self) -> AbortSignal:
        """The signal of the current attempt (or of the next one, before it starts)."""
        return self._controller.signal

    @property
    def intent_event_id(self) -> int | None:
        """The id of the latest intent, ``None`` before the first ``acquire``."""
        return None if self._intent is None else self._intent[0]

    @property
    def streamed(self) -> list[JSON]:
        """The chunks the latest attempt wrote to ``ctx.stream``, in order."""
        if self._intent is None:
            return []
        return list(self._ledger.chunks.get(self._intent[0], []))

    def record_event(self, kind: str, payload: JSON = None) -> Event:
        """Seed the ledger with an event that ``ctx.events()`` will read.

        Raises:
            ledger.PayloadError: ``payload`` is not storable as JSON.
        """
        return self._ledger.insert_event(kind, payload)

    def cancel(self, reason: str | None = None) -> None:
        """Cancel the work: abort the running attempt's signal with ``reason``.

        Called between attempts, the next attempt starts with its signal already aborted, as
        a redrive after a cancel does. A trigger declared ``cancellation: "ignored"`` is left
        alone, as a host leaves it (``cancel_trigger`` answers ``ignored``).
        """
        if self.trigger.cancellation == "ignored":
            return
        self._controller.abort(reason)

    async def wait_streamed(self, count: int) -> list[JSON]:
        """Wait until the latest attempt has streamed at least ``count`` chunks; returns them.

        It waits for as long as it takes: bound it (``anyio.fail_after``) in a test where the
        chunks might never come.
        """
        while len(self.streamed) < count:
            await self._ledger.stream_changed.wait()
        return self.streamed

    # -- running the trigger's functions ---------------------------------------------------

    async def acquire(self, payload: JSON | BaseModel = None) -> Any:
        """Record an intent with ``payload`` and run one attempt of ``acquire``.

        The payload goes through ``parse_intent`` and JSON first, as ``enqueue_trigger``
        would do; ``acquire`` gets the intent parsed from the stored JSON, as on a host. An
        attempt's signal is fresh unless :meth:`cancel` came before it.

        Returns:
            What ``acquire`` returned (the outcome ``commit`` takes).

        Raises:
            IntentRejectedError: ``parse_intent`` refused the payload.
            ledger.PayloadError: the payload is not storable as JSON.
            Exception: whatever ``acquire`` raised (``AbortError`` when it honoured a cancel).
        """
        trigger = self.trigger
        payload = as_payload(payload)
        trigger.parse(payload)  # refuse before recording, as enqueue_trigger does
        event, _ = self._ledger.append_intent(
            trigger_kind=trigger.kind,
            intent_event_kind=trigger.intent_event_kind,
            payload=payload,
            due_at=self._ledger.now_ms,
        )
        self._intent = (event.id, event.payload)
        # A host hands acquire the intent parsed from the stored JSON, not the caller's object.
        intent = trigger.parse(event.payload)
        controller = self._controller
        ctx = TriggerContext(
            backend=_Backend(self._ledger),
            signal=controller.signal,
            actor_id=self.actor_id,
            trigger_kind=trigger.kind,
            intent_event_id=event.id,
            attempt=self.attempt,
            redrive=self.redrive,
            bindings=self.bindings,
            log=structlog.get_logger("triggers").bind(
                actor=self.actor_id, kind=trigger.kind, intent=event.id, attempt=self.attempt
            ),
        )
        self.context = ctx
        try:
            return await trigger.start(intent, ctx)
        finally:
            if controller.signal.aborted and self._controller is controller:
                self._controller = AbortController()  # this attempt's cancel is spent

    def commit(self, outcome: Any) -> list[Event]:
        """Run ``commit(outcome, tx)`` for the latest intent; returns the facts it wrote.

        Raises:
            RuntimeError: no intent was acquired yet.
            Exception: whatever ``commit`` raised (its writes are rolled back).
        """
        trigger = self.trigger
        self.rescheduled_at = None
        tx = self._run_commit("commit", trigger.commit, outcome)
        if tx.rescheduled_at is not None:
            self.rescheduled_at = ms_to_datetime(tx.rescheduled_at)
        return self._facts(tx)

    def commit_cancelled(
        self, reason: str | None = None, *, requested_by: str | None = None
    ) -> list[Event]:
        """Run ``commit_cancelled(intent, cancellation, tx)`` for the latest intent.

        Returns:
            The facts it wrote.

        Raises:
            RuntimeError: no intent was acquired yet.
            Exception: whatever ``commit_cancelled`` raised (its writes are rolled back).
        """
        cancellation = Cancellation(
            reason=reason,
            requested_at=ms_to_datetime(self._ledger.now_ms),
            requested_by=requested_by,
        )
        trigger = self.trigger
        tx = self._run_commit(
            "commit_cancelled", trigger.commit_cancelled, self._typed_intent(), cancellation
        )
        return self._facts(tx)

    def commit_failed(self, failure: Failure | BaseException) -> list[Event]:
        """Run ``commit_failed(intent, failure, tx)`` for the latest intent.

        An exception is turned into the ``Failure`` the host would pass (type, message,
        ``attempt``). The host also records its own ``trigger.failed`` fact after these.

        Returns:
            The facts it wrote (none when the trigger has no ``commit_failed``).

        Raises:
            RuntimeError: no intent was acquired yet.
            Exception: whatever ``commit_failed`` raised (its writes are rolled back).
        """
        if isinstance(failure, BaseException):
            failure = Failure(
                error_type=type(failure).__name__, message=describe(failure), attempts=self.attempt
            )
        commit_failed = self.trigger.commit_failed
        if commit_failed is None:
            self._current()
            return []
        tx = self._run_commit("commit_failed", commit_failed, self._typed_intent(), failure)
        return self._facts(tx)

    # -- internals -------------------------------------------------------------------------

    def _current(self) -> tuple[int, JSON]:
        if self._intent is None:
            raise RuntimeError("no intent yet: run `await env.acquire(payload)` first")
        return self._intent

    def _typed_intent(self) -> Any:
        return self.trigger.parse(self._current()[1])

    def _run_commit(self, key: str, fn: Any, *args: Any) -> Tx:
        intent_event_id, _ = self._current()
        tx = Tx(self._ledger, intent_event_id, self._registry)
        with self._ledger.transaction():
            try:
                _call_sync(self.trigger, key, fn, *args, tx)
            finally:
                tx._close()
        return tx

    def _facts(self, tx: Tx) -> list[Event]:
        ids = set(tx.event_ids)
        return [event for event in self._ledger.events if event.id in ids]


class _MemoryLedger:
    """The in-memory ledger behind a ``TriggerEnvironment`` (a ``TxLedger`` and a
    ``ContextBackend``)."""

    def __init__(self, actor_id: str, clock: Clock) -> None:
        self.actor_id = actor_id
        self._clock = clock
        self.events: list[Event] = []
        self.chunks: dict[int, list[JSON]] = {}
        self.stream_changed = anyio.Event()
        self.keys: dict[str, tuple[str, Event]] = {}
        """Idempotency key -> (trigger kind, intent event) of intents enqueued with one."""

    @property
    def now_ms(self) -> int:
        return int(self._clock())

    def transaction(self) -> _Rollback:
        return _Rollback(self.events)

    def announce(self, topic: str, data: JSON) -> None:
        """Notices have no followers in a test environment."""

    def insert_event(
        self,
        kind: str,
        payload: JSON,
        intent_event_id: int | None = None,
        *,
        text: str | None = None,
    ) -> Event:
        if not isinstance(kind, str) or not kind:
            raise ValueError("event kind must be a non-empty str")
        if text is None:
            text = dump_json(payload)
        event_id = len(self.events) + 1
        event = Event(
            id=event_id,
            ts=self.now_ms,
            kind=kind,
            payload=json.loads(text),
            intent_event_id=intent_event_id,
        )
        self.events.append(event)
        return event

    def append_intent(
        self,
        *,
        trigger_kind: str,
        intent_event_kind: str,
        payload: JSON,
        due_at: int,
        idempotency_key: str | None = None,
        key_retention_ms: int | None = None,
        text: str | None = None,
    ) -> tuple[Event, bool]:
        if idempotency_key is not None:
            held = self.keys.get(idempotency_key)
            # A key whose intent was rolled back with its transaction is free again.
            if held is not None and self._kept(held[1]):
                kind, event = held
                if kind != trigger_kind:
                    raise ValueError(
                        f"idempotency key {idempotency_key!r} is held by intent {event.id}"
                        f" of trigger {kind!r}, not of {trigger_kind!r}"
                    )
                return event, False
        if text is None:
            text = dump_json(payload)
        event_id = len(self.events) + 1
        event = self.insert_event(intent_event_kind, payload, event_id, text=text)
        if idempotency_key is not None:
            self.keys[idempotency_key] = (trigger_kind, event)
        return event, True

    def _kept(self, event: Event) -> bool:
        """True unless ``event`` was rolled back with its transaction."""
        return event.id <= len(self.events) and self.events[event.id - 1] is event


class _Backend:
    """``ctx``'s view of a ``_MemoryLedger`` (a ``ContextBackend``)."""

    def __init__(self, ledger: _MemoryLedger) -> None:
        self._ledger = ledger

    def now_ms(self) -> int:
        return self._ledger.now_ms

    def version(self, actor_id: str) -> int:
        return len(self._ledger.events)

    async def wait_changed(self, actor_id: str, version: int) -> None:
        while len(self._ledger.events) <= version:
            await self._ledger.stream_changed.wait()

    async def read_events(
        self,
        actor_id: str,
        *,
        after: int,
        kinds: list[str] | None,
        intent_event_id: int | None,
        limit: int | None,
    ) -> list[Event]:
        kind_set = None if kinds is None else set(kinds)
        found = [
            event
            for event in self._ledger.events
            if event.id > after
            and (kind_set is None or event.kind in kind_set)
            and (intent_event_id is None or event.intent_event_id == intent_event_id)
        ]
        return found if limit is None else found[:limit]

    async def record_fact(
        self,
        actor_id: str,
        intent_event_id: int,
        claim_token: str | None,
        kind: str,
        payload: JSON,
        text: str,
        check: Callable[[LedgerTx], None] | None = None,
    ) -> Event:
        # No SQLite ledger here: checks that read one (workflow hooks) do not apply.
        return self._ledger.insert_event(kind, payload, intent_event_id, text=text)

    async def stream_append(
        self, actor_id: str, intent_event_id: int, claim_token: str | None, text: str
    ) -> int:
        ledger = self._ledger
        chunks = ledger.chunks.setdefault(intent_event_id, [])
        chunks.append(json.loads(text))
        changed, ledger.stream_changed = ledger.stream_changed, anyio.Event()
        changed.set()
        return len(chunks) - 1


class _Rollback:
    """Drops the events appended inside the block when it raises."""

    def __init__(self, events: list[Event]) -> None:
        self._events = events
        self._mark = len(events)

    def __enter__(self) -> None:
        self._mark = len(self._events)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            del self._events[self._mark :]
