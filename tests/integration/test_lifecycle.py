"""Intent lifecycle (DESIGN §4): retries, failures, timeouts, shutdown, redrives, enqueue."""

from __future__ import annotations

import asyncio
import gc
import inspect
import math
from contextlib import aclosing
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from actors import define_agent_do
from ledger import IntentStatus, PayloadError, Projection, ProjectionError, system_clock
from tests.helpers import (
    CANCELLED,
    DONE,
    FAILED,
    TERMINAL_KINDS,
    Acquire,
    Gate,
    ManualClock,
    fast_config,
    make_trigger,
    noop,
    open_host,
    wait_until,
)
from triggers import AbortError, CancelStatus, FatalError, RetryPolicy, TriggerContext, Tx
from triggers._engine import ATTEMPT_FAILED, claim_op
from triggers._slots import Slots, Taken

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine, Sequence
    from pathlib import Path

    from actors import ActorHost, Agent
    from ledger import JSON, Event, IntentState
    from triggers import DurableTrigger

pytestmark = [pytest.mark.anyio, pytest.mark.contract]

KIND = "test.work"


# -- helpers -------------------------------------------------------------------------------


class Flaky:
    """An acquire that fails its first ``failures`` attempts, then returns."""

    def __init__(self, failures: int, error: type[Exception] = RuntimeError) -> None:
        self.failures = failures
        self.error = error
        self.attempts: list[int] = []
        self.times: list[int] = []

    async def acquire(self, intent: JSON, ctx: TriggerContext) -> JSON:
        self.attempts.append(ctx.attempt)
        self.times.append(round(ctx.now().timestamp() * 1000))
        if len(self.attempts) <= self.failures:
            raise self.error(f"boom {ctx.attempt}")
        return {"attempt": ctx.attempt}


async def terminal(agent: Agent, intent_event_id: int) -> IntentState:
    with anyio.fail_after(10):
        return await agent.wait_for_intent(intent_event_id)


async def facts(agent: Agent, kind: str, intent_event_id: int | None = None) -> list[Event]:
    return await agent.events(kinds=[kind], intent_event_id=intent_event_id)


async def next_event(agent: Agent, kind: str) -> Event:
    """The first event of ``kind``, waiting for it to be written."""
    with anyio.fail_after(10):
        tail = agent.tail()
        async with aclosing(tail) as events:
            async for event in events:
                if event.kind == kind:
                    return event
    raise AssertionError("tail ended")  # pragma: no cover


def lost_claim(host: ActorHost, *, max_redrives: int = 5) -> Any:
    """A claim by a host that is gone at once (its lease has already run out)."""
    return claim_op(
        host.spec.registry,
        limit=10,
        host_id="ghost",
        lease_ms=1,
        dead_owners=(),
        own_tokens=frozenset(),
        max_redrives=max_redrives,
        slots=Slots(10),
        taken=Taken(),
    )


def past_clock() -> int:
    """A clock ten seconds behind: claims made with it have long-expired leases."""
    return system_clock() - 10_000


# -- retries and failures ------------------------------------------------------------------


async def test_retries_until_success(tmp_path: Path) -> None:
    """An acquire that fails twice then succeeds completes on attempt 3, with one
    attempt_failed fact per failure."""
    flaky = Flaky(2)
    async with open_host(tmp_path, make_trigger(KIND, flaky.acquire)) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND, payload="x")
        state = await terminal(agent, intent.id)
        assert state.status is IntentStatus.COMPLETED
        assert state.attempts == 3
        assert flaky.attempts == [1, 2, 3]

        failed = await facts(agent, ATTEMPT_FAILED)
        assert len(failed) == 2
        for number, event in enumerate(failed, start=1):
            assert event.intent_event_id == intent.id
            assert event.payload["error_type"] == "RuntimeError"
            assert event.payload["message"] == f"boom {number}"
            assert event.payload["attempt"] == number
            assert event.payload["attempts"] == number
            # initial_backoff=0: the retry is due when the failure was recorded
            assert event.payload["retry_at"] == event.ts
        done = await facts(agent, DONE)
        assert [e.payload for e in done] == [{"attempt": 3}]
        assert list(state.terminal_event_ids) == [done[0].id]
        assert await facts(agent, FAILED) == []


async def test_fatal_error_fails_at_once(tmp_path: Path) -> None:
    """FatalError fails the intent after one attempt, through commit_failed."""
    flaky = Flaky(5, FatalError)
    async with open_host(tmp_path, make_trigger(KIND, flaky.acquire)) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND)
        state = await terminal(agent, intent.id)
        assert state.status is IntentStatus.FAILED
        assert state.attempts == 1
        assert flaky.attempts == [1]
        failed = await facts(agent, FAILED)
        assert [e.payload for e in failed] == [
            {"error_type": "FatalError", "message": "boom 1", "attempts": 1}
        ]
        (framework,) = await facts(agent, "trigger.failed")
        assert list(state.terminal_event_ids) == [failed[0].id, framework.id]
        assert await facts(agent, ATTEMPT_FAILED) == []


