"""Every ``cancel_trigger`` status (DESIGN §5) on a real host, lost races included."""

from __future__ import annotations

from contextlib import aclosing
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from ledger import IntentStatus, system_clock
from tests.helpers import (
    CANCELLED,
    DONE,
    FAILED,
    TERMINAL_KINDS,
    Gate,
    ManualClock,
    make_trigger,
    open_host,
)
from triggers import (
    AbortError,
    CancelResult,
    CancelStatus,
    FatalError,
    RetryPolicy,
    TriggerContext,
    UnknownTriggerError,
)
from triggers._engine import (
    ATTEMPT_FAILED,
    CANCEL_REQUESTED,
    Claimed,
    ClaimResult,
    Outcome,
    Settled,
    cancel_op,
    claim_op,
    settle_op,
)
from triggers._slots import Slots, Taken

if TYPE_CHECKING:
    from pathlib import Path

    from actors import ActorHost, Agent
    from ledger import JSON, Event
    from triggers import TriggerDef

pytestmark = [pytest.mark.anyio, pytest.mark.contract]

KIND = "test.work"


# -- helpers -------------------------------------------------------------------------------


class Recorder:
    """Wraps a Gate: records each attempt's exception and signal reason."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.errors: list[BaseException | None] = []
        self.reasons: list[object] = []

    async def acquire(self, intent: JSON, ctx: TriggerContext) -> JSON:
        try:
            result = await self.gate.acquire(intent, ctx)
        except BaseException as exc:
            self.errors.append(exc)
            raise
        finally:
            self.reasons.append(ctx.signal.reason)
        self.errors.append(None)
        return result


class Holder:
    """An acquire that keeps running after its signal aborts, until the test lets it go.

    ``aborted[i]`` is set once intent ``i``'s signal has aborted; the acquire then waits for
    ``proceed[i]`` and ends as ``mode`` says: "raise" the signal's AbortError, "return" a
    value, or "error" with a RuntimeError. ``started[i]`` is set when it begins.
    """

    def __init__(self, mode: str, *, wait_for_abort: bool = True) -> None:
        self.mode = mode
        self.wait_for_abort = wait_for_abort
        self.started: dict[int, anyio.Event] = {}
        self.aborted: dict[int, anyio.Event] = {}
        self.proceed: dict[int, anyio.Event] = {}
        self.reasons: list[object] = []

    def event(self, table: dict[int, anyio.Event], intent_event_id: int) -> anyio.Event:
        return table.setdefault(intent_event_id, anyio.Event())

    async def acquire(self, intent: JSON, ctx: TriggerContext) -> JSON:
        self.event(self.started, ctx.intent_event_id).set()
        if self.wait_for_abort:
            await ctx.signal.wait()
            self.reasons.append(ctx.signal.reason)
            self.event(self.aborted, ctx.intent_event_id).set()
        await self.event(self.proceed, ctx.intent_event_id).wait()
        if self.mode == "raise":
            ctx.signal.throw_if_aborted()
        if self.mode == "error":
            raise RuntimeError("provider exploded")
        return {"finished": ctx.attempt}


async def wait_set(event: anyio.Event) -> None:
    with anyio.fail_after(10):
        await event.wait()


async def terminal(agent: Agent, intent_event_id: int) -> Any:
    with anyio.fail_after(10):
        return await agent.wait_for_intent(intent_event_id)


async def next_event(agent: Agent, kind: str) -> Event:
    """The first event of ``kind``, waiting for it to be written."""
    tail = agent.tail()
    with anyio.fail_after(10):
        async with aclosing(tail) as events:
            async for event in events:
                if event.kind == kind:
                    return event
    raise AssertionError("tail ended")  # pragma: no cover


async def kinds_of(agent: Agent, intent_event_id: int | None = None) -> list[str]:
    return [event.kind for event in await agent.events(intent_event_id=intent_event_id)]


async def facts(agent: Agent, kind: str, intent_event_id: int | None = None) -> list[Event]:
    return await agent.events(kinds=[kind], intent_event_id=intent_event_id)


async def cancel(agent: Agent, intent_event_id: int, reason: str | None = None, **kw: Any) -> Any:
    return await agent.cancel_trigger(
        trigger_kind=kw.pop("kind", KIND), intent_event_id=intent_event_id, reason=reason, **kw
    )


def later(hours: float = 1) -> datetime:
    return datetime.now(UTC) + timedelta(hours=hours)


def claim(host: ActorHost, *, host_id: str = "fake-host", lease_ms: int = 60_000) -> Any:
    """The scheduler's claim operation, as if run by another host ``host_id``."""
    return claim_op(
        host.spec.registry,
        limit=10,
        host_id=host_id,
        lease_ms=lease_ms,
        dead_owners=(),
        own_tokens=frozenset(),
        max_redrives=5,
        slots=Slots(10),
        taken=Taken(),
    )


