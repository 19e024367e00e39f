"""``DistributedAbortController``: one abort controller, shared by id across processes.

The controller is an intent of a built-in trigger in the ledger of the actor named by its id:

* ``create(id)`` records it (or finds it) in one transaction keyed by a reserved idempotency
  key, so concurrent creators in any number of processes get the same controller;
* its TTL is the intent's due time: when it comes, the scheduler's attempt ends it
  ``completed`` with an expiry fact (nothing waits in between);
* ``abort(reason)`` is ``cancel_trigger``: the pending intent ends ``cancelled`` with an abort
  fact, durably, whether or not anyone listens yet;
* either way the ended intent keeps its key for ``grace``: a late ``create(id)`` finds the
  fired controller; after that, ``create(id)`` starts a fresh one.

A read ``signal`` is followed by one task of the host (``_Follower.follow``) that sleeps
until a wake-up: the firing's notice, a change of the actor, or a fallback poll that backs off
from the host's ``poll_interval`` to ``SLOWEST_POLL``. The task holds the signal weakly, as the
inputs of ``AbortSignal.any`` hold theirs: it ends as soon as nobody holds the controller or
the signal, or listens to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import weakref
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import structlog

from ledger import (
    JSON,
    IntentStatus,
    LedgerBusyError,
    LedgerTx,
    LedgerWriteError,
    duration_ms,
    ledger_relpath,
)

from ._abort import AbortSignal
from ._engine import cancel_op
from ._spec import RetryPolicy, TriggerRegistry

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ledger import Store

    from ._context import TriggerContext
    from ._results import Cancellation
    from ._spec import DurableTrigger
    from ._tx import Tx

__all__ = ["ABORT_CONTROLLER_TRIGGER", "DistributedAbortController"]

_log = structlog.get_logger("triggers")

KIND = "trigger.abort_controller"
CREATED = "trigger.abort_controller.created"
ABORTED = "trigger.abort_controller.aborted"
_KEY = "trigger.abort_controller"
DEFAULT_TTL = timedelta(hours=24)
DEFAULT_GRACE = timedelta(hours=1)
SLOWEST_POLL = 10.0
"""Seconds between a follower's fallback reads once backed off (or ``poll_interval``, if
longer). Wake-ups are the way a firing arrives; the poll only bounds the wait when one is
lost, and starts at ``poll_interval`` for the races of a process that just registered."""


class ControllerHost(Protocol):
    """What a controller needs of its host (``actors.ActorHost`` is one)."""

    @property
    def store(self) -> Store: ...

    @property
    def poll_interval(self) -> float: ...

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object) -> None: ...


# -- the built-in trigger --------------------------------------------------------------------


async def _expire(intent: Any, ctx: TriggerContext) -> JSON:
    return {"ttl_ms": intent["ttl_ms"]}


def _commit_expired(outcome: Any, tx: Tx) -> None:
    if tx._cancel_reason is not None:
        # Aborted while the expiry ran: the abort came first, and its process (which saw it
        # fire at once) and every other one must tell the same reason.
        _fire(tx, tx._cancel_reason[0], expired=False)
        return
    ttl = _show_ms(outcome["ttl_ms"])
    _fire(tx, f"controller ttl of {ttl} elapsed (expired)", expired=True)


def _commit_aborted(intent: Any, cancellation: Cancellation, tx: Tx) -> None:
    _fire(tx, cancellation.reason, expired=False)


def _fire(tx: Tx, reason: str | None, *, expired: bool) -> None:
    """Record the abort fact, and announce it so that signals fire without a re-read."""
    tx._insert_framework_event(ABORTED, {"reason": reason, "expired": expired})
    tx._announce(_topic(tx.intent_event_id), {"reason": reason})


def _topic(run_id: int) -> str:
    """The notice topic of a controller's firing."""
    return f"{ABORTED}:{run_id}"


def _parse(payload: JSON) -> JSON:
    if not (
        isinstance(payload, dict)
        and isinstance(payload.get("ttl_ms"), int)
        and isinstance(payload.get("grace_ms"), int)
    ):
        raise ValueError("an abort controller's payload holds ttl_ms and grace_ms")
    return payload