async def test_a_cancelled_error_the_host_did_not_cause_is_an_attempt_error(
    tmp_path: Path,
) -> None:
    """An acquire that raises ``CancelledError`` without its task being cancelled (it awaited
    a future someone else cancelled, as a library's inner task may be) fails that attempt
    like any error, and is retried; the host goes on running other intents. (It stopped the
    whole scheduler: every later intent stayed pending.)"""
    attempts: list[int] = []

    async def acquire(intent: JSON, ctx: TriggerContext) -> JSON:
        attempts.append(ctx.attempt)
        if intent == "cancelled inside" and ctx.attempt == 1:
            inner = asyncio.ensure_future(asyncio.sleep(3600))
            inner.cancel()
            await inner
        return {"attempt": ctx.attempt}

    async with open_host(tmp_path, make_trigger(KIND, acquire)) as host:
        agent = host.get("a")
        first = await agent.enqueue_trigger(trigger_kind=KIND, payload="cancelled inside")
        state = await terminal(agent, first.id)
        assert state.status is IntentStatus.COMPLETED
        assert state.attempts == 2
        (failed,) = await facts(agent, ATTEMPT_FAILED, first.id)
        assert failed.payload["error_type"] == "CancelledError"
        second = await agent.enqueue_trigger(trigger_kind=KIND, payload="plain")
        assert (await terminal(agent, second.id)).status is IntentStatus.COMPLETED
        assert host.scheduler is not None
        assert host.scheduler.abandoned == 0


async def test_exhausted_attempts_fail_through_commit_failed(tmp_path: Path) -> None:
    """After max_attempts failures the intent fails; commit_failed records error type,
    message and attempts, and the framework's trigger.failed fact follows it."""
    flaky = Flaky(10)
    async with open_host(tmp_path, make_trigger(KIND, flaky.acquire)) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND)
        state = await terminal(agent, intent.id)
        assert state.status is IntentStatus.FAILED
        assert state.attempts == 3
        assert flaky.attempts == [1, 2, 3]
        assert len(await facts(agent, ATTEMPT_FAILED)) == 2
        failed = await facts(agent, FAILED)
        assert [e.payload for e in failed] == [
            {"error_type": "RuntimeError", "message": "boom 3", "attempts": 3}
        ]
        (framework,) = await facts(agent, "trigger.failed")
        assert framework.payload == failed[0].payload
        assert framework.id > failed[0].id
        state_ids = (await agent.intent(intent.id)).terminal_event_ids
        assert state_ids == (failed[0].id, framework.id)


async def test_default_failure_fact_without_commit_failed(tmp_path: Path) -> None:
    """A trigger without commit_failed gets a trigger.failed fact on failure."""
    flaky = Flaky(10, FatalError)
    trigger = make_trigger(KIND, flaky.acquire)
    del trigger["commit_failed"]
    async with open_host(tmp_path, trigger) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND)
        state = await terminal(agent, intent.id)
        assert state.status is IntentStatus.FAILED
        failed = await facts(agent, "trigger.failed")
        assert [(e.payload, e.intent_event_id) for e in failed] == [
            ({"error_type": "FatalError", "message": "boom 1", "attempts": 1}, intent.id)
        ]
        assert list(state.terminal_event_ids) == [failed[0].id]
        assert await facts(agent, FAILED) == []


async def test_commit_raising_rolls_back_and_fails(tmp_path: Path) -> None:
    """A commit that raises has its writes rolled back and the intent fails with its error."""

    def commit(outcome: JSON, tx: Tx) -> None:
        tx.insert_event(kind=DONE, payload=outcome)
        tx.insert_event(kind="test.extra", payload=None)
        raise ValueError("bad outcome")

    async with open_host(tmp_path, make_trigger(KIND, commit=commit)) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND, payload="x")
        state = await terminal(agent, intent.id)
        assert state.status is IntentStatus.FAILED
        assert await facts(agent, DONE) == []
        assert await facts(agent, "test.extra") == []
        failed = await facts(agent, FAILED)
        assert [e.payload for e in failed] == [
            {"error_type": "ValueError", "message": "bad outcome", "attempts": 1}
        ]
        (framework,) = await facts(agent, "trigger.failed")
        assert list(state.terminal_event_ids) == [failed[0].id, framework.id]
        # The ids are dense: the rolled-back facts left no holes.
        assert [e.id for e in await agent.events()] == [1, 2, 3]


async def test_commit_returning_a_coroutine_is_rolled_back(tmp_path: Path) -> None:
    """A plain-def commit returning a coroutine is rolled back and fails with
    TriggerDefinitionError; the coroutine is closed (no never-awaited warning)."""
    made: list[Coroutine[Any, Any, None]] = []

    async def write_later(outcome: JSON, tx: Tx) -> None:
        tx.insert_event(kind="test.async", payload=outcome)  # pragma: no cover

    def commit(outcome: JSON, tx: Tx) -> Any:
        tx.insert_event(kind=DONE, payload=outcome)
        coro = write_later(outcome, tx)
        made.append(coro)
        return coro

    async with open_host(tmp_path, make_trigger(KIND, commit=commit)) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND, payload="x")
        state = await terminal(agent, intent.id)
        assert state.status is IntentStatus.FAILED
        assert await facts(agent, DONE) == []
        assert await facts(agent, "test.async") == []
        (failed,) = await facts(agent, FAILED)
        assert failed.payload["error_type"] == "TriggerDefinitionError"
        assert "awaitable" in failed.payload["message"]
        assert "commit" in failed.payload["message"]
    assert len(made) == 1
    assert inspect.getcoroutinestate(made[0]) == inspect.CORO_CLOSED
    made.clear()
    gc.collect()  # an unclosed coroutine would warn here (filterwarnings=error)