def settle(host: ActorHost, claimed: Claimed, outcome: Outcome, value: Any) -> Any:
    """The scheduler's settle operation for ``claimed``."""
    trigger: TriggerDef = host.spec.registry.get(claimed.row.trigger_kind)
    assert claimed.row.claim_token is not None
    return settle_op(
        host.spec.registry,
        trigger,
        claimed.row.id,
        claimed.row.claim_token,
        claimed.payload,
        outcome,
        value,
        0.0,
    )


# -- cancelled -----------------------------------------------------------------------------


async def test_pending_intent_is_cancelled_at_once(tmp_path: Path) -> None:
    """Cancelling a future intent runs commit_cancelled in the call; acquire never runs."""
    clock = ManualClock()
    gate = Gate()
    async with open_host(tmp_path, make_trigger(KIND, gate.acquire), clock=clock) as host:
        agent = host.get("a")
        due = datetime.fromtimestamp(clock.now / 1000, UTC) + timedelta(hours=1)
        intent = await agent.enqueue_trigger(trigger_kind=KIND, payload={"n": 1}, at=due)
        result = await cancel(agent, intent.id, "user", requested_by="alice")
        assert result == CancelResult(
            status=CancelStatus.CANCELLED,
            intent_event_id=intent.id,
            terminal_status=IntentStatus.CANCELLED,
        )

        state = await agent.intent(intent.id)
        assert state.status is IntentStatus.CANCELLED
        assert state.cancel_reason == "user"
        assert state.cancel_requested_by == "alice"
        assert state.cancel_requested_at == datetime.fromtimestamp(clock.now / 1000, UTC)
        assert state.attempts == 0
        cancelled = await facts(agent, CANCELLED)
        assert [(e.payload, e.intent_event_id) for e in cancelled] == [
            ({"reason": "user"}, intent.id)
        ]
        assert list(state.terminal_event_ids) == [cancelled[0].id]

        # A later intent, due after the cancelled one, runs once the clock passes both due
        # times: had the cancelled intent still been pending it would have been claimed first.
        second = await agent.enqueue_trigger(
            trigger_kind=KIND, payload={"n": 2}, at=due + timedelta(seconds=1)
        )
        gate.open(second.id)
        clock.advance(2 * 3_600_000)
        assert (await terminal(agent, second.id)).status is IntentStatus.COMPLETED
        assert [attempt[0] for attempt in gate.attempts] == [second.id]
        assert (await agent.intent(intent.id)).status is IntentStatus.CANCELLED


# -- requested -----------------------------------------------------------------------------


async def test_running_intent_cancel_is_requested_and_aborts_signal(tmp_path: Path) -> None:
    """Cancelling a running intent answers requested, records the request as a fact, aborts
    the attempt's signal, and the attempt settles it as cancelled with that reason."""
    recorder = Recorder(Gate())
    async with open_host(tmp_path, make_trigger(KIND, recorder.acquire)) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND, payload=None)
        await recorder.gate.wait_started(intent.id)
        before = system_clock()
        result = await cancel(agent, intent.id, "stop", requested_by="alice")
        assert result.status is CancelStatus.REQUESTED
        assert result.terminal_status is None

        requested = await facts(agent, CANCEL_REQUESTED)
        assert len(requested) == 1
        assert requested[0].intent_event_id == intent.id
        payload = requested[0].payload
        assert payload["reason"] == "stop"
        assert payload["requested_by"] == "alice"
        assert before <= payload["requested_at"] <= system_clock()

        state = await terminal(agent, intent.id)
        assert state.status is IntentStatus.CANCELLED
        assert state.cancel_reason == "stop"
        assert state.cancel_requested_at is not None
        assert state.attempts == 1
        assert len(recorder.errors) == 1
        assert isinstance(recorder.errors[0], AbortError)
        assert recorder.reasons == ["stop"]
        cancelled = await facts(agent, CANCELLED)
        assert [e.payload for e in cancelled] == [{"reason": "stop"}]
        assert await facts(agent, DONE) == []


