"""The intent state machine under arbitrary interleavings (DESIGN §4-5), on real SQLite files.

A hypothesis ``RuleBasedStateMachine`` drives ``triggers._engine``'s ledger operations directly
against a ``ledger.LedgerStore`` in a temporary directory, with an injected clock: enqueue,
claims by two hosts (also declaring the other host dead), settles with every outcome, cancels,
crashes (a host forgets its claims and the clock runs past their leases), settles with stale or
foreign tokens, lease renewals, concurrent operations in one group-commit batch, and clock
advances. After every step it reads both actors' ledgers and checks the lifecycle invariants,
above all: exactly one terminal transition and one set of terminal facts per intent.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import sqlite3
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
from anyio.from_thread import start_blocking_portal
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from ledger import JSON, Event, IntentRow, IntentStatus, LedgerStore, LedgerTx, dump_json
from tests.helpers import CANCELLED, DONE, FAILED, make_trigger
from triggers import (
    AbortError,
    CancelResult,
    CancelStatus,
    FatalError,
    RetryPolicy,
    TriggerDef,
    TriggerRegistry,
)
from triggers._engine import (
    ATTEMPT_FAILED,
    CANCEL_REQUESTED,
    ClaimResult,
    EagerClaim,
    Enqueued,
    Outcome,
    Settled,
    cancel_op,
    claim_op,
    enqueue_op,
    new_token,
    renew_op,
    settle_op,
)
from triggers._engine import FAILED as TRIGGER_FAILED
from triggers._slots import Slots, Taken

T = TypeVar("T")
Key = tuple[str, int]
"""An intent: (actor, intent event id)."""
Op = Callable[[LedgerTx], Any]

ACTORS = ("a1", "a2")
HOSTS = ("h1", "h2")
ZOMBIE = "zombie"
"""Holds the claims of crashed hosts: a process presumed dead may still finish late."""
HOLDERS = (*HOSTS, ZOMBIE)
WORK = "test.work"
"""make_trigger's defaults: three attempts, commit_failed writes test.failed."""
ONCE = "test.once"
"""One attempt, no commit_failed: failures write the framework's trigger.failed."""
KINDS = (WORK, ONCE)
LEASE_MS = 1_000
MAX_REDRIVES = 2
START_MS = 1_700_000_000_000

TERMINAL_FACTS = {
    DONE: IntentStatus.COMPLETED,
    CANCELLED: IntentStatus.CANCELLED,
    TRIGGER_FAILED: IntentStatus.FAILED,
}
"""The one fact that ends each intent (commit_failed's ``FAILED`` comes just before
``trigger.failed``, as a domain fact of the same transition)."""
OUTCOMES = ("returned", "error", "fatal", "abort", "abort_with_reason", "timeout", "shutdown")
RETRYABLE_ERRORS = ("RuntimeError", "TimeoutError")
ABORT_REASON = "gave up"


def _registry() -> TriggerRegistry:
    once = make_trigger(ONCE, retry=RetryPolicy(max_attempts=1, initial_backoff=0, jitter=False))
    del once["commit_failed"]
    return TriggerRegistry([make_trigger(WORK), once])


def _outcome(label: str, n: int) -> tuple[Outcome, Any]:
    """The (outcome, value) the scheduler would pass to settle_op for an attempt that ended so."""
    match label:
        case "returned":
            return Outcome.RETURNED, {"result": n}
        case "error":
            return Outcome.RAISED, RuntimeError("boom")
        case "fatal":
            return Outcome.RAISED, FatalError("poison")
        case "abort":
            return Outcome.RAISED, AbortError()
        case "abort_with_reason":
            return Outcome.RAISED, AbortError(ABORT_REASON)
        case "timeout":
            return Outcome.TIMED_OUT, None
        case _:
            return Outcome.SHUTDOWN, None


def _predict_settle(row: IntentRow, label: str, max_attempts: int) -> Settled:
    """What settling the current claim of ``row`` must do (DESIGN §4.4-4.6)."""
    if label == "shutdown":
        return Settled.RELEASED
    if label == "returned":
        return Settled.COMPLETED
    if row.cancel_requested_at is not None or label.startswith("abort"):
        return Settled.CANCELLED
    if label == "fatal" or row.attempts >= max_attempts:
        return Settled.FAILED
    return Settled.RETRY


@dataclass(frozen=True, slots=True)
class Ledger:
    """One actor's schedule rows and events, as read in one transaction."""

    rows: dict[int, IntentRow]
    events: list[Event]

    def story(self) -> dict[int, list[Event]]:
        """Each intent's events, in id order (the intent event first)."""
        stories: dict[int, list[Event]] = {}
        for fact in self.events:
            if fact.intent_event_id is not None:
                stories.setdefault(fact.intent_event_id, []).append(fact)
        return stories


def _read(tx: LedgerTx) -> Ledger:
    return Ledger({row.id: row for row in tx.intent_rows()}, tx.events())


@dataclass(slots=True)
class Known:
    """What the test knows about one intent it enqueued."""

    kind: str
    payload: JSON
    requested: bool = False
    """A cancel answered ``requested``: the intent may only end cancelled or completed."""
    reason_set: bool = False
    reason: str | None = None
    """The first cancel reason recorded (first reason wins)."""