async def test_commit_via_lambda_returning_a_coroutine_fails(tmp_path: Path) -> None:
    """A lambda commit that calls an async function fails with TriggerDefinitionError."""

    async def record(outcome: JSON, tx: Tx) -> None:
        tx.insert_event(kind=DONE, payload=outcome)  # pragma: no cover

    trigger = make_trigger(KIND, commit=lambda outcome, tx: record(outcome, tx))
    async with open_host(tmp_path, trigger) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND, payload="x")
        state = await terminal(agent, intent.id)
        assert state.status is IntentStatus.FAILED
        assert await facts(agent, DONE) == []
        (failed,) = await facts(agent, FAILED)
        assert failed.payload["error_type"] == "TriggerDefinitionError"
    gc.collect()


# -- timeouts ------------------------------------------------------------------------------


async def test_timeout_aborts_signal_and_retries_then_fails(tmp_path: Path) -> None:
    """A per-attempt timeout aborts the signal with reason "timeout"; the attempt fails and
    is retried per policy; the intent fails with TimeoutError, and it is not a cancel."""
    reasons: list[object] = []
    attempts: list[int] = []

    async def acquire(intent: JSON, ctx: TriggerContext) -> JSON:
        attempts.append(ctx.attempt)
        try:
            await ctx.signal.wait()
        finally:
            reasons.append(ctx.signal.reason)
        ctx.signal.throw_if_aborted()
        return "unreachable"  # pragma: no cover

    trigger = make_trigger(KIND, acquire, timeout=0.05)
    async with open_host(tmp_path, trigger) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND)
        state = await terminal(agent, intent.id)
        assert state.status is IntentStatus.FAILED
        assert state.attempts == 3
        assert state.cancel_requested_at is None
        assert state.cancel_reason is None
        assert attempts == [1, 2, 3]
        assert reasons == ["timeout"] * 3

        retried = await facts(agent, ATTEMPT_FAILED)
        assert [e.payload["error_type"] for e in retried] == ["TimeoutError"] * 2
        assert [e.payload["attempt"] for e in retried] == [1, 2]
        (failed,) = await facts(agent, FAILED)
        assert failed.payload["error_type"] == "TimeoutError"
        assert failed.payload["attempts"] == 3
        assert "0.05" in failed.payload["message"]
        assert await facts(agent, CANCELLED) == []
        assert await facts(agent, "trigger.cancel_requested") == []


async def test_timeout_does_not_cut_fast_attempts(tmp_path: Path) -> None:
    """An attempt that finishes within its timeout completes normally."""
    gate = Gate()
    async with open_host(tmp_path, make_trigger(KIND, gate.acquire, timeout=30)) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND)
        gate.open(intent.id)
        state = await terminal(agent, intent.id)
        assert state.status is IntentStatus.COMPLETED
        assert gate.attempts == [(intent.id, 1, False, False)]


# -- retry backoff -------------------------------------------------------------------------


async def test_retry_waits_for_backoff_on_the_clock(tmp_path: Path) -> None:
    """A failed attempt is retried at failure time + backoff, by the host's clock."""
    clock = ManualClock()
    flaky = Flaky(1)
    policy = RetryPolicy(max_attempts=3, initial_backoff=10, jitter=False)
    trigger = make_trigger(KIND, flaky.acquire, retry=policy)
    async with open_host(tmp_path, trigger, clock=clock) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND)
        failure = await next_event(agent, ATTEMPT_FAILED)
        assert failure.payload["retry_at"] == failure.ts + 10_000
        assert failure.ts == clock.now

        state = await agent.intent(intent.id)
        assert state.status is IntentStatus.PENDING
        assert state.attempts == 1
        assert round(state.due_at.timestamp() * 1000) == failure.payload["retry_at"]

        clock.advance(10_000)
        state = await terminal(agent, intent.id)
        assert state.status is IntentStatus.COMPLETED
        assert flaky.attempts == [1, 2]
        assert flaky.times[1] >= failure.payload["retry_at"]


# -- due times -----------------------------------------------------------------------------

NO_POLL = fast_config(poll_interval=3600.0, lease=60.0)
"""The index poll, which would find any due time the scheduler forgot, never runs again after
the host starts, nor does a timer for a claim's lease end: what runs must run because the
scheduler kept its due time."""


async def test_a_due_time_later_than_an_armed_one_is_kept(tmp_path: Path) -> None:
    """Intents of one actor due at +50 ms and then +100 ms both run when due: the second was
    dropped because a timer for the actor was already armed earlier, and waited for the next
    poll of the index (a second later by default)."""
    ran: list[JSON] = []
    both = anyio.Event()

    async def acquire(intent: JSON, ctx: TriggerContext) -> JSON:
        ran.append(intent)
        if len(ran) == 2:
            both.set()
        return None

    async with open_host(tmp_path, make_trigger(KIND, acquire), config=NO_POLL) as host:
        agent = host.get("a")
        now = datetime.now(UTC)
        for n, delay_ms in ((1, 50), (2, 100)):
            at = now + timedelta(milliseconds=delay_ms)
            await agent.enqueue_trigger(trigger_kind=KIND, payload=n, at=at)
        with anyio.fail_after(10):
            await both.wait()
    assert ran == [1, 2]