async def test_second_cancel_while_running_keeps_first_reason(tmp_path: Path) -> None:
    """A second cancel of a running intent answers requested again, writes no second
    request fact, and the first reason wins."""
    holder = Holder("raise")
    async with open_host(tmp_path, make_trigger(KIND, holder.acquire)) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND)
        await wait_set(holder.event(holder.started, intent.id))
        assert (await cancel(agent, intent.id, "first")).status is CancelStatus.REQUESTED
        await wait_set(holder.event(holder.aborted, intent.id))
        count = len(await agent.events())

        again = await cancel(agent, intent.id, "second", requested_by="bob")
        assert again.status is CancelStatus.REQUESTED
        assert len(await agent.events()) == count
        state = await agent.intent(intent.id)
        assert state.status is IntentStatus.RUNNING
        assert state.cancel_reason == "first"
        assert state.cancel_requested_by is None

        holder.event(holder.proceed, intent.id).set()
        state = await terminal(agent, intent.id)
        assert state.status is IntentStatus.CANCELLED
        assert state.cancel_reason == "first"
        assert holder.reasons == ["first"]
        assert len(await facts(agent, CANCEL_REQUESTED)) == 1
        assert [e.payload for e in await facts(agent, CANCELLED)] == [{"reason": "first"}]


async def test_completion_after_cancel_request_wins(tmp_path: Path) -> None:
    """An acquire that ignores its aborted signal and returns completes the intent; the
    state keeps the cancel request (completed-after-cancel-request)."""
    holder = Holder("return")
    async with open_host(tmp_path, make_trigger(KIND, holder.acquire)) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND)
        await wait_set(holder.event(holder.started, intent.id))
        assert (await cancel(agent, intent.id, "too late")).status is CancelStatus.REQUESTED
        await wait_set(holder.event(holder.aborted, intent.id))
        holder.event(holder.proceed, intent.id).set()

        state = await terminal(agent, intent.id)
        assert state.status is IntentStatus.COMPLETED
        assert state.cancel_requested_at is not None
        assert state.cancel_reason == "too late"
        done = await facts(agent, DONE)
        assert [e.payload for e in done] == [{"finished": 1}]
        assert list(state.terminal_event_ids) == [done[0].id]
        assert await facts(agent, CANCELLED) == []
        again = await cancel(agent, intent.id, "again")
        assert again.status is CancelStatus.ALREADY_COMPLETED
        assert again.terminal_status is IntentStatus.COMPLETED


async def test_other_error_after_cancel_request_cancels_without_retry(tmp_path: Path) -> None:
    """An acquire raising a non-abort error after a cancel request ends cancelled, not
    retried and not failed."""
    holder = Holder("error")
    async with open_host(tmp_path, make_trigger(KIND, holder.acquire)) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND)
        await wait_set(holder.event(holder.started, intent.id))
        assert (await cancel(agent, intent.id, "user")).status is CancelStatus.REQUESTED
        await wait_set(holder.event(holder.aborted, intent.id))
        holder.event(holder.proceed, intent.id).set()

        state = await terminal(agent, intent.id)
        assert state.status is IntentStatus.CANCELLED
        assert state.attempts == 1
        assert [e.payload for e in await facts(agent, CANCELLED)] == [{"reason": "user"}]
        kinds = await kinds_of(agent, intent.id)
        assert "trigger.attempt_failed" not in kinds
        assert FAILED not in kinds
        assert "trigger.failed" not in kinds


async def test_self_cancel_records_reason(tmp_path: Path) -> None:
    """An acquire raising AbortError on its own, with no cancel request, ends cancelled with
    its reason recorded."""

    async def acquire(intent: JSON, ctx: TriggerContext) -> JSON:
        raise AbortError("changed my mind")

    async with open_host(tmp_path, make_trigger(KIND, acquire)) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND)
        state = await terminal(agent, intent.id)
        assert state.status is IntentStatus.CANCELLED
        assert state.cancel_reason == "changed my mind"
        assert state.cancel_requested_at is not None
        assert state.attempts == 1
        cancelled = await facts(agent, CANCELLED)
        assert [e.payload for e in cancelled] == [{"reason": "changed my mind"}]
        assert list(state.terminal_event_ids) == [cancelled[0].id]


