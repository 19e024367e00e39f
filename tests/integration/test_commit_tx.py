"""What a commit function can do through ``Tx``: facts, chained intents, rescheduling."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from ledger import IntentStatus
from tests.helpers import CANCELLED, DONE, make_trigger, open_host
from triggers import CancelStatus

if TYPE_CHECKING:
    from pathlib import Path

    from actors import Agent
    from ledger import JSON, IntentState
    from triggers import TriggerContext, Tx

pytestmark = [pytest.mark.anyio, pytest.mark.contract]


def chaining_commit(fail_after_enqueue: bool = False, kind: str = "test.next") -> Any:
    def commit(outcome: JSON, tx: Tx) -> None:
        tx.insert_event(kind=DONE, payload=outcome)
        follow_up = tx.enqueue(trigger_kind=kind, payload={"from": tx.intent_event_id})
        tx.insert_event(kind="test.chained", payload={"intent": follow_up.id})
        if fail_after_enqueue:
            raise RuntimeError("commit failed after enqueueing")

    return commit


async def test_commit_enqueues_a_follow_up_atomically(tmp_path: Path) -> None:
    """tx.enqueue records a new intent in the commit's transaction, and it runs."""
    first = make_trigger("test.first", commit=chaining_commit())
    second = make_trigger("test.next")
    async with open_host(tmp_path, first, second) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind="test.first", payload={"n": 1})
        state = await agent.wait_for_intent(intent.id)
        assert state.status is IntentStatus.COMPLETED
        chained = await agent.events(kinds=["test.chained"])
        follow_id = chained[0].payload["intent"]
        follow = await agent.wait_for_intent(follow_id)
        assert follow.status is IntentStatus.COMPLETED
        assert follow.trigger_kind == "test.next"
        (event,) = await agent.events(kinds=["test.next.requested"])
        assert (event.id, event.intent_event_id, event.payload) == (
            follow_id,
            follow_id,
            {"from": intent.id},
        )
        assert set(state.terminal_event_ids) == {chained[0].id, chained[0].id - 2}


async def test_failed_commit_rolls_back_its_enqueue(tmp_path: Path) -> None:
    """A commit that raises after tx.enqueue leaves no follow-up intent; the intent fails."""
    first = make_trigger("test.first", commit=chaining_commit(fail_after_enqueue=True))
    async with open_host(tmp_path, first, make_trigger("test.next")) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind="test.first", payload={"n": 1})
        state = await agent.wait_for_intent(intent.id)
        assert state.status is IntentStatus.FAILED
        assert await agent.events(kinds=["test.next.requested", "test.chained", DONE]) == []
        assert [i.intent_event_id for i in await agent.intents()] == [intent.id]
        (failure,) = await agent.events(kinds=["test.failed"])
        assert failure.payload["error_type"] == "RuntimeError"


async def test_enqueue_of_an_unknown_kind_fails_the_commit(tmp_path: Path) -> None:
    """tx.enqueue of an unregistered kind raises in the commit: rolled back, intent failed."""
    first = make_trigger("test.first", commit=chaining_commit(kind="test.nope"))
    async with open_host(tmp_path, first) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind="test.first", payload={})
        state = await agent.wait_for_intent(intent.id)
        assert state.status is IntentStatus.FAILED
        (failure,) = await agent.events(kinds=["test.failed"])
        assert failure.payload["error_type"] == "UnknownTriggerError"
        assert await agent.events(kinds=[DONE]) == []


async def test_reschedule_runs_the_intent_again(tmp_path: Path) -> None:
    """tx.reschedule puts the intent back to pending; each run's facts land; attempts reset."""
    runs: list[int] = []

    def commit(outcome: JSON, tx: Tx) -> None:
        runs.append(tx.intent_event_id)
        tx.insert_event(kind="test.tick", payload={"run": len(runs)})
        if len(runs) < 3:
            tx.reschedule(tx.now - timedelta(seconds=1))
        else:
            tx.insert_event(kind=DONE, payload=None)

    async with open_host(tmp_path, make_trigger(commit=commit)) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind="test.work", payload={})
        state = await agent.wait_for_intent(intent.id)
        assert state.status is IntentStatus.COMPLETED
        assert runs == [intent.id] * 3
        ticks = await agent.events(kinds=["test.tick"])
        assert [e.payload["run"] for e in ticks] == [1, 2, 3]
        assert state.attempts == 1, "attempts start afresh after a reschedule"