async def test_a_reschedule_beside_a_due_enqueue_is_kept(tmp_path: Path) -> None:
    """A commit that enqueues an intent due now and reschedules its own for +50 ms: the
    occurrence runs when due (the earlier due time alone reached the scheduler)."""
    occurrences: list[int] = []
    second = anyio.Event()

    async def tick(intent: JSON, ctx: TriggerContext) -> JSON:
        occurrences.append(ctx.intent_event_id)
        if len(occurrences) == 2:
            second.set()
        return None

    def commit(outcome: JSON, tx: Tx) -> None:
        if len(occurrences) == 1:
            tx.enqueue(trigger_kind="child")
            tx.reschedule(datetime.now(UTC) + timedelta(milliseconds=50))

    ticking = make_trigger(KIND, tick, commit=commit)
    async with open_host(tmp_path, ticking, make_trigger("child"), config=NO_POLL) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND)
        with anyio.fail_after(10):
            await second.wait()
        assert (await terminal(agent, intent.id)).status is IntentStatus.COMPLETED
    assert occurrences == [intent.id, intent.id]


# -- shutdown ------------------------------------------------------------------------------


async def test_shutdown_releases_running_attempt_for_a_redrive(tmp_path: Path) -> None:
    """Leaving the host aborts a still-running attempt with reason "shutdown" after the
    grace; the intent goes back to pending uncounted, and the next host redrives it."""
    gate = Gate()
    reasons: list[object] = []
    errors: list[BaseException] = []

    async def acquire(intent: JSON, ctx: TriggerContext) -> JSON:
        try:
            return await gate.acquire(intent, ctx)
        except BaseException as exc:
            errors.append(exc)
            raise
        finally:
            reasons.append(ctx.signal.reason)

    async with open_host(tmp_path, make_trigger(KIND, acquire)) as host:
        assert host.config.shutdown_grace == 0.5
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND, payload="p")
        await gate.wait_started(intent.id)
    assert reasons == ["shutdown"]
    assert len(errors) == 1
    assert isinstance(errors[0], AbortError | anyio.get_cancelled_exc_class())

    async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as client:
        agent = client.get("a")
        state = await agent.intent(intent.id)
        assert state.status is IntentStatus.PENDING
        assert state.attempts == 0
        assert state.cancel_requested_at is None
        kinds = [e.kind for e in await agent.events()]
        assert kinds == [f"{KIND}.requested"]

    again = Gate()
    again.open(intent.id)
    async with open_host(tmp_path, make_trigger(KIND, again.acquire)) as host:
        agent = host.get("a")
        state = await terminal(agent, intent.id)
        assert state.status is IntentStatus.COMPLETED
        assert state.attempts == 1
        assert again.attempts == [(intent.id, 1, True, False)]
        assert [e.payload for e in await facts(agent, DONE)] == [{"intent": "p", "attempt": 1}]


async def test_shutdown_waits_for_attempts_within_grace(tmp_path: Path) -> None:
    """An attempt that finishes within the shutdown grace completes; it is not aborted."""
    gate = Gate()
    grace = fast_config(shutdown_grace=30)

    async def release_during_shutdown(host: ActorHost, intent_event_id: int) -> None:
        await anyio.wait_all_tasks_blocked()
        # Leaving the host stops the scheduler before its first await.
        assert host.scheduler is not None
        assert host.scheduler._stopping
        assert host.scheduler.running == 1
        gate.open(intent_event_id)

    trigger = make_trigger(KIND, gate.acquire)
    with anyio.fail_after(10):
        async with (
            anyio.create_task_group() as tg,
            open_host(tmp_path, trigger, config=grace) as host,
        ):
            agent = host.get("a")
            intent = await agent.enqueue_trigger(trigger_kind=KIND)
            await gate.wait_started(intent.id)
            tg.start_soon(release_during_shutdown, host, intent.id)
    async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as client:
        state = await client.get("a").intent(intent.id)
        assert state.status is IntentStatus.COMPLETED
        assert gate.attempts == [(intent.id, 1, False, False)]


def recording_reasons(gate: Gate, reasons: list[object]) -> Acquire:
    """``gate.acquire`` that appends its signal's reason to ``reasons`` as it ends."""

    async def acquire(intent: JSON, ctx: TriggerContext) -> JSON:
        try:
            return await gate.acquire(intent, ctx)
        finally:
            reasons.append(ctx.signal.reason)

    return acquire


