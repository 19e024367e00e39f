"""``Agent``: the handle to one actor, as returned by ``ActorHost.get(name)``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from ledger import (
    JSON,
    Event,
    IntentNotFoundError,
    IntentRow,
    IntentState,
    IntentStatus,
    LedgerClosedError,
    LedgerNotFoundError,
    LedgerTx,
    Projection,
    check_event_id,
    check_events_query,
    check_position,
    check_text,
    datetime_to_ms,
    dump_json,
)
from triggers import AbortSignal, CancelResult, CancelStatus
from triggers._engine import cancel_op, enqueue_op
from triggers._spec import as_payload, check_idempotency_key

from ._call import CallHandle
from ._errors import HostClosedError

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
    from datetime import datetime

    from pydantic import BaseModel

    from ._host import ActorHost

_PAGE = 500
T = TypeVar("T")


def _check_status(status: object) -> None:
    """Refuse anything but an intent status, naming the valid ones."""
    if status not in _STATUSES:
        valid = ", ".join(repr(value) for value in _STATUSES)
        raise ValueError(f"status must be one of {valid}, not {status!r}")


_STATUSES = tuple(status.value for status in IntentStatus)


async def _run(host: ActorHost, actor_id: str, fn: Callable[[LedgerTx], T], **options: Any) -> T:
    """``host.store.run``, raising ``HostClosedError`` when the host is not running."""
    try:
        return await host.store.run(actor_id, fn, **options)
    except LedgerClosedError:
        raise HostClosedError from None


class Agent:
    """One actor: enqueue and cancel its work, read its ledger.

    Cheap to create; holds no connection. Every method may be called from any task.
    """

    __slots__ = ("_host", "actor_id")

    def __init__(self, host: ActorHost, actor_id: str) -> None:
        self._host = host
        self.actor_id = actor_id

    def __repr__(self) -> str:
        return f"Agent({self.actor_id!r})"

    # -- work -----------------------------------------------------------------------------

    async def enqueue_trigger(
        self,
        *,
        trigger_kind: str,
        payload: JSON | BaseModel = None,
        at: datetime | None = None,
        idempotency_key: str | None = None,
    ) -> Event:
        """Record an intent for ``trigger_kind``; returns the intent event (its ``id`` is the
        intent's id).

        The payload is JSON, or a pydantic model instance (the trigger's intent model, say),
        stored as its JSON form (``model_dump(mode="json")``). It is validated by the
        trigger's ``parse_intent`` before anything is written. With an ``idempotency_key``,
        a live intent (or one that ended within the host's ``idempotency_retention``) holding
        the same key is returned instead of a new one, atomically across processes. Keys
        are per actor: a key held by an intent of another trigger kind is an error, keys
        starting with ``trigger.`` are the framework's, and a key holds at most 1,024 bytes
        of UTF-8.

        Raises:
            UnknownTriggerError: no trigger of that kind is registered.
            IntentRejectedError: ``parse_intent`` refused the payload.
            ledger.PayloadError: the payload is not storable as JSON, or the key is too long.
            TypeError: ``at`` is not a datetime, or ``idempotency_key`` not a str.
            ValueError: ``at`` is a naive datetime.
            HostClosedError: the host is not running (enter it with ``async with`` first).
        """
        record = self._prepare(trigger_kind, payload, at, idempotency_key)
        return await record()

    def _prepare(
        self, trigger_kind: str, payload: JSON, at: datetime | None, idempotency_key: str | None
    ) -> Callable[[], Awaitable[Event]]:
        """Validate an enqueue now (raising before anything is written); returns the
        coroutine function that records it."""
        trigger = self._host.spec.registry.get(trigger_kind)
        payload = as_payload(payload)
        trigger.parse(payload)
        text = dump_json(payload)
        due = None if at is None else datetime_to_ms(at, "at")
        check_idempotency_key(idempotency_key)  # before anything is created
        host = self._host
        actor_id = self.actor_id

        async def record() -> Event:
            scheduler = host.scheduler
            eager = None
            if scheduler is not None and (due is None or due <= host.store.clock()):
                eager = scheduler.eager_claim()
            op = enqueue_op(
                trigger, payload, text, due, idempotency_key, host.key_retention_ms, eager
            )
            after = None
            if eager is not None and scheduler is not None:
                after = scheduler.after_enqueue(actor_id)
            result = await _run(host, actor_id, op, after=after)
            return result.event

        return record

    def call(
        self,
        *,
        trigger_kind: str,
        payload: JSON | BaseModel = None,
        at: datetime | None = None,
        signal: AbortSignal | None = None,
        idempotency_key: str | None = None,
    ) -> CallHandle:
        """Start durable work and return its ``CallHandle`` at once (this is not a coroutine).

        The intent is recorded right away, in the background of the host; ``await handle``
        waits for it to end and returns its facts. ``signal``, if given, is merged: when it
        aborts, the intent is cancelled durably through ``cancel_trigger``, wherever it runs.

        Cancelling the caller's own wait (its cancel scope, a timeout around ``await
        handle``) only stops waiting: the durable work goes on. To stop the work, use
        ``await handle.abort(reason)`` or the ``signal``.

        With an ``idempotency_key``, a live intent (or one ended within the host's
        ``idempotency_retention``) holding the same key is the one the handle follows, as
        with ``enqueue_trigger``: a retried request does not start the work twice.

        Raises:
            AbortError: ``signal`` is already aborted; nothing was written.
            UnknownTriggerError: no trigger of that kind is registered.
            IntentRejectedError: ``parse_intent`` refused the payload.
            ledger.PayloadError: the payload is not storable as JSON.
            TypeError: ``at`` is not a datetime, or ``idempotency_key`` not a str.
            ValueError: ``at`` is a naive datetime.
            HostClosedError: the host is not running (enter it with ``async with`` first).
        """
        if signal is not None:
            if not isinstance(signal, AbortSignal):
                raise TypeError(f"signal must be an AbortSignal, not {type(signal).__name__}")
            signal.throw_if_aborted()
        record = self._prepare(trigger_kind, payload, at, idempotency_key)
        return CallHandle(self, trigger_kind, record, signal, self._host.start_soon)

    async def cancel_trigger(
        self,
        *,
        trigger_kind: str,
        intent_event_id: int,
        reason: str | None = None,
        requested_by: str | None = None,
    ) -> CancelResult:
        """Cancel an intent; the status says exactly what happened (see ``CancelStatus``).

        ``cancelled``: it was pending and ``commit_cancelled`` ran now. ``requested``: it is
        running; the request is durable and the attempt's signal is aborted wherever it
        runs. ``ignored``: the trigger ignores cancellation. ``not_found``: no such intent of
        that kind here. ``already_completed``: it had ended (``terminal_status`` says how).

        Raises:
            UnknownTriggerError: no trigger of that kind is registered.
            TypeError: ``intent_event_id`` is not an int, or ``reason`` or ``requested_by``
                not a str.
            HostClosedError: the host is not running (enter it with ``async with`` first).
        """
        trigger = self._host.spec.registry.get(trigger_kind)
        storable = check_event_id(intent_event_id)
        if reason is not None and not isinstance(reason, str):
            raise TypeError(f"reason must be a str or None, not {type(reason).__name__}")
        if requested_by is not None and not isinstance(requested_by, str):
            raise TypeError(
                f"requested_by must be a str or None, not {type(requested_by).__name__}"
            )
        check_text(reason, "cancel reason")
        check_text(requested_by, "requested_by")
        if trigger.cancellation == "ignored":
            return CancelResult(status=CancelStatus.IGNORED, intent_event_id=intent_event_id)
        op = cancel_op(self._host.spec.registry, trigger, intent_event_id, reason, requested_by)
        not_found = CancelResult(status=CancelStatus.NOT_FOUND, intent_event_id=intent_event_id)
        if not storable:
            return not_found
        return await self._read(op, not_found, write=True, reads=intent_event_id)

    async def _ledger_op(
        self, fn: Callable[[LedgerTx], T], *, write: bool = True, create: bool = False
    ) -> T | None:
        """Run a ledger operation on this actor (for the framework's own features); None
        when the actor has no ledger and ``create`` is false."""
        if not create:
            return await self._read(fn, None, write=write)
        return await _run(self._host, self.actor_id, fn, write=write)

    # -- reads ----------------------------------------------------------------------------

    async def _read(
        self,
        op: Callable[[LedgerTx], T],
        missing: T,
        *,
        write: bool = False,
        reads: int | None = None,
    ) -> T:
        """Run ``op`` without creating a ledger: an actor that has none answers ``missing``.
        ``reads``: the intent whose row ``op`` reads (see ``Store.run``)."""
        try:
            return await _run(self._host, self.actor_id, op, write=write, create=False, reads=reads)
        except LedgerNotFoundError:
            return missing

    async def events(
        self,
        *,
        after: int = 0,
        kinds: Iterable[str] | None = None,
        intent_event_id: int | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        """Events with ``id > after`` in id order, optionally by kinds and intent.

        Raises:
            TypeError, ValueError: ``after``, ``limit`` or ``intent_event_id`` is not an int
                from 0 to 2**63 - 1, or ``kinds`` is a single str (give a list) or holds
                something other than a str without NUL.
        """
        kind_list, findable = check_events_query(after, kinds, intent_event_id, limit)
        if not findable:
            return []

        def op(tx: LedgerTx) -> list[Event]:
            return tx.events(
                after=after, kinds=kind_list, intent_event_id=intent_event_id, limit=limit
            )

        return await self._read(op, [])

    async def intent(self, intent_event_id: int) -> IntentState:
        """The current state of an intent.

        Raises:
            IntentNotFoundError: no intent with that id in this actor.
        """
        if not check_event_id(intent_event_id):
            raise IntentNotFoundError(self.actor_id, intent_event_id)
        row = await self._read(
            lambda tx: tx.intent_row(intent_event_id), None, reads=intent_event_id
        )
        if row is None:
            raise IntentNotFoundError(self.actor_id, intent_event_id)
        return row.state()

    async def intents(
        self, *, status: str | None = None, after: int = 0, limit: int | None = None
    ) -> list[IntentState]:
        """Intents in id order, optionally only those in ``status``.

        Raises:
            TypeError, ValueError: ``after`` or ``limit`` is not an int from 0 to 2**63 - 1,
                or ``status`` is not an intent status.
        """
        check_position(after, "after")
        check_position(limit, "limit", optional=True)
        if status is not None:
            _check_status(status)
        none: list[IntentRow] = []
        rows = await self._read(
            lambda tx: tx.intent_rows(status=status, after=after, limit=limit), none
        )
        return [row.state() for row in rows]

    async def wait_for_intent(self, intent_event_id: int) -> IntentState:
        """Wait until the intent ends; returns its terminal state.

        Raises:
            IntentNotFoundError: no intent with that id in this actor.
        """
        store = self._host.store
        while True:
            version = store.version(self.actor_id)
            state = await self.intent(intent_event_id)
            if state.status.terminal:
                return state
            with anyio.move_on_after(self._host.poll_interval):
                await store.wait_changed(self.actor_id, version)

    async def projection(self, name: str) -> Any:
        """The current state of a projection of this actor class.

        Raises:
            KeyError: no projection of that name is registered.
        """
        projection = self._check_projection(name)
        return await self._read(lambda tx: tx.projection(name), projection.initial_state())

    async def rebuild_projection(self, name: str) -> Any:
        """Recompute a projection from all events (after changing its ``apply``)."""
        self._check_projection(name)
        result = await self._ledger_op(lambda tx: tx.rebuild_projection(name), create=True)
        return result

    def _check_projection(self, name: str) -> Projection[Any]:
        for projection in self._host.spec.projections:
            if projection.name == name:
                return projection
        raise KeyError(f"no projection named {name!r} on this actor class")

    async def tail(self, *, after: int = 0) -> AsyncGenerator[Event, None]:
        """Yield events with ``id > after`` and keep following new ones, from any process."""
        store = self._host.store
        while True:
            version = store.version(self.actor_id)
            events = await self.events(after=after, limit=_PAGE)
            for event in events:
                yield event
                after = event.id
            if len(events) < _PAGE:
                with anyio.move_on_after(self._host.poll_interval):
                    await store.wait_changed(self.actor_id, version)

    async def stream(self, intent_event_id: int, *, start: int = 0) -> AsyncGenerator[JSON, None]:
        """Yield an intent's attached output chunks from index ``start``, following them
        until the intent ends.

        Raises:
            IntentNotFoundError: no intent with that id in this actor.
        """
        if not check_event_id(intent_event_id):
            raise IntentNotFoundError(self.actor_id, intent_event_id)
        check_position(start, "start")
        store = self._host.store

        def read(tx: LedgerTx) -> tuple[list[JSON], str | None]:
            row = tx.intent_row(intent_event_id)
            chunks = tx.stream_read(intent_event_id, start, _PAGE)
            return chunks, None if row is None else row.status

        while True:
            version = store.version(self.actor_id)
            nothing: tuple[list[JSON], str | None] = ([], None)
            chunks, status = await self._read(read, nothing)
            if status is None:
                raise IntentNotFoundError(self.actor_id, intent_event_id)
            for chunk in chunks:
                yield chunk
            start += len(chunks)
            if len(chunks) == _PAGE:
                continue
            if status in ("completed", "cancelled", "failed"):
                return
            with anyio.move_on_after(self._host.poll_interval):
                await store.wait_changed(self.actor_id, version)