class EngineMachine(RuleBasedStateMachine):
    """Two actors, two hosts, one ledger store; the model tracks which claims each host holds."""

    def __init__(self) -> None:
        super().__init__()
        self.now = START_MS
        self.registry = _registry()
        self.intents: dict[Key, Known] = {}
        self.held: dict[str, dict[Key, str]] = {holder: {} for holder in HOLDERS}
        """The claim tokens each holder believes it holds (always the current ones)."""
        self.stale: list[tuple[Key, str]] = []
        """Tokens that once held a claim and must never settle anything again."""
        self.snap: dict[str, Ledger] = {actor: Ledger({}, []) for actor in ACTORS}
        self.checked = self.snap
        self.fresh = False
        """``snap`` is what the ledgers hold now (nothing was written since it was read)."""
        self.counter = 0
        self.clean = True
        """The last step and its invariant check passed (teardown then drains and checks)."""
        self._tmp = tempfile.TemporaryDirectory(prefix="engine-sm-")
        self._stack = contextlib.ExitStack()
        try:
            self.data_dir = Path(self._tmp.name) / "data"
            self.portal = self._stack.enter_context(start_blocking_portal("asyncio"))
            store = LedgerStore(self.data_dir, clock=self._clock)
            self.store = self._stack.enter_context(self.portal.wrap_async_context_manager(store))
        except BaseException:
            self._stack.close()
            self._tmp.cleanup()
            raise

    # -- plumbing -------------------------------------------------------------------------

    def _clock(self) -> int:
        return self.now

    def _run(self, actor: str, op: Callable[[LedgerTx], T], *, write: bool = True) -> T:
        self.fresh = self.fresh and not write
        return self.portal.call(functools.partial(self.store.run, actor, op, write=write))

    async def _gather(self, calls: Sequence[tuple[str, Op, bool]]) -> list[Any]:
        """Submit all calls at once (they share a group-commit batch) and collect results."""
        results: list[Any] = [None] * len(calls)

        async def one(i: int, actor: str, op: Op, write: bool) -> None:
            results[i] = await self.store.run(actor, op, write=write)

        async with anyio.create_task_group() as tg:
            for i, (actor, op, write) in enumerate(calls):
                tg.start_soon(one, i, actor, op, write)
        return results

    def _race(self, actor: str, ops: Sequence[Op]) -> list[Any]:
        self.fresh = False
        return self.portal.call(self._gather, [(actor, op, True) for op in ops])

    def _refresh(self) -> dict[str, Ledger]:
        ledgers = self.portal.call(self._gather, [(actor, _read, False) for actor in ACTORS])
        self.fresh = True
        self.snap = dict(zip(ACTORS, ledgers, strict=True))
        return self.snap

    def _begin(self) -> None:
        self.clean = False
        self.counter += 1

    def _keys(self, actor: str | None = None) -> list[Key]:
        return sorted(key for key in self.intents if actor is None or key[0] == actor)

    def _held_pairs(self) -> list[tuple[str, Key]]:
        return sorted((host, key) for host in HOLDERS for key in self.held[host])

    def _trigger_of(self, key: Key) -> TriggerDef:
        return self.registry.get(self.intents[key].kind)

    def _drop(self, host: str, key: Key) -> None:
        """``host`` no longer holds ``key``: its token becomes stale."""
        token = self.held[host].pop(key)
        self.stale.append((key, token))

    def _take(self, host: str, key: Key, token: str) -> None:
        """``host`` now holds ``key`` under ``token``; whoever held it before lost it."""
        for other in HOLDERS:
            if key in self.held[other]:
                self._drop(other, key)
        self.held[host][key] = token

    def _note_reason(self, key: Key, row: IntentRow, candidates: Sequence[str | None]) -> None:
        """Record the first cancel reason once the row shows a request."""
        known = self.intents[key]
        if row.cancel_requested_at is not None and not known.reason_set:
            assert row.cancel_reason in candidates, (key, row.cancel_reason, candidates)
            known.reason_set, known.reason = True, row.cancel_reason

    def _claim_op(
        self,
        host: str,
        limit: int,
        dead: Sequence[str],
        slots: Slots | None = None,
        taken: Taken | None = None,
    ) -> Op:
        return claim_op(
            self.registry,
            limit=limit,
            host_id=host,
            lease_ms=LEASE_MS,
            dead_owners=list(dead),
            own_tokens=frozenset(self.held[host].values()),
            max_redrives=MAX_REDRIVES,
            slots=Slots(limit) if slots is None else slots,
            taken=Taken() if taken is None else taken,
        )

    def _lost(self, row: IntentRow, dead: Sequence[str], own: frozenset[str]) -> bool:
        """Would a claim with ``dead`` and ``own`` treat ``row``'s claim as lost?"""
        return (
            row.status == IntentStatus.RUNNING
            and row.claim_token not in own
            and ((row.lease_until is not None and row.lease_until <= self.now)
                 or row.claimed_by in dead)
        )  # fmt: skip

    # -- rules ----------------------------------------------------------------------------

    @initialize(
        work=st.lists(st.tuples(st.sampled_from(ACTORS), st.sampled_from(KINDS)), max_size=4)
    )
    def seed(self, work: list[tuple[str, str]]) -> None:
        """Start with a few intents due now, so that most runs have work to race over."""
        for actor, kind in work:
            self.enqueue(actor, kind, None, None)

    @rule(
        actor=st.sampled_from(ACTORS),
        kind=st.sampled_from(KINDS),
        delay=st.sampled_from([None, 0, 400, 2_500]),
        eager=st.sampled_from([None, *HOSTS]),
    )
    def enqueue(self, actor: str, kind: str, delay: int | None, eager: str | None) -> None:
        """Record an intent; with ``eager``, that host claims it in the same transaction."""
        self._begin()
        before = self.snap[actor]
        trigger = self.registry.get(kind)
        payload = {"n": self.counter}
        due_at = None if delay is None else self.now + delay
        eager_claim = None if eager is None else EagerClaim(eager, LEASE_MS, self.registry.kinds)
        enqueued: Enqueued = self._run(
            actor, enqueue_op(trigger, payload, dump_json(payload), due_at, None, 0, eager_claim)
        )
        intent = enqueued.event
        assert enqueued.created
        assert intent.kind == trigger.intent_event_kind
        assert intent.intent_event_id == intent.id
        assert intent.payload == payload
        key = (actor, intent.id)
        self.intents[key] = Known(kind, payload)
        row = self._refresh()[actor].rows[intent.id]
        assert row.due_at == (self.now if due_at is None else due_at)
        older_due = any(
            r.status == IntentStatus.PENDING and r.due_at <= self.now for r in before.rows.values()
        )
        if eager is None or row.due_at > self.now or older_due:
            assert enqueued.claimed is None
            assert row.status == IntentStatus.PENDING
            return
        assert enqueued.claimed is not None, "an eager enqueue did not claim its due intent"
        assert enqueued.claimed.row == row
        assert enqueued.claimed.payload == payload
        assert (row.status, row.claimed_by, row.attempts) == (IntentStatus.RUNNING, eager, 1)
        assert row.lease_until == self.now + LEASE_MS
        assert row.claim_token is not None
        self._take(eager, key, row.claim_token)

    @rule(
        host=st.sampled_from(HOSTS),
        actor=st.sampled_from(ACTORS),
        limit=st.integers(1, 3),
        free=st.integers(0, 3),
        steal=st.booleans(),
    )
    def claim(self, host: str, actor: str, limit: int, free: int, steal: bool) -> None:
        """Claim due intents and lost claims, up to ``limit`` and the ``free`` attempt slots;
        ``steal`` declares the other host dead."""
        self._begin()
        before = self.snap[actor]
        dead = [h for h in HOSTS if h != host] if steal else []
        own = frozenset(self.held[host].values())
        slots, taken = Slots(free), Taken()
        result: ClaimResult = self._run(actor, self._claim_op(host, limit, dead, slots, taken))
        after = self._refresh()[actor]
        limit = min(limit, free)
        assert len(result.claimed) <= limit
        assert slots.free == free - len(result.claimed), "slots kept for no claim"
        assert taken.count == len(result.claimed)
        claimed = {c.row.id for c in result.claimed}
        assert len(claimed) == len(result.claimed), "an intent was claimed twice in one claim"
        for c in result.claimed:
            key = (actor, c.row.id)
            old, new = before.rows[c.row.id], after.rows[c.row.id]
            assert c.row == new, "the claimed row handed to the scheduler differs from the ledger"
            assert c.payload == self.intents[key].payload
            assert new.status == IntentStatus.RUNNING
            assert new.claimed_by == host
            assert new.lease_until == self.now + LEASE_MS
            assert new.claim_token not in (old.claim_token, None)
            if old.status == IntentStatus.PENDING:
                assert old.due_at <= self.now, "claimed an intent before it was due"
                assert (new.attempts, new.redrives) == (old.attempts + 1, old.redrives)
            else:
                assert self._lost(old, dead, own), "took over a claim that was not lost"
                assert old.redrives < MAX_REDRIVES
                assert (new.attempts, new.redrives, new.redrive) == (
                    old.attempts, old.redrives + 1, 1,
                )  # fmt: skip
            assert c.row.claim_token is not None
            self._take(host, key, c.row.claim_token)
        for intent_id, old in before.rows.items():
            new = after.rows[intent_id]
            if intent_id in claimed or new == old:
                continue
            # The only other change a claim makes: ending an intent lost too many times,
            # failed (or cancelled, if a cancel was requested).
            assert self._lost(old, dead, own), (old, new)
            assert old.redrives >= MAX_REDRIVES
            fact = self._terminal_fact(after, intent_id)
            if new.status == IntentStatus.FAILED:
                assert fact.payload["error_type"] == "RedriveLimitExceeded"
            else:
                assert new.status == IntentStatus.CANCELLED
                assert old.cancel_requested_at is not None
            for h in HOLDERS:
                if (actor, intent_id) in self.held[h]:
                    self._drop(h, (actor, intent_id))
            event(f"claim: redrive limit ended an intent {new.status}")
        if len(result.claimed) < limit or not result.more:
            # Nothing claimable may be left behind unless the claim says there is more.
            for row in after.rows.values():
                assert not (row.status == IntentStatus.PENDING and row.due_at <= self.now), (
                    f"due intent {row.id} left unclaimed, more={result.more}"
                )
                assert not self._lost(row, dead, own), (
                    f"lost claim {row.id} left behind, more={result.more}"
                )

    @precondition(lambda self: self._held_pairs())
    @rule(data=st.data(), label=st.sampled_from(OUTCOMES), backoff=st.sampled_from([0.0, 0.5]))
    def settle(self, data: st.DataObject, label: str, backoff: float) -> None:
        """The holder of a claim ends its attempt; the result is fully predictable."""
        self._begin()
        host, key = data.draw(st.sampled_from(self._held_pairs()), label="holder, intent")
        actor, intent_id = key
        trigger = self._trigger_of(key)
        before = self.snap[actor]
        old = before.rows[intent_id]
        expected = _predict_settle(old, label, trigger.retry.max_attempts)
        outcome, value = _outcome(label, self.counter)
        token = self.held[host][key]
        settled = self._run(
            actor,
            settle_op(
                self.registry, trigger, intent_id, token, self.intents[key].payload,
                outcome, value, backoff,
            ),
        )  # fmt: skip
        assert settled == expected, (settled, expected, old)
        event(f"settle: {settled}")
        self._drop(host, key)
        after = self._refresh()[actor]
        new = after.rows[intent_id]
        added = after.events[len(before.events) :]
        assert all(e.intent_event_id == intent_id for e in added)
        assert {i: r for i, r in after.rows.items() if i != intent_id} == {
            i: r for i, r in before.rows.items() if i != intent_id
        }, "settling one intent changed another"
        if expected is Settled.RELEASED:
            assert added == []
            assert new.status == IntentStatus.PENDING
            assert (new.attempts, new.redrive, new.due_at) == (old.attempts - 1, 1, self.now)
            return
        if expected is Settled.RETRY:
            assert [e.kind for e in added] == [ATTEMPT_FAILED]
            assert added[0].payload["attempt"] == old.attempts
            assert new.status == IntentStatus.PENDING
            assert (new.attempts, new.redrive) == (old.attempts, 0)
            assert new.due_at == self.now + round(backoff * 1000)
            return
        trigger = self.registry.get(self.intents[key].kind)
        if expected is Settled.FAILED and trigger.commit_failed:
            assert [e.kind for e in added[:-1]] == [FAILED]
            assert added[0].payload == added[-1].payload
            added = added[-1:]
        assert len(added) == 1
        fact = added[0]
        if expected is Settled.COMPLETED:
            assert (new.status, fact.kind, fact.payload) == (IntentStatus.COMPLETED, DONE, value)
        elif expected is Settled.CANCELLED:
            reason = ABORT_REASON if label == "abort_with_reason" else None
            self._note_reason(key, new, [reason])
            assert (new.status, fact.kind) == (IntentStatus.CANCELLED, CANCELLED)
            assert fact.payload == {"reason": self.intents[key].reason}
        else:
            assert (new.status, fact.kind) == (IntentStatus.FAILED, TRIGGER_FAILED)
            error_type = {"fatal": "FatalError", "timeout": "TimeoutError"}.get(
                label, "RuntimeError"
            )
            assert fact.payload["error_type"] == error_type
            assert fact.payload["attempts"] == old.attempts

    @precondition(lambda self: self.intents)
    @rule(
        data=st.data(),
        label=st.sampled_from(OUTCOMES),
        source=st.sampled_from(["stale", "foreign", "random"]),
    )
    def stale_settle(self, data: st.DataObject, label: str, source: str) -> None:
        """A settle with a token that does not hold the claim is LOST and writes nothing."""
        self._begin()
        foreign = [
            (key, self.held[host][held_key])
            for host, held_key in self._held_pairs()
            for key in self._keys(held_key[0])
            if key != held_key
        ]
        if source == "stale" and self.stale:
            key, token = data.draw(st.sampled_from(self.stale), label="stale claim")
        elif source == "foreign" and foreign:
            key, token = data.draw(st.sampled_from(foreign), label="another intent's claim")
        else:
            key, token = data.draw(st.sampled_from(self._keys()), label="intent"), new_token()
        actor, intent_id = key
        before = self.snap
        outcome, value = _outcome(label, self.counter)
        settled = self._run(
            actor,
            settle_op(
                self.registry, self._trigger_of(key), intent_id, token,
                self.intents[key].payload, outcome, value, 0,
            ),
        )  # fmt: skip
        assert settled is Settled.LOST
        assert self._refresh() == before, "a settle without the claim changed the ledger"

    @precondition(lambda self: self.intents)
    @rule(
        actor=st.sampled_from(ACTORS),
        data=st.data(),
        aim=st.sampled_from(["intent", "intent", "intent", "wrong_kind", "fact", "unknown"]),
        reason=st.sampled_from([None, "user", "again"]),
        requested_by=st.sampled_from([None, "ops"]),
    )
    def cancel(
        self,
        actor: str,
        data: st.DataObject,
        aim: str,
        reason: str | None,
        requested_by: str | None,
    ) -> None:
        """cancel_trigger's answer matches the intent's state (DESIGN §5)."""
        self._begin()
        before = self.snap[actor]
        keys = self._keys(actor)
        intent_ids = set(before.rows)
        facts = [e.id for e in before.events if e.id not in intent_ids]
        known: Key | None = None
        trigger = self.registry.get(WORK)
        if aim in ("intent", "wrong_kind") and keys:
            known = data.draw(st.sampled_from(keys), label="intent")
            trigger = self.registry.get(self.intents[known].kind)
            if aim == "wrong_kind":
                trigger = self.registry.get(next(k for k in KINDS if k != trigger.kind))
            intent_id = known[1]
        elif aim == "fact" and facts:
            intent_id = data.draw(st.sampled_from(facts), label="fact id")
        else:
            intent_id = data.draw(st.sampled_from([0, -1, len(before.events) + 1000]))
        result: CancelResult = self._run(
            actor, cancel_op(self.registry, trigger, intent_id, reason, requested_by)
        )
        assert result.intent_event_id == intent_id
        event(f"cancel: {result.status}")
        after = self._refresh()[actor]
        old = before.rows.get(intent_id)
        if old is None or old.trigger_kind != trigger.kind:
            assert result.status is CancelStatus.NOT_FOUND, result
            assert after == before, "a not_found cancel wrote something"
            return
        assert known is not None
        assert result.status is not CancelStatus.NOT_FOUND, "a known intent was not found"
        new = after.rows[intent_id]
        added = after.events[len(before.events) :]
        first = old.cancel_requested_at is None
        status = IntentStatus(old.status)
        if status.terminal:
            assert result.status is CancelStatus.ALREADY_COMPLETED, result
            assert result.terminal_status == status == IntentStatus(new.status)
            assert after == before, "cancelling an ended intent wrote something"
            return
        self._note_reason(known, new, [reason])
        if status is IntentStatus.PENDING:
            assert result.status is CancelStatus.CANCELLED, result
            assert result.terminal_status == new.status == IntentStatus.CANCELLED
            assert [(e.kind, e.payload) for e in added] == [
                (CANCELLED, {"reason": self.intents[known].reason})
            ]
            return
        assert result.status is CancelStatus.REQUESTED, result
        assert result.terminal_status is None
        self.intents[known].requested = True
        assert (new.status, new.claim_token, new.claimed_by, new.lease_until) == (
            old.status, old.claim_token, old.claimed_by, old.lease_until,
        ), "a cancel touched a running claim"  # fmt: skip
        assert new.cancel_reason == (reason if first else old.cancel_reason)
        expected = (
            [(CANCEL_REQUESTED, {"reason": reason, "requested_at": self.now,
                                 "requested_by": requested_by})]
            if first else []
        )  # fmt: skip
        assert [(e.kind, e.payload) for e in added] == expected

    @rule(host=st.sampled_from(HOSTS), other_renews=st.booleans())
    def crash(self, host: str, other_renews: bool) -> None:
        """``host`` dies and restarts without its claims; time runs past their leases."""
        self._begin()
        self.held[ZOMBIE].update(self.held[host])
        self.held[host].clear()
        self.now += LEASE_MS
        if other_renews:
            self._renew(next(h for h in HOSTS if h != host))

    @rule(host=st.sampled_from(HOSTS))
    def renew(self, host: str) -> None:
        """A host extends the leases of the claims it holds."""
        self._begin()
        self._renew(host)

    def _renew(self, host: str) -> None:
        for actor in ACTORS:
            tokens = [token for key, token in sorted(self.held[host].items()) if key[0] == actor]
            if not tokens:
                continue
            assert self._run(actor, renew_op(host, tokens, LEASE_MS)) == len(tokens)
            rows = self._refresh()[actor].rows
            for key, token in self.held[host].items():
                if key[0] == actor:
                    row = rows[key[1]]
                    assert (row.claim_token, row.lease_until) == (token, self.now + LEASE_MS)

    @rule(ms=st.sampled_from([1, 400, LEASE_MS, 3 * LEASE_MS]))
    def advance_clock(self, ms: int) -> None:
        """Time passes: retries and delayed intents fall due, unrenewed leases run out."""
        self._begin()
        self.now += ms

    @rule(data=st.data(), actor=st.sampled_from(ACTORS))
    def race(self, data: st.DataObject, actor: str) -> None:
        """Claims by both hosts, a settle and a cancel in one batch, in any order."""
        self._begin()
        calls: list[tuple[str, Op]] = []
        steals: dict[str, bool] = {}
        for host in HOSTS:
            steals[host] = data.draw(st.booleans(), label=f"{host} declares the other dead")
            dead = [h for h in HOSTS if h != host] if steals[host] else []
            calls.append((host, self._claim_op(host, 3, dead)))
        settling: tuple[str, Key, str] | None = None
        pairs = [(h, k) for h, k in self._held_pairs() if k[0] == actor]
        if bool(pairs) and data.draw(st.booleans(), label="with a settle"):
            host, key = data.draw(st.sampled_from(pairs), label="holder, intent")
            label = data.draw(st.sampled_from(OUTCOMES), label="outcome")
            outcome, value = _outcome(label, self.counter)
            settling = (host, key, label)
            calls.append((
                "settle",
                settle_op(
                    self.registry, self._trigger_of(key), key[1], self.held[host][key],
                    self.intents[key].payload, outcome, value, 0,
                ),
            ))  # fmt: skip
            self._drop(host, key)
        cancelling: tuple[Key, str | None] | None = None
        keys = self._keys(actor)
        if bool(keys) and data.draw(st.booleans(), label="with a cancel"):
            key = data.draw(st.sampled_from(keys), label="cancelled intent")
            reason = data.draw(st.sampled_from([None, "race"]), label="reason")
            cancelling = (key, reason)
            trigger = self._trigger_of(key)
            calls.append(("cancel", cancel_op(self.registry, trigger, key[1], reason, None)))
        order = data.draw(st.permutations(range(len(calls))), label="submission order")
        calls = [calls[i] for i in order]
        results = dict(
            zip(
                [name for name, _ in calls],
                self._race(actor, [op for _, op in calls]),
                strict=True,
            )
        )
        after = self._refresh()[actor]

        claimed: dict[str, dict[int, str]] = {}
        for host in HOSTS:
            result: ClaimResult = results[host]
            claimed[host] = {c.row.id: str(c.row.claim_token) for c in result.claimed}
        both = claimed["h1"].keys() & claimed["h2"].keys()
        assert not both or any(steals.values()), f"both hosts claimed {both} without a steal"
        if both:
            event("race: both hosts claimed one intent")

        def redrive_limit(intent_id: int) -> bool:
            """Did a claim in the batch end this intent for being lost too often?"""
            row = after.rows[intent_id]
            return IntentStatus(row.status).terminal and row.redrives == MAX_REDRIVES

        # Claims held before the batch and no longer current were taken over in it.
        for host in HOLDERS:
            for key, token in sorted(self.held[host].items()):
                if key[0] == actor and after.rows[key[1]].claim_token != token:
                    others = [h for h in HOSTS if h != host]
                    assert any(key[1] in claimed[h] for h in others) or redrive_limit(key[1]), key
                    self._drop(host, key)
        for host in HOSTS:
            for intent_id, token in claimed[host].items():
                row = after.rows[intent_id]
                if row.claim_token == token:
                    assert (row.status, row.claimed_by) == (IntentStatus.RUNNING, host)
                    self._take(host, (actor, intent_id), token)
                else:
                    self.stale.append(((actor, intent_id), token))
        if settling is not None:
            host, key, label = settling
            event(f"race: settle {results['settle']}")
            if results["settle"] is Settled.LOST:
                others = [h for h in HOSTS if h != host]
                assert any(key[1] in claimed[h] for h in others) or redrive_limit(key[1]), (
                    "a settle by the holder was lost though nobody took its claim"
                )
        if cancelling is not None:
            key, reason = cancelling
            answer: CancelResult = results["cancel"]
            event(f"race: cancel {answer.status}")
            row = after.rows[key[1]]
            assert answer.status is not CancelStatus.NOT_FOUND
            if answer.status is CancelStatus.CANCELLED:
                assert answer.terminal_status == row.status == IntentStatus.CANCELLED
                assert not any(key[1] in c for c in claimed.values())
            elif answer.status is CancelStatus.ALREADY_COMPLETED:
                assert answer.terminal_status == IntentStatus(row.status)
            else:
                assert answer.status is CancelStatus.REQUESTED
                self.intents[key].requested = True
        for intent_id, row in after.rows.items():
            candidates: list[str | None] = []
            if cancelling is not None and cancelling[0][1] == intent_id:
                candidates.append(cancelling[1])
            if settling is not None and settling[1][1] == intent_id:
                candidates.append(ABORT_REASON if settling[2] == "abort_with_reason" else None)
            self._note_reason((actor, intent_id), row, candidates)

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def ledgers_are_consistent(self) -> None:
        """Every intent's row agrees with its facts; the ledger only ever grows."""
        checked = self.checked
        snap = self.snap if self.fresh else self._refresh()
        for actor in ACTORS:
            self._check_ledger(actor, checked[actor], snap[actor])
        for host in HOLDERS:
            for (actor, intent_id), token in self.held[host].items():
                row = snap[actor].rows[intent_id]
                assert (row.status, row.claim_token) == (IntentStatus.RUNNING, token), (
                    f"{host} lost its claim on {actor}/{intent_id} unnoticed"
                )
                assert host == ZOMBIE or row.claimed_by == host
        holders = [key for host in HOLDERS for key in self.held[host]]
        assert len(holders) == len(set(holders)), "two holders hold one intent"
        for (actor, intent_id), token in self.stale:
            assert snap[actor].rows[intent_id].claim_token != token, "a stale token came back"
        self.checked = snap
        self.clean = True

    def _check_ledger(self, actor: str, before: Ledger, after: Ledger) -> None:
        ids = [e.id for e in after.events]
        assert all(a < b for a, b in itertools.pairwise(ids)), "event ids must increase"
        assert after.events[: len(before.events)] == before.events, "the ledger is append-only"
        for intent_id, old in before.rows.items():
            if IntentStatus(old.status).terminal:
                assert after.rows[intent_id] == old, "an ended intent changed"
        assert set(after.rows) == {key[1] for key in self._keys(actor)}
        stories = after.story()
        assert set(stories) <= set(after.rows), "a fact points to no intent"
        for intent_id, row in after.rows.items():
            self._check_row((actor, intent_id), row, stories.get(intent_id, []))

    def _check_row(self, key: Key, row: IntentRow, story: list[Event]) -> None:
        known = self.intents[key]
        trigger = self.registry.get(known.kind)
        status = IntentStatus(row.status)
        state = row.state()
        where = f"intent {key}: {row}"
        intent_event = story[0]
        assert (intent_event.id, intent_event.kind, intent_event.payload) == (
            row.id, trigger.intent_event_kind, known.payload,
        ), where  # fmt: skip
        assert row.trigger_kind == known.kind, where
        terminal = [e for e in story if e.kind in TERMINAL_FACTS]
        assert 0 <= row.attempts <= trigger.retry.max_attempts, where
        assert 0 <= row.redrives <= MAX_REDRIVES, where
        retries = [e.payload["attempt"] for e in story if e.kind == ATTEMPT_FAILED]
        assert all(a < b for a, b in itertools.pairwise(retries)), where
        assert all(a < trigger.retry.max_attempts for a in retries), where
        assert sum(e.kind == CANCEL_REQUESTED for e in story) <= 1, where
        if status.terminal:
            assert len(terminal) == 1, f"{len(terminal)} terminal facts for {where}"
            fact = terminal[0]
            assert TERMINAL_FACTS[fact.kind] is status, where
            domain = [e.id for e in story if e.kind == FAILED]
            if status is IntentStatus.FAILED and trigger.commit_failed:
                assert domain == [fact.id - 1], f"commit_failed's fact is missing: {where}"
                assert state.terminal_event_ids == (fact.id - 1, fact.id), where
            else:
                assert domain == [], where
                assert state.terminal_event_ids == (fact.id,), where
            assert story[-1] == fact, f"facts written after the terminal one: {where}"
            assert row.finished_at is not None, where
            assert (row.claim_token, row.lease_until) == (None, None), where
        else:
            assert terminal == [], f"terminal facts for a live intent: {where}"
            assert state.terminal_event_ids == (), where
            assert row.finished_at is None, where
            if status is IntentStatus.RUNNING:
                assert None not in (row.claim_token, row.claimed_by, row.lease_until), where
                assert row.attempts >= 1, where
            else:
                assert (row.claim_token, row.claimed_by, row.lease_until) == (None,) * 3, where
        if status is IntentStatus.FAILED:
            fact = terminal[0]
            assert fact.kind == TRIGGER_FAILED, where
            assert fact.payload["attempts"] == row.attempts, where
            if fact.payload["error_type"] in RETRYABLE_ERRORS:
                assert row.attempts == trigger.retry.max_attempts, where
            elif fact.payload["error_type"] == "RedriveLimitExceeded":
                assert row.redrives == MAX_REDRIVES, where
            else:
                assert fact.payload["error_type"] == "FatalError", where
        if status is IntentStatus.CANCELLED:
            assert terminal[0].payload == {"reason": row.cancel_reason}, where
        if row.cancel_requested_at is None:
            assert not known.reason_set, f"a cancel request vanished: {where}"
        else:
            assert known.reason_set, f"a cancel request came from nowhere: {where}"
            assert row.cancel_reason == known.reason, (
                f"first cancel reason {known.reason!r} did not win: {where}"
            )
        if known.requested and status.terminal:
            assert status in (IntentStatus.CANCELLED, IntentStatus.COMPLETED), (
                f"cancel answered requested, yet the intent ended {status}: {where}; "
                f"facts: {[(e.kind, e.payload) for e in story]}"
            )

    @staticmethod
    def _terminal_fact(ledger: Ledger, intent_id: int) -> Event:
        facts = [e for e in ledger.story().get(intent_id, []) if e.kind in TERMINAL_FACTS]
        assert len(facts) == 1, facts
        return facts[0]

    # -- the end --------------------------------------------------------------------------

    def drain(self) -> None:
        """Settle every claim, then let time pass and claim and complete everything left."""
        for _ in range(2 * MAX_REDRIVES + 4):
            for host, key in self._held_pairs():
                actor, intent_id = key
                settled = self._run(
                    actor,
                    settle_op(
                        self.registry, self._trigger_of(key), intent_id, self.held[host][key],
                        self.intents[key].payload, Outcome.RETURNED, {"drained": True}, 0,
                    ),
                )  # fmt: skip
                assert settled is Settled.COMPLETED, (key, settled)
                self._drop(host, key)
            snap = self._refresh()
            if all(
                IntentStatus(row.status).terminal
                for ledger in snap.values()
                for row in ledger.rows.values()
            ):
                break
            self.now += 3 * LEASE_MS
            for actor in ACTORS:
                result = self._run(actor, self._claim_op("h1", 10_000, []))
                for c in result.claimed:
                    self._take("h1", (actor, c.row.id), str(c.row.claim_token))
            self.ledgers_are_consistent()
        else:
            pytest.fail("draining did not end every intent")
        self.ledgers_are_consistent()

    def teardown(self) -> None:
        try:
            if self.clean:
                self.drain()
        finally:
            try:
                self._stack.close()
                if self.clean:
                    for path in sorted(self.data_dir.rglob("*.db")):
                        with contextlib.closing(sqlite3.connect(path)) as conn:
                            rows = conn.execute("PRAGMA integrity_check").fetchall()
                        assert rows == [("ok",)], (path, rows)
            finally:
                self._tmp.cleanup()