async def cancel_host_while_running(
    tmp_path: Path,
    trigger: DurableTrigger[Any, Any],
    started: Callable[[int], Awaitable[None]],
    *,
    grace: float = 0.5,
    during: Callable[[ActorHost, int], Awaitable[None]] | None = None,
    others: Sequence[DurableTrigger[Any, Any]] = (),
    bindings: dict[str, Any] | None = None,
) -> int:
    """Open a host (with ``trigger``, ``others`` and ``bindings``; a ``"hosts"`` list there
    gets the host), enqueue one ``trigger`` intent, wait for ``started(intent_id)``, then
    cancel the task that holds the host (as Ctrl-C or a cancelled task group does).
    ``during(host, intent_id)`` runs once every task waits (the host is stopping), shielded.
    Returns when the host has stopped; the intent's id."""
    box: dict[str, int] = {}
    kind = trigger["kind"]
    spec = define_agent_do(triggers=[trigger, *others], bindings=bindings or {})

    async def hold(*, task_status: anyio.abc.TaskStatus[ActorHost]) -> None:
        config = fast_config(shutdown_grace=grace)
        async with open_host(tmp_path, spec=spec, config=config) as host:
            if bindings is not None and "hosts" in bindings:
                bindings["hosts"].append(host)
            intent = await host.get("a").enqueue_trigger(trigger_kind=kind, payload="p")
            box["id"] = intent.id
            await started(intent.id)
            task_status.started(host)
            await anyio.sleep_forever()

    async def stopping(host: ActorHost) -> None:
        assert during is not None
        with anyio.CancelScope(shield=True):
            await anyio.wait_all_tasks_blocked()  # every task now waits: the host is stopping
            assert host.scheduler is not None
            assert host.scheduler._stopping
            await during(host, box["id"])

    async with anyio.create_task_group() as tg:
        host = await tg.start(hold)
        tg.cancel_scope.cancel()
        if during is not None:
            tg.start_soon(stopping, host)
    return box["id"]


@pytest.mark.timeout(60)  # the old code never returned: the test fails rather than hangs
async def test_cancelling_the_task_holding_the_host_stops_it_in_order(tmp_path: Path) -> None:
    """A cancellation of the task that holds the host (Ctrl-C on ``anyio.run``, a cancelled
    task group) stops it as leaving it does: the running attempt gets the grace, then its
    signal aborts with reason "shutdown", and the intent is released (pending, uncounted)
    before the host has stopped; the next host runs it."""
    gate = Gate()
    reasons: list[object] = []
    acquire = recording_reasons(gate, reasons)
    trigger = make_trigger(KIND, acquire)
    intent_id = await cancel_host_while_running(tmp_path, trigger, gate.wait_started)
    assert reasons == ["shutdown"]
    async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as client:
        state = await client.get("a").intent(intent_id)
        assert (state.status, state.attempts) == (IntentStatus.PENDING, 0)

    again = Gate()
    again.open(intent_id)
    async with open_host(tmp_path, make_trigger(KIND, again.acquire)) as host:
        state = await terminal(host.get("a"), intent_id)
        assert state.status is IntentStatus.COMPLETED
        assert again.attempts == [(intent_id, 1, True, False)]


@pytest.mark.timeout(60)
async def test_an_attempt_ending_within_the_grace_of_a_cancelled_host_completes(
    tmp_path: Path,
) -> None:
    """The host's task is cancelled while an attempt runs that finishes within the grace:
    the attempt is not cut short, and its outcome is committed before the host stops."""
    gate = Gate()

    async def release(host: ActorHost, intent_id: int) -> None:
        gate.open(intent_id)

    trigger = make_trigger(KIND, gate.acquire)
    intent_id = await cancel_host_while_running(
        tmp_path, trigger, gate.wait_started, grace=30, during=release
    )
    async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as client:
        agent = client.get("a")
        state = await agent.intent(intent_id)
        assert (state.status, state.attempts) == (IntentStatus.COMPLETED, 1)
        assert [e.payload for e in await facts(agent, DONE)] == [{"intent": "p", "attempt": 1}]
    assert gate.attempts == [(intent_id, 1, False, False)]


@pytest.mark.timeout(60)
async def test_a_cancelled_hosts_attempts_still_time_out(tmp_path: Path) -> None:
    """An attempt's ``timeout`` is kept while a cancelled host gives its attempts the grace:
    the signal aborts with reason "timeout" (not "shutdown" at the grace's end), and the
    timed-out attempt counts, as it would on a running host."""
    gate = Gate()
    reasons: list[object] = []
    acquire = recording_reasons(gate, reasons)
    trigger = make_trigger(KIND, acquire, timeout=0.2)
    intent_id = await cancel_host_while_running(tmp_path, trigger, gate.wait_started, grace=30)
    assert reasons == ["timeout"]
    async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as client:
        agent = client.get("a")
        state = await agent.intent(intent_id)
        assert (state.status, state.attempts) == (IntentStatus.PENDING, 1)
        assert [e.payload["error_type"] for e in await facts(agent, ATTEMPT_FAILED)] == [
            "TimeoutError"
        ]


