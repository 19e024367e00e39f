"""The scheduler: claims due intents, runs ``acquire`` with a signal, settles the outcome.

It keeps only what the ledger cannot tell cheaply: which actors may have due work now (the
ready set, fed by commit hints, wake-ups from other processes and a slow poll of the due-time
index) and the attempts running here. Every decision that matters is taken inside a ledger
transaction by ``_engine.py``.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from ledger import (
    JSON,
    Committed,
    Directory,
    Event,
    LedgerBusyError,
    LedgerError,
    LedgerTx,
    LedgerUnavailableError,
    Store,
)

from ._abort import AbortController, is_failure
from ._context import ClaimLostError, TriggerContext
from ._engine import (
    Claimed,
    ClaimResult,
    EagerClaim,
    Enqueued,
    Outcome,
    PutBack,
    Settled,
    claim_op,
    renew_op,
    settle_op,
)
from ._pool import TaskPool
from ._slots import Slots, Taken
from ._streaks import FailureStreak, worth_a_warning

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from anyio.abc import TaskGroup, TaskStatus

    from ._spec import TriggerDef, TriggerRegistry

_log = structlog.get_logger("triggers")

_SETTLE_RETRY_FIRST_S = 0.05
"""The wait before a failed settle's first retry; each next one waits 4 times longer, up to
``_SETTLE_RETRY_MAX_S``."""
_SETTLE_RETRY_MAX_S = 5.0

_MAX_CLAIM_BACKOFF_MS = 30_000
"""Longest wait before the poll sends the scheduler back to an actor whose claims fail."""


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Tuning of one host's scheduler.

    Args:
        max_concurrency: attempts running at once on this host.
        lease: seconds a claim stays valid without renewal; renewed every third of it.
        poll_interval: seconds between fallback polls of the due-time index.
        max_redrives: lost claims (crashes) tolerated per intent before it fails.
        shutdown_grace: seconds running attempts get to finish when the host stops, before
            their signals abort with reason ``"shutdown"``.
        claim_batch: most intents claimed from one actor in one transaction.
    """

    max_concurrency: int = 256
    lease: float = 30.0
    poll_interval: float = 1.0
    max_redrives: int = 5
    shutdown_grace: float = 10.0
    claim_batch: int = 64

    def __post_init__(self) -> None:
        for name in ("max_concurrency", "max_redrives", "claim_batch"):
            value = getattr(self, name)
            least = 0 if name == "max_redrives" else 1
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"SchedulerConfig.{name} must be an int, not {value!r}")
            if value < least:
                raise ValueError(f"SchedulerConfig.{name} must be at least {least}, not {value}")
        for name in ("lease", "poll_interval", "shutdown_grace"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(
                    f"SchedulerConfig.{name} must be a number of seconds, not {value!r}"
                )
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"SchedulerConfig.{name} must be a positive number of seconds")


class _Attempt:
    __slots__ = ("actor_id", "controller", "intent_event_id", "scope", "shutdown", "timed_out",
                 "token")  # fmt: skip

    def __init__(
        self, actor_id: str, intent_event_id: int, token: str, controller: AbortController
    ) -> None:
        self.actor_id = actor_id
        self.intent_event_id = intent_event_id
        self.token = token
        self.controller = controller
        self.scope: anyio.CancelScope | None = None
        self.timed_out = False
        self.shutdown = False


