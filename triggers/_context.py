"""What ``acquire`` receives besides its intent: the ``TriggerContext``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from ledger import (
    JSON,
    Event,
    LedgerTx,
    check_events_query,
    dump_json,
    ms_to_datetime,
)

if TYPE_CHECKING:
    from datetime import datetime

    from ._abort import AbortSignal


class ContextBackend(Protocol):
    """How a context reaches its actor's ledger (the host supplies it; tests may fake it)."""

    def now_ms(self) -> int: ...

    def version(self, actor_id: str) -> int:
        """A counter that grows whenever this process learns that the actor changed."""
        ...

    async def wait_changed(self, actor_id: str, version: int) -> None:
        """Return once ``version(actor_id)`` is past ``version``."""
        ...

    async def read_events(
        self,
        actor_id: str,
        *,
        after: int,
        kinds: list[str] | None,
        intent_event_id: int | None,
        limit: int | None,
    ) -> list[Event]: ...

    async def stream_append(
        self, actor_id: str, intent_event_id: int, claim_token: str | None, text: str
    ) -> int:
        """Append a chunk to the intent's stream if the attempt still holds the claim
        ``claim_token``; returns its index.

        Raises:
            ClaimLostError: the attempt no longer holds the claim (nothing was written).
        """
        ...

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
        """Append a fact about the intent now, while its attempt runs, if the attempt still
        holds the claim ``claim_token`` (and ``check``, run in the same transaction first,
        does not raise).

        Raises:
            ClaimLostError: the attempt no longer holds the claim (nothing was written).
        """
        ...


class ClaimLostError(Exception):
    """The attempt no longer holds its intent's claim: another attempt took the intent over
    (its host stalled past the lease), or the intent has ended. Raised by what an attempt
    writes while it runs (``ctx.stream.write``, workflow facts); nothing was written. The
    attempt's outcome will not count: let the error end it."""


class StreamWriter:
    """Appends output chunks (live progress, tokens) to the intent's attached stream.

    Chunks are transport, not truth: readers replay them from index 0 and follow until the
    intent ends. Each chunk is any JSON value. An intent has one stream for all its
    attempts: a retry or a redrive appends after the chunks of the attempts before it, with
    no marker between them (write one, such as ``{"attempt": ctx.attempt}``, if readers
    must tell the attempts apart). Only the attempt that holds the intent's claim writes:
    one whose claim was lost (its host stalled past the lease and another took the intent
    over), or whose intent has ended, gets ``ClaimLostError`` and adds nothing, so its
    chunks never mix with those of the attempt that took over.
    """

    __slots__ = ("_actor_id", "_backend", "_claim_token", "_intent_event_id")

    def __init__(
        self,
        backend: ContextBackend,
        actor_id: str,
        intent_event_id: int,
        claim_token: str | None = None,
    ) -> None:
        self._backend = backend
        self._actor_id = actor_id
        self._intent_event_id = intent_event_id
        self._claim_token = claim_token

    async def write(self, chunk: JSON) -> int:
        """Append one chunk once it is stored; returns its index.

        Raises:
            ledger.PayloadError: the chunk is not storable as JSON.
            ClaimLostError: this attempt no longer holds the intent's claim, or the intent
                has ended; nothing was written.
        """
        text = dump_json(chunk, what="stream chunk")
        return await self._backend.stream_append(
            self._actor_id, self._intent_event_id, self._claim_token, text
        )


class TriggerContext:
    """The running attempt, as ``acquire(intent, ctx)`` sees it.

    Attributes:
        signal: aborts when the intent is cancelled (from anywhere), when the attempt times
            out (reason ``"timeout"``) or when the host shuts down (reason ``"shutdown"``).
        actor_id: the actor that owns the intent.
        trigger_kind: the trigger's kind.
        intent_event_id: the intent's id.
        attempt: 1 for the first attempt, 2 for the first retry, ...
        redrive: True when this attempt re-runs one whose claim was lost (a crash); its
            signal starts aborted if a cancel was requested meanwhile.
        bindings: the actor class's bindings.
        log: a structlog logger bound to actor, kind, intent and attempt.
        stream: the attached output stream writer.
    """

    __slots__ = ("_backend", "_claim_token", "actor_id", "attempt", "bindings",
                 "intent_event_id", "log", "redrive", "signal", "stream",
                 "trigger_kind")  # fmt: skip

    def __init__(
        self,
        *,
        backend: ContextBackend,
        signal: AbortSignal,
        actor_id: str,
        trigger_kind: str,
        intent_event_id: int,
        attempt: int,
        redrive: bool,
        bindings: Mapping[str, Any],
        log: Any,
        claim_token: str | None = None,
    ) -> None:
        self._backend = backend
        self._claim_token = claim_token
        self.signal = signal
        self.actor_id = actor_id
        self.trigger_kind = trigger_kind
        self.intent_event_id = intent_event_id
        self.attempt = attempt
        self.redrive = redrive
        self.bindings = bindings
        self.log = log
        self.stream = StreamWriter(backend, actor_id, intent_event_id, claim_token)

    def now(self) -> datetime:
        """The host clock's current time (UTC)."""
        return ms_to_datetime(self._backend.now_ms())

    async def events(
        self,
        *,
        after: int = 0,
        kinds: Iterable[str] | None = None,
        intent_event_id: int | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        """Read the actor's ledger (events with ``id > after``, in id order), optionally only
        the given ``kinds`` (a list) and those of one intent.

        Raises:
            TypeError, ValueError: ``after``, ``limit`` or ``intent_event_id`` is not an int
                from 0 to 2**63 - 1, or ``kinds`` is a single str (give a list) or holds
                something other than a str without NUL.
        """
        kind_list, findable = check_events_query(after, kinds, intent_event_id, limit)
        if not findable:
            return []
        return await self._backend.read_events(
            self.actor_id,
            after=after,
            kinds=kind_list,
            intent_event_id=intent_event_id,
            limit=limit,
        )

    async def _record(
        self, kind: str, payload: JSON, check: Callable[[LedgerTx], None] | None = None
    ) -> Event:
        """Record a framework fact about this intent now (workflow steps, sleeps, hooks).

        Raises:
            ClaimLostError: this attempt lost its claim; nothing was written.
            Exception: whatever ``check`` raised (nothing was written).
        """
        text = dump_json(payload)
        return await self._backend.record_fact(
            self.actor_id, self.intent_event_id, self._claim_token, kind, payload, text, check
        )


AcquireFn = Callable[[Any, TriggerContext], Awaitable[Any]]