@pytest.mark.timeout(60)
async def test_a_cancel_during_a_cancelled_hosts_grace_reaches_the_attempt(
    tmp_path: Path,
) -> None:
    """While a cancelled host gives its attempts the grace it still hears cancels (here from
    another host on the same ledgers): the attempt's signal aborts with the cancel's reason
    and the intent ends cancelled, as it would on a running host."""
    gate = Gate()

    async def cancel(host: ActorHost, intent_id: int) -> None:
        async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as client:
            result = await client.get("a").cancel_trigger(
                trigger_kind=KIND, intent_event_id=intent_id, reason="user"
            )
            assert result.status is CancelStatus.REQUESTED

    trigger = make_trigger(KIND, gate.acquire)
    intent_id = await cancel_host_while_running(
        tmp_path, trigger, gate.wait_started, grace=30, during=cancel
    )
    async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as client:
        agent = client.get("a")
        state = await agent.intent(intent_id)
        assert state.status is IntentStatus.CANCELLED
        assert [e.payload for e in await facts(agent, CANCELLED)] == [{"reason": "user"}]


@pytest.mark.timeout(60)
async def test_an_attempt_waiting_on_a_call_is_released_by_a_cancelled_host(
    tmp_path: Path,
) -> None:
    """An attempt that awaits ``agent.call(...)`` when the host's task is cancelled keeps
    its call followed through the grace; then it is aborted with reason "shutdown" and
    released, as on leaving the host, rather than failing with ``HostClosedError``."""
    child_gate = Gate()
    errors: list[str] = []
    hosts: list[ActorHost] = []

    async def parent(intent: JSON, ctx: TriggerContext) -> JSON:
        try:
            return await ctx.bindings["hosts"][0].get("child").call(trigger_kind="test.child")
        except BaseException as exc:
            errors.append(f"{type(exc).__name__} {ctx.signal.reason}")
            raise

    trigger = make_trigger(KIND, parent, retry=RetryPolicy(max_attempts=1))
    child = make_trigger("test.child", child_gate.acquire)

    async def child_started(_: int) -> None:
        await child_gate.wait_started(1)  # the parent now awaits its call

    intent_id = await cancel_host_while_running(
        tmp_path, trigger, child_started, others=[child], bindings={"hosts": hosts}
    )
    assert errors == ["CancelledError shutdown"]
    async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as client:
        agent = client.get("a")
        state = await agent.intent(intent_id)
        assert (state.status, state.attempts) == (IntentStatus.PENDING, 0)
        assert await facts(agent, FAILED) == []
        assert (await client.get("child").intent(1)).status is IntentStatus.PENDING


@pytest.mark.timeout(60)
async def test_an_attempt_may_start_a_call_during_the_grace(tmp_path: Path) -> None:
    """During the shutdown grace (here of a cancelled host) an attempt may still start an
    ``agent.call``: it is recorded and followed (the stopping host claims nothing new, so it
    waits for the next host), and at the grace's end the attempt is released uncounted
    rather than failed by a ``HostClosedError`` because the host had begun to stop."""
    gate = Gate()
    hosts: list[ActorHost] = []
    errors: list[str] = []

    async def parent(intent: JSON, ctx: TriggerContext) -> JSON:
        await gate.acquire(intent, ctx)
        try:
            await ctx.bindings["hosts"][0].get("child").call(trigger_kind="test.child")
        except BaseException as exc:
            errors.append(f"{type(exc).__name__} {ctx.signal.reason}")
            raise
        return None

    async def release(host: ActorHost, intent_id: int) -> None:
        gate.open(intent_id)

    intent_id = await cancel_host_while_running(
        tmp_path,
        make_trigger(KIND, parent),
        gate.wait_started,
        grace=1,
        during=release,
        others=[make_trigger("test.child")],
        bindings={"hosts": hosts},
    )
    assert errors == ["CancelledError shutdown"]
    async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as client:
        state = await client.get("a").intent(intent_id)
        assert (state.status, state.attempts) == (IntentStatus.PENDING, 0)
        assert await facts(client.get("a"), ATTEMPT_FAILED) == []
        assert (await client.get("child").intent(1)).status is IntentStatus.PENDING


# -- redrives ------------------------------------------------------------------------------


async def test_redrive_of_cancelled_lost_claim_starts_aborted(tmp_path: Path) -> None:
    """A cancel of an intent whose owner is gone answers requested; the redrive starts with
    the signal already aborted, and the intent ends cancelled with the reason."""
    async with open_host(
        tmp_path, make_trigger(KIND), run_scheduler=False, clock=past_clock
    ) as client:
        agent = client.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND)
        (claimed,) = (await client.store.run("a", lost_claim(client))).claimed
        assert claimed.row.claimed_by == "ghost"
        result = await agent.cancel_trigger(
            trigger_kind=KIND, intent_event_id=intent.id, reason="user"
        )
        assert result.status == "requested"
        assert await facts(agent, CANCELLED) == []

    gate = Gate()
    async with open_host(tmp_path, make_trigger(KIND, gate.acquire)) as host:
        agent = host.get("a")
        state = await terminal(agent, intent.id)
        assert state.status is IntentStatus.CANCELLED
        assert state.redrives == 1
        assert gate.attempts == [(intent.id, 1, True, True)]
        assert [e.payload for e in await facts(agent, CANCELLED)] == [{"reason": "user"}]
        assert await facts(agent, DONE) == []