class Scheduler:
    """Runs the triggers of one actor class on one host (one process)."""

    def __init__(
        self,
        store: Store,
        registry: TriggerRegistry,
        *,
        host_id: str,
        bindings: Mapping[str, Any],
        config: SchedulerConfig,
        dead_owners: Callable[[], Sequence[str]] = tuple,
    ) -> None:
        self.store = store
        self.registry = registry
        self.host_id = host_id
        self.bindings = bindings
        self.config = config
        self._dead_owners = dead_owners
        self._lease_ms = round(config.lease * 1000)
        self._ready: dict[str, None] = {}
        self._claiming: set[str] = set()
        # Actors hinted while their claim was in flight, with the clock at the latest hint:
        # the claim looks again unless it began after that hint (and so saw its change).
        self._recheck: dict[str, int] = {}
        self._slots = Slots(config.max_concurrency)
        self._eager = 0  # enqueues in flight that may claim their intent
        self._running: dict[tuple[str, int], _Attempt] = {}
        # Attempts still running here whose intent this host claimed again meanwhile (their
        # claim was lost: another host took the intent over and gave it back), by token.
        self._superseded: dict[str, _Attempt] = {}
        self.abandoned = 0
        """Attempts killed before they could settle: their claims stand until redriven."""
        self._tokens: set[str] = set()
        self._timers: list[tuple[int, str]] = []
        # Actors whose last claim failed (a corrupt ledger, a storage error): when the poll
        # may send us there again, and the wait before that, doubled at each failure.
        self._failing: dict[str, tuple[int, int]] = {}
        self._armed: dict[str, int] = {}
        # asyncio's event (the host runs on asyncio): set after nearly every claim and
        # attempt, where anyio's wrapper costs several times more.
        self._dispatch_wake = asyncio.Event()
        self._timer_wake = anyio.Event()
        self._idle = anyio.Event()
        self._stopping = False
        self._tg: TaskGroup | None = None
        self._attempt_tg: TaskGroup | None = None
        self._pool: TaskPool
        self._backend = _Backend(store)
        # Failures in a row of the index poll and of lease renewals (all actors together:
        # an outage fails them all), logged without flooding the log.
        self._poll_failures = FailureStreak(_log, "index_poll_failed")
        self._renewal_failures = FailureStreak(_log, "lease_renewal_failed")

    # -- public surface -------------------------------------------------------------------

    @property
    def running(self) -> int:
        """Attempts running on this host now."""
        return len(self._running) + len(self._superseded)

    def running_attempts(self) -> list[tuple[str, int]]:
        """``(actor_id, intent_event_id)`` of the attempts running here."""
        keys = dict.fromkeys(self._running)
        for attempt in self._superseded.values():
            keys[attempt.actor_id, attempt.intent_event_id] = None
        return list(keys)

    def hint(self, actor_id: str, due_ms: int | None = None, *, seen_at: int | None = None) -> None:
        """Tell the scheduler that ``actor_id`` may have work due at ``due_ms`` (now if None).

        ``seen_at`` is when the change was seen (the clock when its source was read; now if
        None): a claim of this actor whose transaction began after it, and after ``due_ms``,
        needs no second look. Every hint must report something such a claim sees: a change
        committed to the ledger, or a dead owner (claims read the dead owners as they run).
        """
        if self._stopping:
            return
        now = self.store.clock()
        if due_ms is None or due_ms <= now:
            if actor_id in self._claiming:
                if seen_at is None:
                    seen_at = now
                elif due_ms is not None:
                    seen_at = max(seen_at, due_ms)  # it became due only then
                self._recheck_after(actor_id, seen_at)
            else:
                self._ready[actor_id] = None
            self._dispatch_wake.set()
            return
        armed = self._armed.get(actor_id)
        if armed is not None and armed <= due_ms:
            return
        self._armed[actor_id] = due_ms
        heapq.heappush(self._timers, (due_ms, actor_id))
        if self._timers[0][1] == actor_id:
            self._timer_wake.set()

    def eager_claim(self) -> EagerClaim | None:
        """Reserve a slot to claim a due-now intent in its enqueue transaction, if one is free.

        The reservation is settled by the callback from ``after_enqueue``, which the caller
        must pass as the enqueue operation's ``after``.
        """
        if self._stopping or not self._slots.take(1):
            return None
        self._eager += 1
        return EagerClaim(self.host_id, self._lease_ms, self.registry.kinds)

    def after_enqueue(
        self, actor_id: str
    ) -> Callable[[Enqueued | None, BaseException | None], None]:
        """The ``after`` callback of an enqueue operation that carried an ``eager_claim``."""

        def after(result: Enqueued | None, error: BaseException | None) -> None:
            self._eager -= 1
            if result is not None and result.claimed is not None:
                attempt = self._register(actor_id, result.claimed)
                self._pool.start_soon(self._attempt, attempt, result.claimed)
            else:
                self._slots.give(1)
                self._dispatch_wake.set()
                self._check_idle()

        return after

    def deliver_cancel(self, actor_id: str, intent_event_id: int, reason: str | None) -> bool:
        """Abort the signal of the intent's attempt here; False if its claim is not held here
        (an attempt of it here whose claim was lost is aborted too, but does not count)."""
        for old in self._superseded.values():
            if old.actor_id == actor_id and old.intent_event_id == intent_event_id:
                old.controller.abort(reason)
        attempt = self._running.get((actor_id, intent_event_id))
        if attempt is None:
            return False
        attempt.controller.abort(reason)
        return True

    def on_commit(self, committed: list[Committed]) -> list[tuple[str, int, str, str | None]]:
        """Feed the store's commit report in; returns cancels owned by other processes.

        Returns:
            ``(actor_id, intent_event_id, owner, reason)`` for each cancel request whose
            attempt belongs to another process (the host forwards those).
        """
        remote: list[tuple[str, int, str, str | None]] = []
        for item in committed:
            effects = item.effects
            if effects.new_due is not None:
                self.hint(item.actor_id, effects.new_due)
            if effects.cancels:
                for intent_event_id, owner, reason in effects.cancels:
                    if owner == self.host_id:
                        self.deliver_cancel(item.actor_id, intent_event_id, reason)
                    elif owner is not None:
                        remote.append((item.actor_id, intent_event_id, owner, reason))
        return remote

    async def rescan(self, horizon_s: float = 0.0) -> bool:
        """Mark every actor due within ``horizon_s`` from now ready (used after crashes and
        lost wake-ups).

        Returns:
            False, with a ``rescan_failed`` warning logged, when the due-time index could
            not be read (a storage outage): the scheduler's regular poll reads it again.
        """
        before = self.store.clock() + round(horizon_s * 1000)
        try:
            rows = await self.store.run_index(lambda index: index.due_before(before, 1_000_000))
        except LedgerError as exc:
            _log.warning("rescan_failed", error=str(exc))
            return False
        for actor_id, _ in rows:
            self.hint(actor_id)
        return True

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Claim and run due work until cancelled; then stop as ``shutdown()`` does.

        A cancellation stops the claiming at once, but it does not cut running attempts
        short: they are shielded from it (their leases still renewed) and get the shutdown
        grace, then are aborted with reason ``"shutdown"`` and released; each settles before
        this returns.
        """
        renewing = anyio.CancelScope(shield=True)
        async with anyio.create_task_group() as attempts:
            self._attempt_tg = attempts
            self._pool = TaskPool(attempts)
            attempts.start_soon(self._renew_loop, renewing)
            try:
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    tg.start_soon(self._timer_loop)
                    tg.start_soon(self._dispatch_loop)
                    task_status.started()
                    await anyio.sleep_forever()
            finally:
                try:
                    await self.shutdown()
                finally:
                    renewing.cancel()
                    self._pool.close()

    async def shutdown(self) -> None:
        """Stop claiming; let running attempts finish within the grace, then abort them with
        reason ``"shutdown"`` and release their intents for a redrive elsewhere.

        Runs shielded from cancellation: releasing claims is what lets the next host take
        over at once instead of after the lease. An ``acquire`` that ignores its
        cancellation keeps it waiting (its lease renewed) until it returns.
        """
        self._stopping = True
        self._dispatch_wake.set()
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self.config.shutdown_grace):
                await self._wait_idle()
            for attempt in [*self._running.values(), *self._superseded.values()]:
                attempt.shutdown = True
                attempt.controller.abort("shutdown")
                if attempt.scope is not None:
                    attempt.scope.cancel()
            await self._wait_idle()

    async def _wait_idle(self) -> None:
        while self._running or self._superseded or self._claiming or self._eager:
            if self._idle.is_set():
                self._idle = anyio.Event()  # set when it was last idle: wait for the next time
            await self._idle.wait()  # shared by every waiter (shutdown may run twice at once)

    def _check_idle(self) -> None:
        if not (self._running or self._superseded or self._claiming or self._eager):
            self._idle.set()

    # -- loops ----------------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        next_poll = 0
        while not self._stopping:
            now = self.store.clock()
            while self._timers and self._timers[0][0] <= now:
                due, actor_id = heapq.heappop(self._timers)
                if self._armed.get(actor_id) == due:
                    del self._armed[actor_id]
                    self.hint(actor_id)
            if now >= next_poll:
                await self._poll(now)
                next_poll = self.store.clock() + round(self.config.poll_interval * 1000)
            wake_at = min(next_poll, self._timers[0][0] if self._timers else next_poll)
            delay = max(0.0, (wake_at - self.store.clock()) / 1000)
            self._timer_wake = anyio.Event()
            with anyio.move_on_after(delay):
                await self._timer_wake.wait()

    async def _poll(self, now: int) -> None:
        horizon = now + round(self.config.poll_interval * 1000)

        # Enough to fill the free capacity several times over; the rest stay due in the index
        # and come up, earliest first, in a later poll.
        limit = 4 * self.config.max_concurrency + 256

        def read(index: Directory) -> tuple[int, list[tuple[str, int]]]:
            return self.store.clock(), index.due_before(horizon, limit)

        try:
            read_at, rows = await self.store.run_index(read)
        except Exception as exc:  # the next poll retries; the ledgers stay the truth
            self._poll_failures.failed(error=str(exc))
            return
        self._poll_failures.succeeded()
        failing = self._failing
        for actor_id, due in rows:
            if failing and actor_id in failing and failing[actor_id][0] > read_at:
                continue  # its claims fail: not at every poll
            self.hint(actor_id, due, seen_at=read_at)

    async def _dispatch_loop(self) -> None:
        assert self._tg is not None
        while not self._stopping:
            # Claims in flight are bounded by the free slots: with a large backlog of due
            # actors, queueing a claim for each of them would only fill memory.
            if not self._ready or len(self._claiming) >= self._slots.free:
                self._dispatch_wake = asyncio.Event()
                await self._dispatch_wake.wait()
                continue
            actor_id = next(iter(self._ready))
            del self._ready[actor_id]
            if actor_id in self._claiming:
                self._recheck_after(actor_id, self.store.clock())
                continue
            self._start_claim(actor_id)

    def _recheck_after(self, actor_id: str, seen_at: int) -> None:
        """Have the claim in flight for ``actor_id`` look again unless it began after
        ``seen_at`` (the latest such time counts)."""
        self._recheck[actor_id] = max(seen_at, self._recheck.get(actor_id, seen_at))

    def _start_claim(self, actor_id: str) -> None:
        """Queue a claim transaction for ``actor_id``; ``_claimed`` handles its result."""
        taken = Taken()
        writable: bool | None = None  # as last answered, right before the transaction

        def write() -> bool:
            # With no free slot the claim can only find that out, so it asks for no write
            # lock (another host may want the actor's ledger meanwhile).
            nonlocal writable
            writable = self._slots.free > 0
            return writable

        def op(tx: LedgerTx) -> ClaimResult:
            if writable is False:
                # No capacity: the actor stays ready and is claimed when a slot frees.
                return ClaimResult([], more=True, looked_at=tx.now_ms)
            # Built as the transaction runs, not when it is queued: the owners known to be
            # dead by then count (a rescan's hint relies on it, see ``hint``).
            return claim_op(
                self.registry,
                limit=self.config.claim_batch,
                host_id=self.host_id,
                lease_ms=self._lease_ms,
                dead_owners=self._dead_owners(),
                own_tokens=self._tokens,  # read on the worker thread; membership tests only
                max_redrives=self.config.max_redrives,
                slots=self._slots,
                taken=taken,
            )(tx)

        def after(result: ClaimResult | None, error: BaseException | None) -> None:
            self._claimed(actor_id, taken, result, error)

        self._claiming.add(actor_id)
        try:
            self.store.submit(actor_id, op, after, write=write)
        except LedgerError:
            self._claiming.discard(actor_id)  # the store is closing

    def _claimed(
        self,
        actor_id: str,
        taken: Taken,
        result: ClaimResult | None,
        error: BaseException | None,
    ) -> None:
        self._claiming.discard(actor_id)
        if error is not None or result is None:
            self._claim_failed(actor_id, error)
            self._slots.give(taken.count)  # the claims did not commit
            result = ClaimResult([], False)
        elif self._failing and self._failing.pop(actor_id, None) is not None:
            _log.info("claim_recovered", actor=actor_id)
        assert self._attempt_tg is not None
        for claimed in result.claimed:
            # Registered before the task starts, so shutdown waits for (and releases) it.
            attempt = self._register(actor_id, claimed)
            self._pool.start_soon(self._attempt, attempt, claimed)
        hinted = self._recheck.pop(actor_id, None)
        if result.more or (hinted is not None and hinted >= result.looked_at):
            self._ready[actor_id] = None
        elif result.next_due is not None:
            # A timer for the actor's next due time: it may be later than one already armed
            # (which keeps only the earliest), or written beside an earlier one in a commit.
            self.hint(actor_id, result.next_due)
        self._dispatch_wake.set()
        self._check_idle()

    def _claim_failed(self, actor_id: str, error: BaseException | None) -> None:
        """Put the poll's look at ``actor_id`` off, longer at each failure in a row; warn at
        the first (the same failure at every poll would flood the log)."""
        previous = self._failing.get(actor_id)
        poll_ms = max(1, round(self.config.poll_interval * 1000))
        wait_ms = poll_ms if previous is None else min(previous[1] * 2, _MAX_CLAIM_BACKOFF_MS)
        wait_ms = max(wait_ms, poll_ms)
        self._failing[actor_id] = (self.store.clock() + wait_ms, wait_ms)
        if previous is None:
            _log.warning("claim_failed", actor=actor_id, error=repr(error))
        else:
            _log.debug("claim_failed_again", actor=actor_id, error=repr(error), wait_ms=wait_ms)

    async def _renew_loop(self, scope: anyio.CancelScope) -> None:
        """Renew the leases of the running attempts, until ``scope`` (shielded: running
        attempts outlive a cancellation of ``serve``) is cancelled."""
        with scope:
            while True:
                await anyio.sleep(self.config.lease / 3)
                by_actor: dict[str, list[str]] = {}
                for attempt in self._running.values():
                    by_actor.setdefault(attempt.actor_id, []).append(attempt.token)
                async with anyio.create_task_group() as tg:
                    for actor_id, tokens in by_actor.items():
                        tg.start_soon(self._renew, actor_id, tokens)

    async def _renew(self, actor_id: str, tokens: list[str]) -> None:
        try:
            await self.store.run(actor_id, renew_op(self.host_id, tokens, self._lease_ms))
        except LedgerError as exc:
            self._renewal_failures.failed(actor=actor_id, error=str(exc))
            return
        self._renewal_failures.succeeded()

    # -- one attempt ----------------------------------------------------------------------

    def _register(self, actor_id: str, claimed: Claimed) -> _Attempt:
        row = claimed.row
        assert row.claim_token is not None
        attempt = _Attempt(actor_id, row.id, row.claim_token, AbortController())
        key = (actor_id, row.id)
        previous = self._running.get(key)
        if previous is not None:
            # An attempt of this intent still runs here, though its claim was lost: kept
            # apart (its slot taken, shutdown waiting for it) until it ends.
            self._superseded[previous.token] = previous
        self._running[key] = attempt
        self._tokens.add(row.claim_token)
        if row.cancel_requested_at is not None:
            # A redrive of an intent whose cancel was requested: start already aborted.
            attempt.controller.abort(row.cancel_reason)
        return attempt

    async def _attempt(self, attempt: _Attempt, claimed: Claimed) -> None:
        row = claimed.row
        actor_id = attempt.actor_id
        trigger = self.registry.get(row.trigger_kind)
        log = _log.bind(actor=actor_id, kind=trigger.kind, intent=row.id, attempt=row.attempts)
        started = time.perf_counter()
        if self._stopping:
            attempt.shutdown = True
            outcome, value = Outcome.SHUTDOWN, None
        else:
            try:
                outcome, value = await self._run_acquire(trigger, attempt, claimed, log)
            except BaseException:
                # Killed where anyio's shield does not reach (asyncio's runner cancels every
                # task after a second Ctrl-C): nothing settles it, so it is forgotten here,
                # or shutdown would wait for it; its lease runs out and its token guards the
                # redrive.
                self._forget(attempt)
                self.abandoned += 1
                raise
        if outcome is not Outcome.RETURNED and not isinstance(value, PutBack):
            if attempt.shutdown:
                outcome = Outcome.SHUTDOWN
            elif attempt.timed_out:
                outcome = Outcome.TIMED_OUT
        self._settle(attempt, trigger, claimed, outcome, value, log, started)

    def _finished(
        self,
        attempt: _Attempt,
        claimed: Claimed,
        settled: Settled,
        outcome: Outcome,
        value: Any,
        log: Any,
        started: float,
    ) -> None:
        self._forget(attempt)
        log.info(
            "attempt_finished",
            outcome=settled.value,
            redrive=bool(claimed.row.redrive),
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
            error=None if outcome is Outcome.RETURNED else repr(value),
        )

    def _forget(self, attempt: _Attempt) -> None:
        """The attempt has ended: its slot is free."""
        key = (attempt.actor_id, attempt.intent_event_id)
        if self._running.get(key) is attempt:
            del self._running[key]
        elif self._superseded.pop(attempt.token, None) is None:
            return  # forgotten already
        self._tokens.discard(attempt.token)
        self._slots.give(1)
        self._dispatch_wake.set()
        self._check_idle()

    async def _run_acquire(
        self, trigger: TriggerDef, attempt: _Attempt, claimed: Claimed, log: Any
    ) -> tuple[Outcome, Any]:
        row = claimed.row
        try:
            intent = trigger.parse(claimed.payload, claimed=True)
        except Exception as exc:
            return Outcome.RAISED, exc
        ctx = TriggerContext(
            backend=self._backend,
            signal=attempt.controller.signal,
            actor_id=attempt.actor_id,
            trigger_kind=trigger.kind,
            intent_event_id=row.id,
            attempt=row.attempts,
            redrive=bool(row.redrive),
            bindings=self.bindings,
            log=log,
            claim_token=attempt.token,
        )
        outcome: tuple[Outcome, Any] = (Outcome.RAISED, None)
        timer: asyncio.TimerHandle | None = None
        with anyio.CancelScope() as scope:
            attempt.scope = scope
            if trigger.timeout is not None:
                # A timer of the loop, not a task: nothing that cancels tasks (a cancelled
                # host) stops it, and it costs no task per attempt.
                loop = asyncio.get_running_loop()
                timer = loop.call_later(trigger.timeout, self._time_out, attempt)
            try:
                outcome = (Outcome.RETURNED, await trigger.start(intent, ctx))
            except BaseException as exc:
                # A CancelledError that is no cancellation of this attempt is an error like any
                # other: the acquire awaited something that was cancelled (a library's task).
                ours = scope.cancel_called and not isinstance(exc, Exception)
                if ours or not is_failure(exc):
                    raise
                outcome = (Outcome.RAISED, exc)
            finally:
                attempt.scope = None
                if timer is not None:
                    timer.cancel()
        return outcome

    @staticmethod
    def _time_out(attempt: _Attempt) -> None:
        """The attempt's ``timeout`` has passed: abort its signal and cut it short."""
        if attempt.scope is not None:
            attempt.timed_out = True
            attempt.controller.abort("timeout")
            attempt.scope.cancel()

    def _settle(
        self,
        attempt: _Attempt,
        trigger: TriggerDef,
        claimed: Claimed,
        outcome: Outcome,
        value: Any,
        log: Any,
        started: float,
    ) -> None:
        """Queue the settle transaction; the attempt is finished when it has committed.

        The store runs every queued operation before it closes, so the outcome lands even if
        this host is stopping. The operation re-checks the claim token, so retrying it after
        a storage error is safe.
        """
        row = claimed.row
        op = settle_op(
            self.registry,
            trigger,
            row.id,
            attempt.token,
            claimed.payload,
            outcome,
            value,
            trigger.retry.backoff(row.attempts),
        )

        def after(settled: Settled | None, error: BaseException | None) -> None:
            if settled is not None:
                self._finished(attempt, claimed, settled, outcome, value, log, started)
                return
            log.warning("settle_failed", error=repr(error))
            assert self._attempt_tg is not None
            self._attempt_tg.start_soon(
                self._settle_again, attempt, claimed, op, outcome, value, log, started
            )

        try:
            self.store.submit(attempt.actor_id, op, after, reads=row.id)
        except LedgerError as exc:
            after(None, exc)

    async def _settle_again(
        self,
        attempt: _Attempt,
        claimed: Claimed,
        op: Callable[[LedgerTx], Settled],
        outcome: Outcome,
        value: Any,
        log: Any,
        started: float,
    ) -> None:
        """Retry a settle that failed, backing off up to ``_SETTLE_RETRY_MAX_S``: for as long
        as the storage cannot be reached (``LedgerUnavailableError``, ``LedgerBusyError``)
        while the host runs, so the attempt's work is not lost to an outage; four tries for
        any other error (one the storage may give every time, such as a write the server
        refuses), or once the host is stopping. Then the lease runs out and the intent is
        redriven, up to its bound. The operation re-checks the claim token: if another host
        took the intent over meanwhile, it answers LOST."""
        settled = Settled.LOST
        delay, tries = _SETTLE_RETRY_FIRST_S, 0
        with anyio.CancelScope(shield=True):
            while True:
                await anyio.sleep(delay)
                try:
                    settled = await self.store.run(attempt.actor_id, op, reads=claimed.row.id)
                    break
                except Exception as exc:  # whatever it is, the attempt must finish here
                    tries += 1
                    if worth_a_warning(tries):
                        log.warning("settle_failed", error=repr(exc), retry=tries)
                    outage = isinstance(exc, (LedgerUnavailableError, LedgerBusyError))
                    if tries >= 4 and (self._stopping or not outage):
                        break
                delay = min(delay * 4, _SETTLE_RETRY_MAX_S)
        # Gave up (LOST): the lease runs out and the intent is redriven; the token guards it.
        self._finished(attempt, claimed, settled, outcome, value, log, started)