async def test_cancel_request_survives_a_reschedule(tmp_path: Path) -> None:
    """A cancel requested while an occurrence runs is not consumed when its commit
    reschedules: the occurrence's facts stand and the series ends there, cancelled, with no
    further attempt (one started aborted could return and reschedule again, for ever, if its
    acquire did not look at the signal)."""
    started = anyio.Event()
    proceed = anyio.Event()
    seen: list[bool] = []

    async def acquire(intent: JSON, ctx: TriggerContext) -> JSON:
        seen.append(ctx.signal.aborted)
        if len(seen) == 1:
            started.set()
            await proceed.wait()  # ignores the signal: completes the occurrence anyway
            return "first"
        ctx.signal.throw_if_aborted()
        return "again"

    def commit(outcome: JSON, tx: Tx) -> None:
        tx.insert_event(kind="test.tick", payload=outcome)
        tx.reschedule(tx.now - timedelta(seconds=1))

    async with open_host(tmp_path, make_trigger("test.work", acquire, commit=commit)) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind="test.work")
        await started.wait()
        result = await agent.cancel_trigger(
            trigger_kind="test.work", intent_event_id=intent.id, reason="stop the series"
        )
        assert result.status is CancelStatus.REQUESTED
        proceed.set()
        with anyio.fail_after(10):
            state = await agent.wait_for_intent(intent.id)
        assert (state.status, state.cancel_reason) == (IntentStatus.CANCELLED, "stop the series")
        assert seen == [False]
        assert [e.payload for e in await agent.events(kinds=["test.tick"])] == ["first"]
        assert state.terminal_event_ids == tuple(
            e.id for e in await agent.events(kinds=[CANCELLED])
        )


async def test_a_series_whose_acquire_ignores_the_signal_ends_on_a_cancel(
    tmp_path: Path,
) -> None:
    """A recurring trigger whose acquire never looks at its signal still ends once cancelled:
    the occurrence running then commits, and no other starts."""
    started = anyio.Event()
    proceed = anyio.Event()
    runs: list[int] = []

    async def acquire(intent: JSON, ctx: TriggerContext) -> JSON:
        runs.append(ctx.attempt)
        started.set()
        await proceed.wait()  # never looks at ctx.signal
        return len(runs)

    def commit(outcome: JSON, tx: Tx) -> None:
        tx.insert_event(kind="test.tick", payload=outcome)
        tx.reschedule(tx.now)  # due again at once: a busy series

    async with open_host(tmp_path, make_trigger("test.work", acquire, commit=commit)) as host:
        agent = host.get("a")
        state = await _cancel_while_it_runs(agent, started, proceed)
        assert state.status is IntentStatus.CANCELLED
        assert runs == [1]
        assert [e.payload for e in await agent.events(kinds=["test.tick"])] == [1]


async def test_cancel_during_a_far_reschedule_ends_the_intent_now(tmp_path: Path) -> None:
    """A commit rescheduling its intent an hour ahead while a cancel was requested does not
    leave it waiting for that hour: the series ends there, cancelled, at once."""
    started = anyio.Event()
    proceed = anyio.Event()

    async def acquire(intent: JSON, ctx: TriggerContext) -> JSON:
        if ctx.signal.aborted:
            ctx.signal.throw_if_aborted()
        started.set()
        await proceed.wait()
        return "occurrence"

    def commit(outcome: JSON, tx: Tx) -> None:
        tx.reschedule(tx.now + timedelta(hours=1))

    async with open_host(tmp_path, make_trigger("test.work", acquire, commit=commit)) as host:
        state = await _cancel_while_it_runs(host.get("a"), started, proceed)
        assert state.status is IntentStatus.CANCELLED


async def _cancel_while_it_runs(
    agent: Agent, started: anyio.Event, proceed: anyio.Event
) -> IntentState:
    """Enqueue a ``test.work`` intent, cancel it once its attempt has ``started``, let the
    attempt ``proceed``, and return the intent's terminal state (bounded wait)."""
    intent = await agent.enqueue_trigger(trigger_kind="test.work")
    await started.wait()
    await agent.cancel_trigger(trigger_kind="test.work", intent_event_id=intent.id)
    proceed.set()
    with anyio.fail_after(10):
        return await agent.wait_for_intent(intent.id)


async def test_reserved_kinds_and_stale_tx_are_refused(tmp_path: Path) -> None:
    """A commit cannot write trigger.* facts, and a Tx kept past its commit refuses writes."""
    kept: list[Tx] = []

    def commit(outcome: JSON, tx: Tx) -> None:
        kept.append(tx)
        if outcome.get("reserved"):
            tx.insert_event(kind="trigger.failed", payload={})
        tx.insert_event(kind=DONE, payload=None)

    async with open_host(tmp_path, make_trigger(commit=commit)) as host:
        agent = host.get("a")
        bad = await agent.enqueue_trigger(trigger_kind="test.work", payload={"reserved": True})
        assert (await agent.wait_for_intent(bad.id)).status is IntentStatus.FAILED
        (failure,) = await agent.events(kinds=["test.failed"])
        assert failure.payload["error_type"] == "ValueError"
        good = await agent.enqueue_trigger(trigger_kind="test.work", payload={})
        assert (await agent.wait_for_intent(good.id)).status is IntentStatus.COMPLETED
        with pytest.raises(RuntimeError, match="ended"):
            kept[-1].insert_event(kind="test.late", payload=None)