async def test_redrive_of_lost_claim_runs_again(tmp_path: Path) -> None:
    """A lost claim without a cancel is redriven: acquire runs with ctx.redrive True."""
    async with open_host(
        tmp_path, make_trigger(KIND), run_scheduler=False, clock=past_clock
    ) as client:
        intent = await client.get("a").enqueue_trigger(trigger_kind=KIND, payload=1)
        await client.store.run("a", lost_claim(client))

    gate = Gate()
    gate.open(intent.id)
    async with open_host(tmp_path, make_trigger(KIND, gate.acquire)) as host:
        state = await terminal(host.get("a"), intent.id)
        assert state.status is IntentStatus.COMPLETED
        assert state.redrives == 1
        assert gate.attempts == [(intent.id, 1, True, False)]


async def test_a_projection_that_cannot_take_a_redrive_failure_does_not_hold_claims(
    tmp_path: Path,
) -> None:
    """A lost claim past the redrive limit fails its intent even where a projection cannot
    apply ``trigger.failed`` (the claim failed at every look, the intent never ended): the
    projection is left behind. Writes that need it then raise ``ProjectionError`` naming
    that event, until its ``apply`` is fixed."""
    broken = [True]

    def picky(state: int, event: Event) -> int:
        if broken and event.kind == "trigger.failed":
            raise ValueError("not this one")
        return state + 1

    trigger = make_trigger(KIND, noop)
    spec = define_agent_do(triggers=[trigger], projections=[Projection("n", 0, picky)])
    async with open_host(tmp_path, spec=spec, run_scheduler=False, clock=past_clock) as client:
        lost = await client.get("a").enqueue_trigger(trigger_kind=KIND)
        await client.store.run("a", lost_claim(client))

    config = fast_config(max_redrives=0)
    async with open_host(tmp_path, spec=spec, config=config) as host:
        agent = host.get("a")
        assert (await terminal(agent, lost.id)).status is IntentStatus.FAILED
        assert len(await facts(agent, "trigger.failed")) == 1
        with pytest.raises(ProjectionError, match=r"'trigger\.failed'"):
            await agent.enqueue_trigger(trigger_kind=KIND)
        broken.clear()  # apply fixed
        later = await agent.enqueue_trigger(trigger_kind=KIND)
        assert (await terminal(agent, later.id)).status is IntentStatus.COMPLETED
        assert await agent.projection("n") == len(await agent.events())


async def test_redrive_limit_fails_the_intent(tmp_path: Path) -> None:
    """With max_redrives=0 a lost claim fails the intent with RedriveLimitExceeded."""
    async with open_host(
        tmp_path, make_trigger(KIND), run_scheduler=False, clock=past_clock
    ) as client:
        intent = await client.get("a").enqueue_trigger(trigger_kind=KIND)
        await client.store.run("a", lost_claim(client))

    gate = Gate()
    config = fast_config(max_redrives=0)
    async with open_host(tmp_path, make_trigger(KIND, gate.acquire), config=config) as host:
        agent = host.get("a")
        state = await terminal(agent, intent.id)
        assert state.status is IntentStatus.FAILED
        assert gate.attempts == []
        (failed,) = await facts(agent, FAILED)
        assert failed.payload["error_type"] == "RedriveLimitExceeded"
        assert failed.payload["attempts"] == 1
        (framework,) = await facts(agent, "trigger.failed")
        assert list(state.terminal_event_ids) == [failed.id, framework.id]


async def test_a_reschedule_starts_the_redrive_count_afresh(tmp_path: Path) -> None:
    """Redrives bound a run of lost attempts, not an intent's whole life: an attempt that
    committed and rescheduled its intent starts the count afresh. With ``max_redrives=1``, a
    lost claim, a rescheduling commit, then another lost claim still end completed (a
    long-lived workflow would otherwise fail after a few crashes weeks apart)."""
    clock = ManualClock()
    commits: list[int] = []

    def commit(outcome: JSON, tx: Tx) -> None:
        commits.append(tx.intent_event_id)
        if len(commits) == 1:
            tx.reschedule(datetime.fromtimestamp(clock.now / 1000 + 3600, UTC))
        else:
            tx.insert_event(kind=DONE, payload=outcome)

    trigger = make_trigger(KIND, commit=commit)
    config = fast_config(max_redrives=1)

    async def lose_a_claim() -> int:
        """A ghost claims the due intent and is gone (its 1 ms lease runs out)."""
        async with open_host(tmp_path, trigger, run_scheduler=False, clock=clock) as client:
            await client.store.run("a", lost_claim(client, max_redrives=1))
            (row,) = await client.get("a").intents()
            assert row.status is IntentStatus.RUNNING
            return row.redrives

    async with open_host(tmp_path, trigger, run_scheduler=False, clock=clock) as client:
        intent = await client.get("a").enqueue_trigger(trigger_kind=KIND)
    assert await lose_a_claim() == 0
    clock.advance(10_000)
    async with open_host(tmp_path, trigger, config=config, clock=clock) as host:
        agent = host.get("a")
        await wait_until(agent, lambda: _rescheduled(agent, intent.id))
        assert (await agent.intent(intent.id)).redrives == 0  # the count starts afresh
    clock.advance(7_200_000)
    assert await lose_a_claim() == 0
    clock.advance(10_000)
    async with open_host(tmp_path, trigger, config=config, clock=clock) as host:
        state = await terminal(host.get("a"), intent.id)
    assert state.status is IntentStatus.COMPLETED
    assert state.redrives == 1
    assert commits == [intent.id, intent.id]