async def test_intent_waiting_for_retry_is_cancelled_at_once(tmp_path: Path) -> None:
    """An intent back to pending after a failed attempt is cancelled in the call, and is
    never retried."""
    clock = ManualClock()
    attempts: list[int] = []

    async def acquire(intent: JSON, ctx: TriggerContext) -> JSON:
        attempts.append(ctx.attempt)
        if intent == "flaky":
            raise RuntimeError("flaky")
        return intent

    policy = RetryPolicy(max_attempts=3, initial_backoff=60, jitter=False)
    trigger = make_trigger(KIND, acquire, retry=policy)
    async with open_host(tmp_path, trigger, clock=clock) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND, payload="flaky")
        failure = await next_event(agent, ATTEMPT_FAILED)
        assert failure.payload["retry_at"] == clock.now + 60_000
        assert (await agent.intent(intent.id)).status is IntentStatus.PENDING
        result = await cancel(agent, intent.id, "give up")
        assert result.status is CancelStatus.CANCELLED
        state = await agent.intent(intent.id)
        assert state.status is IntentStatus.CANCELLED
        assert state.attempts == 1
        assert [e.payload for e in await facts(agent, CANCELLED)] == [{"reason": "give up"}]
        # Past the retry time, a later intent runs; the cancelled one does not.
        follow = await agent.enqueue_trigger(
            trigger_kind=KIND, payload="fine", at=datetime.fromtimestamp(clock.now / 1000 + 61, UTC)
        )
        clock.advance(120_000)
        await terminal(agent, follow.id)
        assert attempts == [1, 1]


async def test_failing_commit_cancelled_is_not_reported_as_cancelled(tmp_path: Path) -> None:
    """When commit_cancelled raises for a pending intent, its writes roll back, the intent
    fails, and cancel_trigger tells the caller it ended failed (not a plain cancelled)."""

    def commit_cancelled(intent: JSON, cancellation: Any, tx: Any) -> None:
        tx.insert_event(kind=CANCELLED, payload=None)
        raise ValueError("cleanup broke")

    trigger = make_trigger(KIND, commit_cancelled=commit_cancelled)
    async with open_host(tmp_path, trigger, run_scheduler=False) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND, at=later())
        result = await cancel(agent, intent.id, "user")
        state = await agent.intent(intent.id)
        assert state.status is IntentStatus.FAILED
        assert await facts(agent, CANCELLED) == []
        (failed,) = await facts(agent, FAILED)
        assert failed.payload["error_type"] == "ValueError"
        assert result.terminal_status is IntentStatus.FAILED, result


# -- ignored -------------------------------------------------------------------------------


async def test_ignored_trigger_answers_ignored_and_writes_nothing(tmp_path: Path) -> None:
    """With cancellation "ignored", cancel answers ignored for running, pending and unknown
    ids, writes nothing, and the work completes normally."""
    gate = Gate()
    trigger = make_trigger(KIND, gate.acquire, cancellation="ignored")
    async with open_host(tmp_path, trigger) as host:
        agent = host.get("a")
        running = await agent.enqueue_trigger(trigger_kind=KIND, payload="run")
        pending = await agent.enqueue_trigger(trigger_kind=KIND, payload="later", at=later())
        await gate.wait_started(running.id)
        count = len(await agent.events())

        for intent_event_id in (running.id, pending.id, 9_999):
            result = await cancel(agent, intent_event_id, "please")
            assert result == CancelResult(
                status=CancelStatus.IGNORED, intent_event_id=intent_event_id
            )
        assert len(await agent.events()) == count
        assert (await agent.intent(running.id)).cancel_requested_at is None
        assert (await agent.intent(pending.id)).status is IntentStatus.PENDING

        gate.open(running.id)
        state = await terminal(agent, running.id)
        assert state.status is IntentStatus.COMPLETED
        assert state.cancel_requested_at is None
        assert gate.attempts == [(running.id, 1, False, False)]
        assert len(await facts(agent, DONE)) == 1
        assert await facts(agent, CANCELLED) == []


async def test_ignored_on_an_actor_with_no_ledger_creates_nothing(tmp_path: Path) -> None:
    """An ignored cancel on a never-used actor reads nothing: no ledger file appears."""
    trigger = make_trigger(KIND, cancellation="ignored")
    async with open_host(tmp_path, trigger, run_scheduler=False) as host:
        result = await cancel(host.get("never-used"), 1)
        assert result.status is CancelStatus.IGNORED
        assert not any(path.is_file() for path in (tmp_path / "actors").rglob("*"))