ABORT_CONTROLLER_TRIGGER: DurableTrigger[Any, Any] = {
    "kind": KIND,
    "intent_event_kind": CREATED,
    "cancellation": "cooperative",
    "parse_intent": _parse,
    "acquire": _expire,
    "commit": _commit_expired,
    "commit_cancelled": _commit_aborted,
    "retry": RetryPolicy(max_attempts=10, initial_backoff=0.1, max_backoff=5.0),
}
"""The controller's trigger; every actor class has it (``define_agent_do`` adds it)."""

_REGISTRY = TriggerRegistry([], builtins=[ABORT_CONTROLLER_TRIGGER])
_TRIGGER = _REGISTRY.get(KIND)


# -- the controller --------------------------------------------------------------------------


class DistributedAbortController:
    """An abort controller that any process reaches by its id (``"chat:123"``, ``"job:9"``).

    Get one with :meth:`create`; hand :attr:`signal` to the work; call :meth:`abort` from
    any process. It lives in the ledger of the actor named ``id``, served by any host of any
    actor class on the data directory. Expiry at the end of the TTL is carried out by a host
    running the scheduler.

    Attributes:
        id: the controller's id (an actor name).
        run_id: the id of the intent that is this controller.
    """

    __slots__ = ("_fired", "_host", "_signal", "id", "run_id")

    def __init__(
        self,
        host: ControllerHost,
        id: str,
        run_id: int,
        *,
        fired: tuple[bool, str | None] = (False, None),
    ) -> None:
        """Wrap an existing controller; use :meth:`create` to get one. ``fired``: whether it
        is known to have fired, and why."""
        self._host = host
        self.id = id
        self.run_id = run_id
        self._signal: AbortSignal | None = None
        self._fired = fired

    def __repr__(self) -> str:
        return f"<DistributedAbortController {self.id!r} run_id={self.run_id}>"

    @classmethod
    async def create(
        cls,
        id: str,
        *,
        host: ControllerHost,
        ttl: timedelta | float = DEFAULT_TTL,
        grace: timedelta | float = DEFAULT_GRACE,
    ) -> DistributedAbortController:
        """Get the controller ``id``, creating it if there is none (atomically).

        Concurrent calls from any number of processes get the same controller. A controller
        that fired (aborted or expired) less than its ``grace`` ago is returned as it is, its
        signal already fired; after that a new one is created. ``ttl`` and ``grace`` apply
        only when a new controller is created.

        Args:
            id: the controller's id; any actor name.
            host: a running host on the data directory (``actors.ActorHost``).
            ttl: how long until the controller expires by itself (a ``timedelta`` or
                seconds).
            grace: how long a fired controller stays findable.

        Raises:
            ValueError: ``ttl`` is not positive or ``grace`` is negative, either is longer
                than a century, or ``id`` is not a valid actor name.
            ledger.LedgerError: the actor's ledger could not be written.
        """
        ledger_relpath(id)
        ttl_ms = duration_ms(ttl, "ttl", positive=True)
        grace_ms = duration_ms(grace, "grace")
        run_id, fired = await host.store.run(id, _get_or_create(ttl_ms, grace_ms))
        return cls(host, id, run_id, fired=fired)

    async def abort(self, reason: str | None = None) -> None:
        """Abort the controller, durably: every signal of it fires, in every process.

        Idempotent: a second abort keeps the first reason; aborting a controller that expired
        or was aborted already does nothing.

        Raises:
            TypeError: ``reason`` is not a str or None.
            ledger.LedgerError: the actor's ledger could not be written.
        """
        if reason is not None and not isinstance(reason, str):
            raise TypeError("reason must be a str or None")
        cancel = cancel_op(_REGISTRY, _TRIGGER, self.run_id, reason, None)
        run_id = self.run_id

        def op(tx: LedgerTx) -> tuple[bool, str | None]:
            cancel(tx)
            return _fired(tx, run_id)

        fired = await self._host.store.run(self.id, op, create=False, reads=run_id)
        self._fired = fired
        if self._signal is not None and fired[0]:
            self._signal._abort(fired[1])  # this process knows now: no need to wait

    @property
    def signal(self) -> AbortSignal:
        """An ``AbortSignal`` that fires when the controller is aborted or expires.

        Its reason is the abort's reason, or a text ending in ``"(expired)"``. Reading this
        never blocks: the same signal is returned each time, followed by a task of the host.
        If the controller's ledger cannot be read for good (corrupt, or gone), the signal
        aborts with that error's message rather than never firing. A storage outage (a lost
        database connection, a locked or unopenable file) does not fire it: nobody could
        have aborted the controller through that storage meanwhile, so the follower logs
        ``abort_follow_failed`` once and reads again, backing off, until it can.

        The task waits for wake-ups (this process's commits, other processes' datagrams or
        notifications), not a timer: it reads the ledger again only when the actor changed,
        or as a fallback poll that backs off from the host's ``poll_interval`` to 10 seconds.
        It holds the signal weakly, like the inputs of ``AbortSignal.any``: it follows while
        anyone holds the controller or the signal, or listens to the signal (a listener, a
        ``scope()``, a signal made by ``any()``), and ends as soon as nobody does, so
        controllers may be dropped without being closed. It also ends when the signal
        fires, and when the host stops.
        """
        if self._signal is None:
            signal = AbortSignal()
            fired, reason = self._fired
            if fired:
                signal._abort(reason)  # known to have fired: nothing to follow
            else:
                pin: list[AbortSignal] = []
                stopper = anyio.CancelScope()
                # First, as ``AbortSignal.any`` does for its own: the pin's rule (held while
                # more than one listener is registered) counts this listener as the source's.
                signal.add_listener(functools.partial(_followed, pin, stopper))
                signal._pin = pin  # the follower holds ``pin``: it keeps a listened-to signal
                host = self._host
                follower = _Follower(host.store, self.id, self.run_id, host.poll_interval)
                host.start_soon(follower.follow, weakref.ref(signal), pin, stopper)
            self._signal = signal
        return self._signal