def _settings(examples: int, steps: int) -> settings:
    return settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


# A passing run takes seconds; the larger timeouts leave hypothesis time to shrink a failure
# to a minimal sequence (each shrink step replays a whole machine on fresh SQLite files).
@pytest.mark.timeout(600)
def test_exactly_one_terminal_transition_per_intent() -> None:
    """Any interleaving of enqueue/claim/settle/cancel/crash ends each intent exactly once."""
    run_state_machine_as_test(EngineMachine, settings=_settings(examples=60, steps=40))


@pytest.mark.slow
@pytest.mark.timeout(3_600)
def test_exactly_one_terminal_transition_per_intent_soak() -> None:
    """The same property over many more and longer interleavings."""
    run_state_machine_as_test(EngineMachine, settings=_settings(examples=1_500, steps=120))


# -- the minimal sequences behind the machine's findings, as plain tests -------------------


def _claim(registry: TriggerRegistry, host: str, limit: int) -> Op:
    return claim_op(
        registry,
        limit=limit,
        host_id=host,
        lease_ms=LEASE_MS,
        dead_owners=[],
        own_tokens=frozenset(),
        max_redrives=MAX_REDRIVES,
        slots=Slots(limit),
        taken=Taken(),
    )


def _enqueue(registry: TriggerRegistry, n: int) -> Op:
    payload = {"n": n}
    return enqueue_op(registry.get(WORK), payload, dump_json(payload), None, None, 0)