# -- not_found -----------------------------------------------------------------------------


async def test_not_found_cases(tmp_path: Path) -> None:
    """Unknown ids, ids of another kind's intent, and ids from another actor answer
    not_found and write nothing."""
    gate = Gate()
    work = make_trigger(KIND, gate.acquire)
    other = make_trigger("test.other", gate.acquire)
    async with open_host(tmp_path, work, other, run_scheduler=False) as host:
        a = host.get("a")
        b = host.get("b")
        mine = await a.enqueue_trigger(trigger_kind=KIND, at=later())
        theirs = await a.enqueue_trigger(trigger_kind="test.other", at=later())
        only_in_a = await a.enqueue_trigger(trigger_kind=KIND, at=later())
        await b.enqueue_trigger(trigger_kind=KIND, at=later())  # b has id 1 only
        counts = (len(await a.events()), len(await b.events()))

        cases = [
            (a, KIND, 12_345),
            (a, KIND, 0),
            (a, KIND, -1),
            (a, KIND, theirs.id),  # an intent of another kind
            (a, "test.other", mine.id),
            (b, KIND, only_in_a.id),  # exists in actor a only
            (host.get("empty"), KIND, mine.id),
        ]
        for agent, kind, intent_event_id in cases:
            result = await cancel(agent, intent_event_id, "x", kind=kind)
            assert result == CancelResult(
                status=CancelStatus.NOT_FOUND, intent_event_id=intent_event_id
            ), (agent, kind, intent_event_id)
        assert (len(await a.events()), len(await b.events())) == counts
        for intent in (mine, theirs, only_in_a):
            state = await a.intent(intent.id)
            assert state.status is IntentStatus.PENDING
            assert state.cancel_requested_at is None


async def test_not_found_on_a_never_used_actor_creates_no_ledger(tmp_path: Path) -> None:
    """A cancel addressed to an actor that has no ledger answers not_found and does not
    create one (nor register the actor)."""
    async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as host:
        result = await cancel(host.get("typo"), 1, "x")
        assert result.status is CancelStatus.NOT_FOUND
        ledgers = [p.name for p in (tmp_path / "actors").rglob("*.db")]
        assert not any(name.startswith("typo") for name in ledgers), ledgers


# -- already_completed ---------------------------------------------------------------------


async def test_already_completed_reports_each_terminal_status(tmp_path: Path) -> None:
    """A terminal intent answers already_completed with its terminal status (completed,
    cancelled, failed) and nothing is written."""

    async def acquire(intent: JSON, ctx: TriggerContext) -> JSON:
        if intent == "fatal":
            raise FatalError("no way")
        return intent

    async with open_host(tmp_path, make_trigger(KIND, acquire)) as host:
        agent = host.get("a")
        completed = await agent.enqueue_trigger(trigger_kind=KIND, payload="ok")
        failed = await agent.enqueue_trigger(trigger_kind=KIND, payload="fatal")
        cancelled = await agent.enqueue_trigger(trigger_kind=KIND, payload="x", at=later())
        assert (await cancel(agent, cancelled.id, "first")).status is CancelStatus.CANCELLED
        for intent in (completed, failed):
            await terminal(agent, intent.id)
        count = len(await agent.events())

        expected = {
            completed.id: IntentStatus.COMPLETED,
            cancelled.id: IntentStatus.CANCELLED,
            failed.id: IntentStatus.FAILED,
        }
        for intent_event_id, status in expected.items():
            result = await cancel(agent, intent_event_id, "late")
            assert result == CancelResult(
                status=CancelStatus.ALREADY_COMPLETED,
                intent_event_id=intent_event_id,
                terminal_status=status,
            )
            assert (await agent.intent(intent_event_id)).status is status
        assert len(await agent.events()) == count
        assert (await agent.intent(cancelled.id)).cancel_reason == "first"
        assert (await agent.intent(completed.id)).cancel_requested_at is None


# -- bad calls -----------------------------------------------------------------------------


async def test_unknown_kind_raises_and_writes_nothing(tmp_path: Path) -> None:
    """An unknown trigger kind raises UnknownTriggerError naming it; nothing is written."""
    async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND, at=later())
        count = len(await agent.events())
        with pytest.raises(UnknownTriggerError) as info:
            await cancel(agent, intent.id, "x", kind="test.nope")
        assert info.value.kind == "test.nope"
        assert "test.nope" in str(info.value)
        assert len(await agent.events()) == count
        assert (await agent.intent(intent.id)).status is IntentStatus.PENDING


