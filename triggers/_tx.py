"""``Tx``: the transaction a commit function writes its facts through."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ledger import JSON, Event, datetime_to_ms, dump_json, ms_to_datetime

from ._spec import RESERVED_PREFIX, as_payload, check_idempotency_key

if TYPE_CHECKING:
    from datetime import datetime

    from pydantic import BaseModel

    from ._spec import TriggerRegistry


class TxLedger(Protocol):
    """What ``Tx`` needs of a ledger transaction (``ledger.LedgerTx``; tests may fake it)."""

    @property
    def actor_id(self) -> str: ...

    @property
    def now_ms(self) -> int: ...

    def insert_event(
        self,
        kind: str,
        payload: JSON,
        intent_event_id: int | None = None,
        *,
        text: str | None = ...,
    ) -> Event: ...

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
    ) -> tuple[Event, bool]: ...

    def announce(self, topic: str, data: JSON) -> None: ...


class Tx:
    """The commit transaction of one intent (synchronous: no I/O, no awaits).

    Everything written through it lands atomically with the intent's terminal transition,
    or not at all.

    Attributes:
        actor_id: the actor whose ledger this is.
        intent_event_id: the intent being settled.
    """

    __slots__ = ("_cancel_reason", "_closed", "_ledger", "_registry", "actor_id", "event_ids",
                 "intent_event_id", "rescheduled_at")  # fmt: skip

    def __init__(self, ledger: TxLedger, intent_event_id: int, registry: TriggerRegistry) -> None:
        self._ledger = ledger
        self._registry = registry
        self._closed = False
        self.actor_id = ledger.actor_id
        self.intent_event_id = intent_event_id
        self.event_ids: list[int] = []
        self.rescheduled_at: int | None = None
        self._cancel_reason: tuple[str | None] | None = None
        """Set by the engine for the framework's own triggers: ``(reason,)`` if a cancel was
        requested while the attempt being committed ran."""

    @property
    def now(self) -> datetime:
        """The transaction's time (UTC)."""
        return ms_to_datetime(self._ledger.now_ms)

    def insert_event(self, *, kind: str, payload: JSON = None) -> Event:
        """Append a fact about this intent; returns it with its id.

        Raises:
            ValueError: ``kind`` is empty or uses the reserved ``trigger.`` prefix.
            ledger.PayloadError: ``payload`` is not storable as JSON.
            RuntimeError: the commit function has already returned.
        """
        self._check_open()
        if not isinstance(kind, str) or not kind:
            raise ValueError("event kind must be a non-empty str")
        if kind.startswith(RESERVED_PREFIX):
            raise ValueError(f"event kinds starting with {RESERVED_PREFIX!r} are reserved")
        event = self._ledger.insert_event(kind, payload, self.intent_event_id)
        self.event_ids.append(event.id)
        return event

    def enqueue(
        self,
        *,
        trigger_kind: str,
        payload: JSON | BaseModel = None,
        at: datetime | None = None,
        idempotency_key: str | None = None,
    ) -> Event:
        """Record a new intent atomically with this commit; returns its intent event.

        ``payload`` is JSON or a pydantic model instance, as for ``enqueue_trigger``.

        Raises:
            UnknownTriggerError: no trigger of that kind is registered.
            IntentRejectedError: its ``parse_intent`` refused the payload.
            TypeError, ValueError: ``at`` is not a timezone-aware datetime, or
                ``idempotency_key`` is not a str, is reserved (``trigger.``) or is held by an
                intent of another trigger kind.
        """
        self._check_open()
        check_idempotency_key(idempotency_key)
        trigger = self._registry.get(trigger_kind)
        payload = as_payload(payload)
        trigger.parse(payload)
        text = dump_json(payload)
        due = self._ledger.now_ms if at is None else datetime_to_ms(at, "at")
        event, _ = self._ledger.append_intent(
            trigger_kind=trigger.kind,
            intent_event_kind=trigger.intent_event_kind,
            payload=payload,
            due_at=due,
            idempotency_key=idempotency_key,
            text=text,
        )
        return event

    def reschedule(self, at: datetime) -> None:
        """Run this intent again at ``at`` instead of ending it (a recurring trigger).

        The facts written in this commit still land; the intent goes back to ``pending`` with
        its attempts reset.

        Raises:
            TypeError, ValueError: ``at`` is not a timezone-aware datetime.
        """
        self._check_open()
        self.rescheduled_at = datetime_to_ms(at, "at")

    def _insert_framework_event(self, kind: str, payload: JSON) -> Event:
        """Append a ``trigger.`` fact (for the framework's own triggers only)."""
        self._check_open()
        assert kind.startswith(RESERVED_PREFIX)
        event = self._ledger.insert_event(kind, payload, self.intent_event_id)
        self.event_ids.append(event.id)
        return event

    def _announce(self, topic: str, data: JSON) -> None:
        """Tell followers in every process once committed (for the framework's triggers)."""
        self._check_open()
        self._ledger.announce(topic, data)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this commit transaction has ended; keep no reference to it")

    def _close(self) -> None:
        self._closed = True