async def _rescheduled(agent: Agent, intent_event_id: int) -> bool:
    state = await agent.intent(intent_event_id)
    return state.status is IntentStatus.PENDING and state.attempts == 0


# -- enqueue validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [{1, 2}, math.nan, {"x": math.inf}, object(), {"nested": [b"bytes"]}],
    ids=["set", "nan", "inf", "object", "bytes"],
)
async def test_unstorable_payload_writes_nothing(tmp_path: Path, payload: object) -> None:
    """A payload that is not storable JSON raises PayloadError and nothing is written."""
    async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as host:
        agent = host.get("a")
        with pytest.raises(PayloadError):
            await agent.enqueue_trigger(trigger_kind=KIND, payload=payload)
        assert await agent.events() == []
        assert await agent.intents() == []


async def test_naive_at_raises_and_writes_nothing(tmp_path: Path) -> None:
    """A naive ``at`` datetime raises ValueError and nothing is written."""
    async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as host:
        agent = host.get("a")
        with pytest.raises(ValueError, match="timezone"):
            await agent.enqueue_trigger(trigger_kind=KIND, at=datetime(2030, 1, 1))
        assert await agent.events() == []


async def test_aware_at_sets_due_time(tmp_path: Path) -> None:
    """An aware ``at`` is the intent's due time, whatever its timezone."""
    async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as host:
        agent = host.get("a")
        at = datetime(2030, 1, 1, 12, tzinfo=UTC) + timedelta(milliseconds=5)
        intent = await agent.enqueue_trigger(trigger_kind=KIND, at=at)
        state = await agent.intent(intent.id)
        assert state.due_at == at
        assert state.status is IntentStatus.PENDING


async def test_idempotency_key_returns_the_same_intent(tmp_path: Path) -> None:
    """A second enqueue with the same key returns the first intent and writes nothing."""
    async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as host:
        agent = host.get("a")
        first = await agent.enqueue_trigger(
            trigger_kind=KIND, payload=1, idempotency_key="job", at=datetime.now(UTC)
        )
        second = await agent.enqueue_trigger(trigger_kind=KIND, payload=2, idempotency_key="job")
        other = await agent.enqueue_trigger(trigger_kind=KIND, payload=3, idempotency_key="x")
        assert second.id == first.id
        assert second == first
        assert other.id != first.id
        assert len(await agent.events()) == 2
        assert (await agent.intent(first.id)).idempotency_key == "job"


async def test_idempotency_key_is_atomic_under_concurrency(tmp_path: Path) -> None:
    """Many tasks enqueuing with one key at once all get the same single intent."""
    async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as host:
        agent = host.get("a")
        ids: list[int] = []

        async def enqueue(n: int) -> None:
            event = await agent.enqueue_trigger(trigger_kind=KIND, payload=n, idempotency_key="k")
            ids.append(event.id)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for n in range(25):
                    tg.start_soon(enqueue, n)
        assert len(ids) == 25
        assert len(set(ids)) == 1
        assert len(await agent.intents()) == 1
        assert len(await agent.events()) == 1


async def test_idempotency_key_survives_completion_within_retention(tmp_path: Path) -> None:
    """After the intent ends, the key still returns it (within the retention)."""
    async with open_host(tmp_path, make_trigger(KIND)) as host:
        agent = host.get("a")
        first = await agent.enqueue_trigger(trigger_kind=KIND, idempotency_key="k")
        assert (await terminal(agent, first.id)).status is IntentStatus.COMPLETED
        again = await agent.enqueue_trigger(trigger_kind=KIND, idempotency_key="k")
        assert again.id == first.id
        assert len(await agent.events(kinds=TERMINAL_KINDS)) == 1


async def test_a_key_given_to_a_commits_enqueue_is_kept_for_the_retention(tmp_path: Path) -> None:
    """An idempotency key given to ``tx.enqueue`` in a commit still holds once its intent
    ended, for the host's ``idempotency_retention`` as any key (it held only while the
    intent was live: a second parent enqueued a second child)."""

    def commit(outcome: JSON, tx: Tx) -> None:
        tx.enqueue(trigger_kind="child", idempotency_key="welcome-email")

    parent = make_trigger(KIND, commit=commit)
    async with open_host(tmp_path, parent, make_trigger("child")) as host:
        agent = host.get("a")
        first = await agent.enqueue_trigger(trigger_kind=KIND)
        assert (await terminal(agent, first.id)).status is IntentStatus.COMPLETED
        (child,) = await facts(agent, "child.requested")
        assert (await terminal(agent, child.id)).status is IntentStatus.COMPLETED
        second = await agent.enqueue_trigger(trigger_kind=KIND)
        assert (await terminal(agent, second.id)).status is IntentStatus.COMPLETED
        assert [e.id for e in await facts(agent, "child.requested")] == [child.id]
    async with open_host(tmp_path, parent, make_trigger("child"),
                         idempotency_retention=0) as host:  # fmt: skip
        agent = host.get("a")
        third = await agent.enqueue_trigger(trigger_kind=KIND)
        assert (await terminal(agent, third.id)).status is IntentStatus.COMPLETED
        assert len(await facts(agent, "child.requested")) == 2