@pytest.mark.parametrize("bad_id", ["1", 1.0, True, None])
async def test_wrong_id_type_raises_type_error(tmp_path: Path, bad_id: object) -> None:
    """A non-int intent id (str, float, bool) raises TypeError and cancels nothing."""
    async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND, at=later())
        assert intent.id == 1
        with pytest.raises(TypeError):
            await cancel(agent, bad_id)  # type: ignore[arg-type]
        assert (await agent.intent(intent.id)).status is IntentStatus.PENDING


async def test_non_str_reason_raises_type_error(tmp_path: Path) -> None:
    """A reason that is not a str raises TypeError and cancels nothing."""
    async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND, at=later())
        with pytest.raises(TypeError):
            await cancel(agent, intent.id, 42)  # type: ignore[arg-type]
        assert (await agent.intent(intent.id)).status is IntentStatus.PENDING


# -- lost races, driven through the engine's operations ------------------------------------


async def test_claim_just_before_cancel_answers_requested(tmp_path: Path) -> None:
    """A claim that lands just before the cancel turns it into requested: commit_cancelled
    does not run in the cancel (only the claim holder may settle)."""
    async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND)
        claimed: ClaimResult = await host.store.run("a", claim(host))
        assert [c.row.id for c in claimed.claimed] == [intent.id]

        result = await cancel(agent, intent.id, "user")
        assert result.status is CancelStatus.REQUESTED
        state = await agent.intent(intent.id)
        assert state.status is IntentStatus.RUNNING
        assert state.cancel_reason == "user"
        assert await facts(agent, CANCELLED) == []
        assert len(await facts(agent, CANCEL_REQUESTED)) == 1


async def test_cancel_just_before_claim_leaves_nothing_to_claim(tmp_path: Path) -> None:
    """A cancel that lands before the claim cancels the intent; the claim then gets nothing."""
    async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND)
        assert (await cancel(agent, intent.id, "user")).status is CancelStatus.CANCELLED
        count = len(await agent.events())
        claimed: ClaimResult = await host.store.run("a", claim(host))
        assert claimed.claimed == []
        assert len(await agent.events()) == count
        state = await agent.intent(intent.id)
        assert state.status is IntentStatus.CANCELLED
        assert state.attempts == 0


async def test_settle_before_cancel_answers_already_completed(tmp_path: Path) -> None:
    """A completion that lands just before the cancel makes it already_completed."""
    async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND)
        (claimed,) = (await host.store.run("a", claim(host))).claimed
        settled = await host.store.run("a", settle(host, claimed, Outcome.RETURNED, "out"))
        assert settled is Settled.COMPLETED
        count = len(await agent.events())

        result = await cancel(agent, intent.id, "user")
        assert result.status is CancelStatus.ALREADY_COMPLETED
        assert result.terminal_status is IntentStatus.COMPLETED
        assert len(await agent.events()) == count
        assert (await agent.intent(intent.id)).cancel_requested_at is None


@pytest.mark.parametrize(
    ("outcome", "value", "settled", "status", "fact"),
    [
        (Outcome.RETURNED, "out", Settled.COMPLETED, IntentStatus.COMPLETED, DONE),
        (Outcome.RAISED, AbortError("user"), Settled.CANCELLED, IntentStatus.CANCELLED, CANCELLED),
        (Outcome.RAISED, ValueError("x"), Settled.CANCELLED, IntentStatus.CANCELLED, CANCELLED),
    ],
)
async def test_settle_after_requested_cancel(
    tmp_path: Path,
    outcome: Outcome,
    value: Any,
    settled: Settled,
    status: IntentStatus,
    fact: str,
) -> None:
    """After a requested cancel, the attempt's settle decides: returned completes, raised
    (AbortError or anything else) cancels; exactly one terminal fact either way."""
    async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND)
        (claimed,) = (await host.store.run("a", claim(host))).claimed
        assert (await cancel(agent, intent.id, "user")).status is CancelStatus.REQUESTED

        assert await host.store.run("a", settle(host, claimed, outcome, value)) is settled
        state = await agent.intent(intent.id)
        assert state.status is status
        assert state.cancel_requested_at is not None
        terminal_facts = await agent.events(kinds=TERMINAL_KINDS)
        assert [e.kind for e in terminal_facts] == [fact]
        assert list(state.terminal_event_ids) == [terminal_facts[0].id]
        if fact == CANCELLED:
            assert terminal_facts[0].payload == {"reason": "user"}
        # A second settle of the same attempt is a no-op.
        count = len(await agent.events())
        assert await host.store.run("a", settle(host, claimed, outcome, value)) is Settled.LOST
        assert len(await agent.events()) == count