class _Follower:
    """Where a follower looks: what ``follow`` needs besides the signal. It refers to neither
    the controller nor the signal, so the task keeps neither alive."""

    __slots__ = ("actor_id", "poll_interval", "run_id", "store")

    def __init__(self, store: Store, actor_id: str, run_id: int, poll_interval: float) -> None:
        self.store = store
        self.actor_id = actor_id
        self.run_id = run_id
        self.poll_interval = poll_interval

    async def follow(
        self, weak: weakref.ref[AbortSignal], pin: list[AbortSignal], stopper: anyio.CancelScope
    ) -> None:
        """Fire the signal when the controller fires: at once on its notice (from this or
        another process), else when a re-read after a change (or a poll) finds it ended.

        Ends when the signal fires (its first listener cancels ``stopper``) or is collected
        (the weak reference's callback cancels it). While a listener waits, ``pin`` holds
        the signal; nothing else here may refer to it across an await.
        """
        signal = weak()
        if signal is None or signal.aborted:
            return
        # The signal's last reference may go on any thread (a reference cycle collected on a
        # ledger worker thread, say): hand the cancel to the loop. Backend-specific on purpose,
        # as ``AbortSignal.timeout`` is: anyio has no non-blocking "call soon from any thread".
        loop = asyncio.get_running_loop()

        def collected(_: weakref.ref[AbortSignal]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing to end
                loop.call_soon_threadsafe(stopper.cancel)

        # Held by this frame only: once the task ends, the callback can no longer run.
        alive = weakref.ref(signal, collected)
        del signal

        def fire(reason: str | None) -> None:
            target = alive()
            if target is not None:
                target._abort(reason)

        def heard(data: JSON) -> None:
            reason = data.get("reason") if isinstance(data, dict) else None
            fire(reason if isinstance(reason, str) else None)

        run_id = self.run_id

        def read(tx: LedgerTx) -> tuple[bool, str | None]:
            return _fired(tx, run_id)

        store, actor_id = self.store, self.actor_id
        stop = store.follow_notices(actor_id, _topic(run_id), heard)
        delay = self.poll_interval
        slowest = max(self.poll_interval, SLOWEST_POLL)
        failing = False
        try:
            with stopper:
                while True:
                    version = store.version(actor_id)
                    try:
                        fired, reason = await store.run(actor_id, read, write=False, create=False)
                    except (LedgerWriteError, LedgerBusyError) as exc:
                        if not failing:
                            _log.warning("abort_follow_failed", actor=actor_id, error=str(exc))
                        failing = True
                        await self._woken(version, delay * random.uniform(0.75, 1.0))
                        delay = min(delay * 2, slowest)
                        continue
                    if failing:
                        _log.info("abort_follow_recovered", actor=actor_id)
                        failing = False
                    if fired:
                        fire(reason)
                        return
                    # Jittered, so that controllers made together do not poll together.
                    if not await self._woken(version, delay * random.uniform(0.75, 1.0)):
                        delay = min(delay * 2, slowest)  # a wake-up may have been lost
        except Exception as exc:
            fire(f"abort controller {actor_id!r} could not be read: {exc}")
        finally:
            stop()

    async def _woken(self, version: int, seconds: float) -> bool:
        """Wait until the actor changes after ``version``, at most ``seconds``; False if
        nothing woke this follower (the fallback poll is due)."""
        with anyio.move_on_after(seconds):
            await self.store.wait_changed(self.actor_id, version)
            return True
        return False


def _followed(pin: list[AbortSignal], stopper: anyio.CancelScope, _: AbortSignal) -> None:
    """The first listener of a followed signal: once it fired, end its follower."""
    pin.clear()
    stopper.cancel()


def _fired(tx: LedgerTx, run_id: int) -> tuple[bool, str | None]:
    """Whether the controller ``run_id`` has fired (aborted, an abort requested while its
    expiry runs, or expired), and its reason."""
    row = tx.intent_row(run_id)
    if row is None:
        raise LookupError(f"the controller's intent {run_id} is missing")
    if not IntentStatus(row.status).terminal:
        if row.cancel_requested_at is not None:
            return True, row.cancel_reason
        return False, None
    facts = tx.events(intent_event_id=run_id, kinds=[ABORTED], limit=1)
    if facts and isinstance(facts[0].payload, dict):
        reason = facts[0].payload.get("reason")
        return True, reason if isinstance(reason, str) else None
    return True, row.cancel_reason


def _get_or_create(ttl_ms: int, grace_ms: int) -> Any:
    def op(tx: LedgerTx) -> tuple[int, tuple[bool, str | None]]:
        row = tx.intent_row_by_key(_KEY)
        if row is not None and row.trigger_kind != KIND and row.finished_at is not None:
            row = None  # an ended intent of another kind: append_intent releases the key
        if row is not None and row.trigger_kind != KIND:
            # Only a ledger written before user keys were refused the prefix can hold this.
            raise ValueError(
                f"idempotency key {_KEY!r} is held by intent {row.id} of trigger"
                f" {row.trigger_kind!r}: no abort controller can be made here"
            )
        if row is not None:
            if row.finished_at is None:
                return row.id, _fired(tx, row.id)
            payload = tx.intent_payloads([row.id]).get(row.id)
            kept = payload.get("grace_ms", 0) if isinstance(payload, dict) else 0
            if row.finished_at + kept > tx.now_ms:
                return row.id, _fired(tx, row.id)
        # None held, or its grace is over: append_intent releases the old key.
        event, _ = tx.append_intent(
            trigger_kind=KIND,
            intent_event_kind=CREATED,
            payload={"ttl_ms": ttl_ms, "grace_ms": grace_ms},
            due_at=tx.now_ms + ttl_ms,
            idempotency_key=_KEY,
            key_retention_ms=0,
        )
        return event.id, (False, None)

    return op


def _show_ms(ms: int) -> str:
    if ms % 3_600_000 == 0:
        return f"{ms // 3_600_000}h"
    if ms % 60_000 == 0:
        return f"{ms // 60_000}min"
    return f"{ms / 1000:g}s"