class _Backend:
    """The ``ContextBackend`` of attempts run by a scheduler."""

    __slots__ = ("_store",)

    def __init__(self, store: Store) -> None:
        self._store = store

    def now_ms(self) -> int:
        return self._store.clock()

    def version(self, actor_id: str) -> int:
        return self._store.version(actor_id)

    async def wait_changed(self, actor_id: str, version: int) -> None:
        await self._store.wait_changed(actor_id, version)

    async def read_events(
        self,
        actor_id: str,
        *,
        after: int,
        kinds: list[str] | None,
        intent_event_id: int | None,
        limit: int | None,
    ) -> list[Event]:
        def op(tx: LedgerTx) -> list[Event]:
            return tx.events(after=after, kinds=kinds, intent_event_id=intent_event_id, limit=limit)

        return await self._store.run(actor_id, op, write=False)

    async def stream_append(
        self, actor_id: str, intent_event_id: int, claim_token: str | None, text: str
    ) -> int:
        def op(tx: LedgerTx) -> int | None:
            if not _holds_claim(tx, intent_event_id, claim_token):
                return None
            return tx.stream_append(intent_event_id, [text])

        next_index = await self._store.run(actor_id, op, reads=intent_event_id)
        if next_index is None:
            raise _claim_lost(actor_id, intent_event_id)
        return next_index - 1

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
        def op(tx: LedgerTx) -> Event | None:
            if not _holds_claim(tx, intent_event_id, claim_token):
                return None
            if check is not None:
                check(tx)
            return tx.insert_event(kind, payload, intent_event_id, text=text)

        event = await self._store.run(actor_id, op, reads=intent_event_id)
        if event is None:
            raise _claim_lost(actor_id, intent_event_id)
        return event


def _holds_claim(tx: LedgerTx, intent_event_id: int, claim_token: str | None) -> bool:
    """True while the intent runs under ``claim_token`` (read with the actor's lock)."""
    row = tx.intent_row(intent_event_id)
    return row is not None and row.status == "running" and row.claim_token == claim_token


def _claim_lost(actor_id: str, intent_event_id: int) -> ClaimLostError:
    return ClaimLostError(
        f"intent {intent_event_id} of {actor_id!r}: this attempt no longer holds its claim"
        " (another attempt took the intent over, or it has ended); nothing was written"
    )