async def test_stale_token_settle_is_lost_and_writes_nothing(tmp_path: Path) -> None:
    """After a lost claim is taken over, the old attempt's settle is LOST and writes
    nothing; the new holder settles the intent."""
    clock = ManualClock()
    async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False, clock=clock) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND, payload="p")
        (old,) = (await host.store.run("a", claim(host, host_id="old", lease_ms=1_000))).claimed
        clock.advance(2_000)  # the old lease runs out
        (new,) = (await host.store.run("a", claim(host, host_id="new"))).claimed
        assert new.row.id == intent.id
        assert new.row.redrive == 1
        assert new.row.claim_token != old.row.claim_token
        count = len(await agent.events())

        for outcome, value in (
            (Outcome.RETURNED, "stale"),
            (Outcome.RAISED, AbortError("stale")),
            (Outcome.RAISED, RuntimeError("stale")),
            (Outcome.SHUTDOWN, None),
        ):
            assert await host.store.run("a", settle(host, old, outcome, value)) is Settled.LOST
        assert len(await agent.events()) == count
        state = await agent.intent(intent.id)
        assert state.status is IntentStatus.RUNNING
        assert state.redrives == 1

        assert await host.store.run("a", settle(host, new, Outcome.RETURNED, "fresh")) is (
            Settled.COMPLETED
        )
        assert [e.payload for e in await facts(agent, DONE)] == ["fresh"]


async def test_concurrent_cancel_and_claim_are_consistent(tmp_path: Path) -> None:
    """A cancel and a claim submitted together yield one of the two consistent outcomes,
    and the intent ends with exactly one terminal fact."""
    async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND)
        results: dict[str, Any] = {}

        async def do_cancel() -> None:
            results["cancel"] = await cancel(agent, intent.id, "race")

        async def do_claim() -> None:
            results["claim"] = await host.store.run("a", claim(host))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(do_cancel)
                tg.start_soon(do_claim)

        status = results["cancel"].status
        claimed = results["claim"].claimed
        if status is CancelStatus.CANCELLED:
            assert claimed == []
        else:
            assert status is CancelStatus.REQUESTED
            assert [c.row.id for c in claimed] == [intent.id]
            assert await facts(agent, CANCELLED) == []
            (attempt,) = claimed
            settled = await host.store.run(
                "a", settle(host, attempt, Outcome.RAISED, AbortError("race"))
            )
            assert settled is Settled.CANCELLED
        state = await agent.intent(intent.id)
        assert state.status is IntentStatus.CANCELLED
        terminal_facts = await agent.events(kinds=TERMINAL_KINDS)
        assert [(e.kind, e.payload) for e in terminal_facts] == [(CANCELLED, {"reason": "race"})]


async def test_cancel_op_on_pending_then_running_matches_public_api(tmp_path: Path) -> None:
    """The engine's cancel op, run directly, gives the same answers as cancel_trigger."""
    async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as host:
        agent = host.get("a")
        registry = host.spec.registry
        trigger = registry.get(KIND)
        first = await agent.enqueue_trigger(trigger_kind=KIND)
        second = await agent.enqueue_trigger(trigger_kind=KIND, at=later())
        await host.store.run("a", claim(host))  # claims only the due one
        run = host.store.run
        requested = await run("a", cancel_op(registry, trigger, first.id, "r", None))
        cancelled = await run("a", cancel_op(registry, trigger, second.id, "c", None))
        missing = await run("a", cancel_op(registry, trigger, 777, "m", None))
        assert requested.status is CancelStatus.REQUESTED
        assert cancelled.status is CancelStatus.CANCELLED
        assert missing.status is CancelStatus.NOT_FOUND
        done = await run("a", cancel_op(registry, trigger, second.id, "again", None))
        assert done.status is CancelStatus.ALREADY_COMPLETED
        assert done.terminal_status is IntentStatus.CANCELLED