@pytest.mark.anyio
async def test_cancel_requested_survives_the_redrive_limit(tmp_path: Path) -> None:
    """A cancel answered ``requested`` ends the intent cancelled even when its lost claim
    reaches the redrive limit (DESIGN §4.7: cancellation survives any crash)."""
    now = START_MS
    registry = _registry()
    async with LedgerStore(tmp_path, clock=lambda: now) as store:
        intent_id = (await store.run("a1", _enqueue(registry, 1))).event.id
        assert len((await store.run("a1", _claim(registry, "h1", 1))).claimed) == 1
        cancel = cancel_op(registry, registry.get(WORK), intent_id, "user", None)
        assert (await store.run("a1", cancel)).status is CancelStatus.REQUESTED
        for host in ("h2", "h1")[:MAX_REDRIVES]:
            now += LEASE_MS  # the holder crashed: its lease runs out and the claim is redriven
            redrive = (await store.run("a1", _claim(registry, host, 1))).claimed
            assert [(c.row.id, c.row.redrive) for c in redrive] == [(intent_id, 1)]
        now += LEASE_MS  # lost once more: the redrive limit is reached
        await store.run("a1", _claim(registry, "h2", 1))
        row = await store.run("a1", lambda tx: tx.intent_row(intent_id), write=False)
        facts = await store.run("a1", lambda tx: tx.events(intent_event_id=intent_id), write=False)
    assert row is not None
    assert [(e.kind, e.payload) for e in facts if e.kind in TERMINAL_FACTS] == [
        (CANCELLED, {"reason": "user"})
    ]
    assert row.status == IntentStatus.CANCELLED


@pytest.mark.anyio
async def test_claim_says_more_when_redrives_fill_the_batch(tmp_path: Path) -> None:
    """A claim whose batch is filled by redrives reports ``more`` while due intents wait."""
    now = START_MS
    registry = _registry()
    async with LedgerStore(tmp_path, clock=lambda: now) as store:
        for n in range(2):
            await store.run("a1", _enqueue(registry, n))
        first = await store.run("a1", _claim(registry, "h1", 1))
        assert len(first.claimed) == 1
        assert first.more
        now += LEASE_MS  # h1 crashed: its claim is lost
        second = await store.run("a1", _claim(registry, "h2", 1))
        assert [c.row.redrive for c in second.claimed] == [1]
        waiting = await store.run("a1", lambda tx: tx.intent_rows(status="pending"), write=False)
    assert len(waiting) == 1
    assert second.more, "a due intent waits, yet the claim said there is no more work"
