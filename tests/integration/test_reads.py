"""Reading an actor through ``Agent``: event filters, intents, tails (also across hosts),
projections and attached output streams."""

from __future__ import annotations

import collections
import sqlite3
from contextlib import aclosing
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from actors import ActorHost, define_agent_do
from actors._wakeup import SUPPORTED as DATAGRAMS_SUPPORTED
from ledger import (
    Event,
    IntentNotFoundError,
    IntentStatus,
    LedgerTx,
    PayloadError,
    Projection,
    ProjectionError,
    ledger_relpath,
)
from tests.helpers import CANCELLED, DONE, FAILED, Gate, fast_config, make_trigger, open_host
from triggers import AbortError, CancelStatus, ClaimLostError, FatalError, TriggerContext, Tx

if TYPE_CHECKING:
    from pathlib import Path

    from actors import Agent

pytestmark = [pytest.mark.anyio, pytest.mark.contract]

REQUESTED = "test.work.requested"
LATER = datetime(2100, 1, 1, tzinfo=UTC)


async def complete(agent: Agent, payload: Any = None) -> int:
    intent = await agent.enqueue_trigger(trigger_kind="test.work", payload=payload)
    with anyio.fail_after(10):
        state = await agent.wait_for_intent(intent.id)
    assert state.status == "completed"
    return intent.id


# -- events, intent, intents -----------------------------------------------------------------


async def test_event_filters(tmp_path: Path) -> None:
    """events() filters by after, kinds, intent_event_id and limit, alone and combined."""
    async with open_host(tmp_path, make_trigger()) as host:
        agent = host.get("a")
        one = await complete(agent, 1)
        two = await complete(agent, 2)
        later = await agent.enqueue_trigger(trigger_kind="test.work", payload=3, at=LATER)
        result = await agent.cancel_trigger(trigger_kind="test.work", intent_event_id=later.id)
        assert result.status == CancelStatus.CANCELLED

        everything = await agent.events()
        assert [e.kind for e in everything] == [REQUESTED, DONE, REQUESTED, DONE, REQUESTED,
                                                CANCELLED]  # fmt: skip
        assert [e.id for e in everything] == [1, 2, 3, 4, 5, 6]
        assert await agent.events(after=4) == everything[4:]
        assert await agent.events(after=6) == []
        assert await agent.events(kinds=[DONE]) == [everything[1], everything[3]]
        assert await agent.events(kinds=(k for k in [CANCELLED, REQUESTED])) == [
            everything[0], everything[2], everything[4], everything[5]
        ]  # fmt: skip
        assert await agent.events(kinds=["no.such.kind"]) == []
        assert await agent.events(kinds=[]) == []
        assert await agent.events(intent_event_id=two) == everything[2:4]
        assert await agent.events(intent_event_id=later.id) == everything[4:6]
        assert await agent.events(intent_event_id=999) == []
        assert await agent.events(limit=2) == everything[:2]
        assert await agent.events(limit=0) == []
        assert await agent.events(after=1, kinds=[REQUESTED], limit=1) == [everything[2]]
        assert await agent.events(after=2, intent_event_id=one) == []
        assert await agent.events(kinds=[DONE], intent_event_id=one) == [everything[1]]


async def test_reading_an_unused_actor_is_empty_and_creates_nothing(tmp_path: Path) -> None:
    """An actor that never wrote anything reads as an empty ledger, and reading it creates
    no ledger file (reads of arbitrary names must not fill the disk)."""
    async with open_host(tmp_path, make_trigger()) as host:
        agent = host.get("nobody")
        assert await agent.events() == []
        assert await agent.intents() == []
        with pytest.raises(IntentNotFoundError):
            await agent.intent(1)
        result = await agent.cancel_trigger(trigger_kind="test.work", intent_event_id=1)
        assert result.status == CancelStatus.NOT_FOUND
        assert not await host.store.exists("nobody")
        assert await host.actors() == []


async def test_intent_reads(tmp_path: Path) -> None:
    """intent(id) returns the state; an unknown id (or a non-intent event) raises
    IntentNotFoundError naming the actor and id; intents(status=) filters."""
    async with open_host(tmp_path, make_trigger()) as host:
        agent = host.get("a")
        done = await complete(agent)
        pending = await agent.enqueue_trigger(trigger_kind="test.work", at=LATER)
        doomed = await agent.enqueue_trigger(trigger_kind="test.work", at=LATER)
        await agent.cancel_trigger(trigger_kind="test.work", intent_event_id=doomed.id)

        state = await agent.intent(done)
        assert state.intent_event_id == done
        assert state.status == IntentStatus.COMPLETED
        assert state.trigger_kind == "test.work"
        assert state.attempts == 1
        assert len(state.terminal_event_ids) == 1
        assert (await agent.intent(pending.id)).status == IntentStatus.PENDING
        assert (await agent.intent(pending.id)).due_at == LATER

        for unknown in (999, 0, -1, done + 1):  # done + 1 is the test.done fact
            with pytest.raises(IntentNotFoundError) as info:
                await agent.intent(unknown)
            assert info.value.actor_id == "a"
            assert info.value.intent_event_id == unknown
        with pytest.raises(TypeError):
            await agent.intent("1")  # type: ignore[arg-type]

        def ids(states: list[Any]) -> list[int]:
            return [s.intent_event_id for s in states]

        assert ids(await agent.intents()) == [done, pending.id, doomed.id]
        assert ids(await agent.intents(status="completed")) == [done]
        assert ids(await agent.intents(status=IntentStatus.PENDING)) == [pending.id]
        assert ids(await agent.intents(status="cancelled")) == [doomed.id]
        assert ids(await agent.intents(status="failed")) == []
        assert ids(await agent.intents(after=done)) == [pending.id, doomed.id]
        assert ids(await agent.intents(limit=1)) == [done]


# -- tail ------------------------------------------------------------------------------------


async def collect_tail(
    agent: Agent,
    count: int,
    into: list[Event],
    caught_up: anyio.Event,
    existing: int,
    after: int = 0,
) -> None:
    """Collect ``count`` events from ``agent.tail(after=)``; set ``caught_up`` once the
    ``existing`` ones are in."""
    if existing == 0:
        caught_up.set()
    # Agent.tail is annotated AsyncIterator, but it is an async generator: close it promptly.
    tail = agent.tail(after=after)
    async with aclosing(tail) as events:
        async for event in events:
            into.append(event)
            if len(into) == existing:
                caught_up.set()
            if len(into) == count:
                return


async def test_tail_replays_then_follows(tmp_path: Path) -> None:
    """tail(after=) yields existing events, then follows ones written later by another task."""
    async with open_host(tmp_path, make_trigger()) as host:
        agent = host.get("a")
        for _ in range(2):
            await complete(agent)
        seen: list[Event] = []
        caught_up = anyio.Event()
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(collect_tail, agent, 7, seen, caught_up, 3, 1)
                await caught_up.wait()
                await anyio.wait_all_tasks_blocked()
                for _ in range(2):
                    await complete(agent)
        assert [e.id for e in seen] == [2, 3, 4, 5, 6, 7, 8]
        assert seen == (await agent.events())[1:]


async def test_tail_of_an_empty_actor_waits_for_the_first_event(tmp_path: Path) -> None:
    """A tail on an actor with no events yields the first event once it is written."""
    async with open_host(tmp_path, make_trigger()) as host:
        agent = host.get("fresh")
        seen: list[Event] = []
        caught_up = anyio.Event()
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(collect_tail, agent, 2, seen, caught_up, 0)
                await anyio.wait_all_tasks_blocked()
                await complete(agent)
        assert [e.kind for e in seen] == [REQUESTED, DONE]


async def test_tail_follows_many_events_in_order(tmp_path: Path) -> None:
    """A tail following a burst of concurrent writes sees every event once, in id order."""
    async with open_host(tmp_path, make_trigger()) as host:
        agent = host.get("a")
        seen: list[Event] = []
        caught_up = anyio.Event()
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(collect_tail, agent, 120, seen, caught_up, 0)
                async with anyio.create_task_group() as writers:
                    for i in range(60):
                        writers.start_soon(complete, agent, i)
        assert [e.id for e in seen] == list(range(1, 121))


async def tail_across_hosts(tmp_path: Path, reader_config: Any) -> None:
    gate = Gate()
    trigger = make_trigger("test.work", gate.acquire)
    # The reader is a client host; the writer a scheduler host on the same data_dir.
    async with (
        open_host(tmp_path, trigger, run_scheduler=False, config=reader_config) as reader,
        open_host(tmp_path, trigger) as writer,
    ):
        first = await writer.get("a").enqueue_trigger(trigger_kind="test.work", payload=1)
        await gate.wait_started(first.id)
        seen: list[Event] = []
        caught_up = anyio.Event()
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(collect_tail, reader.get("a"), 4, seen, caught_up, 1)
                await caught_up.wait()
                await anyio.wait_all_tasks_blocked()
                gate.open(first.id)  # the writer host commits test.done
                second = await writer.get("a").enqueue_trigger(trigger_kind="test.work")
                gate.open(second.id)
        assert sorted(e.kind for e in seen) == [DONE, DONE, REQUESTED, REQUESTED]
        assert seen == await writer.get("a").events()


async def test_tail_follows_another_host(tmp_path: Path) -> None:
    """A tail on a client host follows events committed by a scheduler host (wake-up
    datagram or poll fallback)."""
    await tail_across_hosts(tmp_path, fast_config())


@pytest.mark.skipif(not DATAGRAMS_SUPPORTED, reason="datagram wake-ups need Linux")
async def test_tail_across_hosts_is_woken_by_datagrams(tmp_path: Path) -> None:
    """With a poll interval far beyond the test's deadline, only the cross-host wake-up
    datagram can deliver the writer's events to the reader's tail in time."""
    await tail_across_hosts(tmp_path, fast_config(poll_interval=600.0))


# -- projections -----------------------------------------------------------------------------


def count_events(state: int, event: Event) -> int:
    return state + 1


def count_kinds(state: dict[str, int], event: Event) -> dict[str, int]:
    return {**state, event.kind: state.get(event.kind, 0) + 1}


def record_ids(state: list[int], event: Event) -> list[int]:
    return [*state, event.id]


# Annotated rather than written Projection[int](...): explicitly parametrized construction
# raises TypeError on Python 3.11 (frozen slots dataclass + Generic; see the report).
COUNT: Projection[int] = Projection("count", 0, count_events)
KINDS: Projection[dict[str, int]] = Projection("kinds", {}, count_kinds)
IDS: Projection[list[int]] = Projection("ids", [], record_ids)
PROJECTIONS: list[Projection[Any]] = [COUNT, KINDS, IDS]


def stored_projections(host: ActorHost, actor_id: str) -> dict[str, tuple[Any, int]]:
    """The projections table as an operator would read it with sqlite3."""
    import json

    conn = sqlite3.connect(host.data_dir / ledger_relpath(actor_id))
    try:
        rows = conn.execute("SELECT name, state, last_event_id FROM projections").fetchall()
    finally:
        conn.close()
    return {name: (json.loads(state), last) for name, state, last in rows}


async def assert_projections_match(agent: Agent) -> None:
    events = await agent.events()
    assert await agent.projection("count") == len(events)
    assert await agent.projection("kinds") == dict(collections.Counter(e.kind for e in events))
    assert await agent.projection("ids") == [e.id for e in events]


@pytest.mark.sqlite_only
async def test_projection_is_kept_in_the_writing_transaction(tmp_path: Path) -> None:
    """Projections fold every event once, in id order, and are stored by the transaction
    that writes the events (visible in the file at once)."""
    spec = define_agent_do(triggers=[make_trigger()], projections=PROJECTIONS)
    async with open_host(tmp_path, spec=spec) as host:
        agent = host.get("a")
        assert await agent.projection("count") == 0
        assert await agent.projection("kinds") == {}
        for i in range(3):
            await complete(agent, i)
        await assert_projections_match(agent)
        stored = stored_projections(host, "a")
        assert stored["count"] == (6, 6)
        assert stored["kinds"] == ({REQUESTED: 3, DONE: 3}, 6)
        assert stored["ids"] == ([1, 2, 3, 4, 5, 6], 6)


async def test_projection_ignores_rolled_back_events(tmp_path: Path) -> None:
    """Events of an operation that raised are not folded into any projection."""
    spec = define_agent_do(triggers=[make_trigger()], projections=PROJECTIONS)

    def doomed(tx: LedgerTx) -> None:
        tx.insert_event("doomed", None)
        raise RuntimeError("rolled back")

    async with open_host(tmp_path, spec=spec) as host:
        agent = host.get("a")
        await complete(agent)
        with pytest.raises(RuntimeError):
            await host.store.run("a", doomed)
        await host.store.run("a", lambda tx: tx.insert_event("kept", None))
        await assert_projections_match(agent)
        assert await agent.projection("kinds") == {REQUESTED: 1, DONE: 1, "kept": 1}


def picky(state: int, event: Event) -> int:
    """Counts events; cannot take a ``poison`` one (nor, as a ``ProjectionError``, a
    framework failure fact when ``FRAMEWORK_POISON`` is set)."""
    if event.kind == "poison" or (FRAMEWORK_POISON and event.kind == "trigger.failed"):
        raise ValueError("poison")
    return state + 1


FRAMEWORK_POISON: list[bool] = []


async def test_failing_projection_fails_the_write(tmp_path: Path) -> None:
    """A projection whose apply raises rolls back the events it was folding; the error names
    the projection and the event, its cause is what apply raised."""
    spec = define_agent_do(triggers=[make_trigger()], projections=[Projection("n", 0, picky)])
    async with open_host(tmp_path, spec=spec) as host:
        with pytest.raises(ProjectionError, match="projection 'n' could not apply event 1 "
                           r"\('poison'\): ValueError: poison") as caught:  # fmt: skip
            await host.store.run("a", lambda tx: tx.insert_event("poison", None))
        assert isinstance(caught.value.__cause__, ValueError)
        assert (caught.value.projection, caught.value.kind, caught.value.event_id) == (
            "n", "poison", 1,
        )  # fmt: skip
        assert await host.get("a").events() == []
        await host.store.run("a", lambda tx: tx.insert_event("fine", None))
        assert await host.get("a").projection("n") == 1


async def test_a_state_that_is_not_json_fails_the_write(tmp_path: Path) -> None:
    """An apply that returns a state the ledger cannot hold fails the write alike."""
    spec = define_agent_do(projections=[Projection("s", [], lambda s, e: {1, 2})])
    async with open_host(tmp_path, spec=spec) as host:
        with pytest.raises(ProjectionError, match="projection 's' could not apply event 1"):
            await host.store.run("a", lambda tx: tx.insert_event("any", None))
        assert await host.get("a").events() == []


async def test_an_enqueue_a_projection_cannot_take_writes_nothing(tmp_path: Path) -> None:
    """``enqueue_trigger`` of an intent whose event a projection cannot apply raises
    ``ProjectionError`` (it raised what apply raised, naming neither) and records nothing."""
    trigger = make_trigger(intent_event_kind="poison")
    spec = define_agent_do(triggers=[trigger], projections=[Projection("n", 0, picky)])
    async with open_host(tmp_path, spec=spec) as host:
        agent = host.get("a")
        with pytest.raises(ProjectionError, match="'poison'"):
            await agent.enqueue_trigger(trigger_kind="test.work")
        assert await agent.events() == []


async def test_a_commit_whose_facts_a_projection_cannot_take_fails_the_intent(
    tmp_path: Path,
) -> None:
    """Facts a ``commit`` writes that a projection cannot apply fail the commit: its writes
    roll back and the intent ends ``failed`` at once, its acquire run once. (The settle
    failed, again and again: the intent stayed running and its acquire ran at every
    redrive.)"""
    runs: list[int] = []

    async def acquire(intent: Any, ctx: TriggerContext) -> None:
        runs.append(ctx.attempt)

    def commit(outcome: Any, tx: Tx) -> None:
        tx.insert_event(kind="poison", payload={"note": "no amount"})

    trigger = make_trigger(acquire=acquire, commit=commit)
    spec = define_agent_do(triggers=[trigger], projections=[Projection("n", 0, picky)])
    async with open_host(tmp_path, spec=spec) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind="test.work")
        with anyio.fail_after(10):
            state = await agent.wait_for_intent(intent.id)
        assert state.status == "failed"
        assert runs == [1]
        kinds = [event.kind for event in await agent.events()]
        assert "poison" not in kinds
        (failed,) = await agent.events(kinds=["trigger.failed"])
        assert failed.payload["error_type"] == "ProjectionError"
        assert "projection 'n' could not apply" in failed.payload["message"]
        assert await agent.projection("n") == len(kinds)


async def test_a_projection_that_cannot_take_a_failure_fact_does_not_hold_the_intent(
    tmp_path: Path,
) -> None:
    """The framework's own facts are written whatever the projections make of them: a
    projection that cannot apply ``trigger.failed`` is left behind (a warning), the intent
    fails once, and reading that projection raises ``ProjectionError`` until its apply is
    fixed."""
    FRAMEWORK_POISON.append(True)
    runs: list[int] = []

    async def acquire(intent: Any, ctx: TriggerContext) -> None:
        runs.append(ctx.attempt)
        raise FatalError("no")

    trigger = make_trigger(acquire=acquire)
    spec = define_agent_do(triggers=[trigger], projections=[Projection("n", 0, picky)])
    try:
        async with open_host(tmp_path, spec=spec) as host:
            agent = host.get("a")
            intent = await agent.enqueue_trigger(trigger_kind="test.work")
            with anyio.fail_after(10):
                state = await agent.wait_for_intent(intent.id)
            assert state.status == "failed"
            assert runs == [1]
            assert len(await agent.events(kinds=["trigger.failed"])) == 1
            with pytest.raises(ProjectionError, match=r"'trigger\.failed'"):
                await agent.projection("n")
            FRAMEWORK_POISON.clear()  # apply fixed: the projection catches up
            assert await agent.projection("n") == len(await agent.events())
    finally:
        FRAMEWORK_POISON.clear()


@pytest.mark.sqlite_only
async def test_projection_rebuild_after_tampering(tmp_path: Path) -> None:
    """rebuild_projection recomputes a tampered projection from the events."""
    spec = define_agent_do(triggers=[make_trigger()], projections=PROJECTIONS)
    async with open_host(tmp_path, spec=spec) as host:
        agent = host.get("a")
        for _ in range(2):
            await complete(agent)
        conn = sqlite3.connect(host.data_dir / ledger_relpath("a"))
        try:
            conn.execute("UPDATE projections SET state = '999' WHERE name = 'count'")
            conn.execute("UPDATE projections SET state = '{\"x\": 1}' WHERE name = 'kinds'")
            conn.commit()
        finally:
            conn.close()
        assert await agent.projection("count") == 999  # the stored state is what is read
        assert await agent.rebuild_projection("count") == 4
        assert await agent.rebuild_projection("kinds") == {REQUESTED: 2, DONE: 2}
        await assert_projections_match(agent)
        await complete(agent)
        await assert_projections_match(agent)
        assert stored_projections(host, "a")["count"] == (6, 6)


@pytest.mark.sqlite_only
async def test_projection_rebuild_after_deleting_its_row(tmp_path: Path) -> None:
    """A projection whose stored row was deleted is caught up from the first event."""
    spec = define_agent_do(triggers=[make_trigger()], projections=PROJECTIONS)
    async with open_host(tmp_path, spec=spec) as host:
        agent = host.get("a")
        await complete(agent)
        conn = sqlite3.connect(host.data_dir / ledger_relpath("a"))
        try:
            conn.execute("DELETE FROM projections")
            conn.commit()
        finally:
            conn.close()
        await assert_projections_match(agent)
        await complete(agent)
        await assert_projections_match(agent)


@pytest.mark.sqlite_only
async def test_projection_catches_up_with_writers_that_lack_it(tmp_path: Path) -> None:
    """Events appended by a host whose actor class lacks the projection are folded in."""
    with_projection = define_agent_do(triggers=[make_trigger()], projections=PROJECTIONS)
    without = define_agent_do(triggers=[make_trigger()])
    async with (
        open_host(tmp_path, spec=with_projection) as host,
        open_host(tmp_path, spec=without, run_scheduler=False) as other,
    ):
        agent = host.get("a")
        await complete(agent)
        for i in range(3):
            intent = await other.get("a").enqueue_trigger(trigger_kind="test.work", payload=i)
            with anyio.fail_after(10):
                await agent.wait_for_intent(intent.id)
        await other.store.run("a", lambda tx: tx.insert_event("foreign", None))
        await assert_projections_match(agent)
        assert (await agent.projection("kinds"))["foreign"] == 1
        # The next write by the projection's host stores the caught-up state.
        await complete(agent)
        await assert_projections_match(agent)
        assert stored_projections(host, "a")["count"] == (11, 11)
        assert stored_projections(host, "a")["ids"] == (list(range(1, 12)), 11)
    # A later host with the projection reads it right too.
    async with open_host(tmp_path, spec=with_projection, run_scheduler=False) as host:
        await assert_projections_match(host.get("a"))


async def test_unknown_projection_name_raises_key_error(tmp_path: Path) -> None:
    """projection() and rebuild_projection() of an unregistered name raise KeyError."""
    spec = define_agent_do(triggers=[make_trigger()], projections=PROJECTIONS)
    async with open_host(tmp_path, spec=spec) as host:
        with pytest.raises(KeyError, match="nope"):
            await host.get("a").projection("nope")
        with pytest.raises(KeyError, match="nope"):
            await host.get("a").rebuild_projection("nope")


def test_parametrized_projection_constructor_works() -> None:
    """Projection[int](...) (explicit type parameter) constructs like Projection(...)."""
    projection = Projection[int]("n", 0, count_events)
    assert projection.name == "n"
    assert projection.initial == 0


def test_duplicate_projection_names_are_refused() -> None:
    """Two projections with one name raise ValueError at define_agent_do."""
    with pytest.raises(ValueError, match="unique"):
        define_agent_do(
            triggers=[make_trigger()],
            projections=[Projection("n", 0, count_events), Projection("n", 1, count_events)],
        )


# -- attached streams ------------------------------------------------------------------------


class Streamer:
    """An acquire that writes chunk ``i`` only once the test allows it."""

    def __init__(self, chunks: int) -> None:
        self.chunks = chunks
        self.allow = [anyio.Event() for _ in range(chunks + 1)]
        self.written = [anyio.Event() for _ in range(chunks)]
        self.indexes: list[int] = []

    async def acquire(self, intent: Any, ctx: TriggerContext) -> Any:
        with ctx.signal.scope():
            for i in range(self.chunks):
                await self.allow[i].wait()
                self.indexes.append(await ctx.stream.write({"i": i, "text": f"tok{i}"}))
                self.written[i].set()
            await self.allow[self.chunks].wait()  # the final "finish" step
        return {"chunks": self.chunks}

    def chunk(self, i: int) -> dict[str, Any]:
        return {"i": i, "text": f"tok{i}"}


async def read_stream(
    agent: Agent,
    intent_id: int,
    into: list[Any],
    start: int = 0,
    got_first: anyio.Event | None = None,
) -> None:
    """Append every chunk of the stream to ``into``; set ``got_first`` after the first."""
    stream = agent.stream(intent_id, start=start)
    async with aclosing(stream) as chunks:
        async for chunk in chunks:
            into.append(chunk)
            if got_first is not None:
                got_first.set()


async def test_stream_replays_and_follows_until_completion(tmp_path: Path) -> None:
    """A reader that starts before the first chunk and one that starts after the end both
    get every chunk from index 0 in order; iteration ends when the intent completes."""
    streamer = Streamer(4)
    async with open_host(tmp_path, make_trigger("test.work", streamer.acquire)) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind="test.work")
        early: list[Any] = []
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(read_stream, agent, intent.id, early)
                await anyio.wait_all_tasks_blocked()
                for i in range(4):
                    streamer.allow[i].set()
                    await streamer.written[i].wait()
                    await anyio.wait_all_tasks_blocked()
                streamer.allow[4].set()
            assert (await agent.wait_for_intent(intent.id)).status == "completed"
            late: list[Any] = []
            await read_stream(agent, intent.id, late)
            skipped: list[Any] = []
            await read_stream(agent, intent.id, skipped, start=2)
            beyond: list[Any] = []
            await read_stream(agent, intent.id, beyond, start=10)
        expected = [streamer.chunk(i) for i in range(4)]
        assert early == expected
        assert late == expected
        assert skipped == expected[2:]
        assert beyond == []


async def test_an_attempt_that_lost_its_claim_writes_nothing_to_the_stream(
    tmp_path: Path,
) -> None:
    """An attempt's claim is taken over while it runs (released here directly, as another
    host's retry would leave it) and a new attempt runs the intent. The old attempt's next
    write raises ClaimLostError and adds nothing: the stream holds the chunks of the
    attempt that held the claim at each write, never the old one's after it lost it."""
    tokens: list[str | None] = []
    old_wrote, old_may_write, old_done = anyio.Event(), anyio.Event(), anyio.Event()
    refused: list[BaseException] = []

    async def acquire(intent: Any, ctx: TriggerContext) -> Any:
        tokens.append(ctx._claim_token)
        if len(tokens) > 1:
            await ctx.stream.write("new 0")
            return "new"
        try:
            await ctx.stream.write("old 0")
            old_wrote.set()
            await old_may_write.wait()
            await ctx.stream.write("old 1")
        except ClaimLostError as exc:
            refused.append(exc)
            raise
        finally:
            old_done.set()
        return "old"

    async with open_host(tmp_path, make_trigger(acquire=acquire)) as host:
        agent = host.get("chat")
        intent = await agent.enqueue_trigger(trigger_kind="test.work")
        with anyio.fail_after(20):
            await old_wrote.wait()
        token = tokens[0]
        assert token is not None

        def take_over(tx: LedgerTx) -> bool:
            return tx.release(intent.id, token, due_at=tx.now_ms, count_attempt=False, redrive=True)

        assert await host.store.run("chat", take_over)
        with anyio.fail_after(20):
            assert (await agent.wait_for_intent(intent.id)).status == "completed"
        old_may_write.set()
        with anyio.fail_after(20):
            await old_done.wait()
        chunks = [chunk async for chunk in agent.stream(intent.id)]
        facts = await agent.events(intent_event_id=intent.id, kinds=[DONE, CANCELLED, FAILED])
    assert chunks == ["old 0", "new 0"]
    assert len(refused) == 1
    assert "no longer holds its claim" in str(refused[0])
    assert [(f.kind, f.payload) for f in facts] == [(DONE, "new")]


async def test_stream_write_returns_the_chunk_index(tmp_path: Path) -> None:
    """ctx.stream.write returns the index the chunk was stored at (0, 1, 2, ...)."""
    streamer = Streamer(3)
    async with open_host(tmp_path, make_trigger("test.work", streamer.acquire)) as host:
        intent = await host.get("a").enqueue_trigger(trigger_kind="test.work")
        for event in streamer.allow:
            event.set()
        with anyio.fail_after(10):
            await host.get("a").wait_for_intent(intent.id)
    assert streamer.indexes == [0, 1, 2]


async def test_stream_ends_when_the_intent_is_cancelled_mid_stream(tmp_path: Path) -> None:
    """Cancelling mid-stream ends every reader's iteration with the chunks written so far."""
    streamer = Streamer(5)
    async with open_host(tmp_path, make_trigger("test.work", streamer.acquire)) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind="test.work")
        early: list[Any] = []
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(read_stream, agent, intent.id, early)
                for i in range(2):
                    streamer.allow[i].set()
                    await streamer.written[i].wait()
                await anyio.wait_all_tasks_blocked()
                result = await agent.cancel_trigger(
                    trigger_kind="test.work", intent_event_id=intent.id, reason="stop"
                )
                assert result.status == CancelStatus.REQUESTED
            state = await agent.wait_for_intent(intent.id)
            late: list[Any] = []
            await read_stream(agent, intent.id, late, start=1)
        assert state.status == "cancelled"
        assert early == [streamer.chunk(0), streamer.chunk(1)]
        assert late == [streamer.chunk(1)]
        kinds = [e.kind for e in await agent.events(intent_event_id=intent.id)]
        assert kinds[-1] == CANCELLED


async def test_stream_ends_when_the_intent_fails(tmp_path: Path) -> None:
    """A stream whose intent fails ends too, keeping the chunks written before the failure."""

    async def acquire(intent: Any, ctx: TriggerContext) -> Any:
        await ctx.stream.write("partial")
        raise FatalError("provider said no")

    async with open_host(tmp_path, make_trigger("test.work", acquire)) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind="test.work")
        chunks: list[Any] = []
        with anyio.fail_after(10):
            await read_stream(agent, intent.id, chunks)
            assert (await agent.intent(intent.id)).status == "failed"
        assert chunks == ["partial"]
        kinds = [e.kind for e in await agent.events(intent_event_id=intent.id)]
        assert kinds[-2:] == [FAILED, "trigger.failed"]


async def test_stream_of_a_cancelled_pending_intent_is_empty(tmp_path: Path) -> None:
    """An intent cancelled before it ran has an empty stream that ends at once."""
    async with open_host(tmp_path, make_trigger()) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind="test.work", at=LATER)
        await agent.cancel_trigger(trigger_kind="test.work", intent_event_id=intent.id)
        chunks: list[Any] = []
        with anyio.fail_after(10):
            await read_stream(agent, intent.id, chunks)
        assert chunks == []


async def test_stream_is_followed_from_another_host(tmp_path: Path) -> None:
    """A client host's reader follows chunks written by a scheduler host until the end."""
    streamer = Streamer(3)
    trigger = make_trigger("test.work", streamer.acquire)
    async with (
        open_host(tmp_path, trigger, run_scheduler=False) as reader,
        open_host(tmp_path, trigger) as writer,
    ):
        intent = await writer.get("a").enqueue_trigger(trigger_kind="test.work")
        chunks: list[Any] = []
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(read_stream, reader.get("a"), intent.id, chunks)
                for event in streamer.allow:
                    event.set()
        assert chunks == [streamer.chunk(i) for i in range(3)]


async def test_non_json_chunk_raises_payload_error_in_acquire(tmp_path: Path) -> None:
    """A chunk that is not JSON raises PayloadError inside acquire and stores nothing."""
    errors: list[BaseException] = []

    async def acquire(intent: Any, ctx: TriggerContext) -> Any:
        for bad in (object(), float("nan"), {1j: 2}, {"set": {1, 2}}, float("inf")):
            try:
                await ctx.stream.write(bad)
            except PayloadError as exc:
                errors.append(exc)
        await ctx.stream.write("fine")
        return None

    async with open_host(tmp_path, make_trigger("test.work", acquire)) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind="test.work")
        chunks: list[Any] = []
        with anyio.fail_after(10):
            await read_stream(agent, intent.id, chunks)
    assert len(errors) == 5
    assert all("stream chunk" in str(e) for e in errors)
    assert chunks == ["fine"]


async def test_stream_of_unknown_intent_raises(tmp_path: Path) -> None:
    """stream() on an id that is not an intent raises IntentNotFoundError."""
    async with open_host(tmp_path, make_trigger()) as host:
        agent = host.get("a")
        done = await complete(agent)
        for unknown in (999, done + 1):
            with anyio.fail_after(10), pytest.raises(IntentNotFoundError):
                await read_stream(agent, unknown, [])


async def test_stream_survives_reader_cancellation(tmp_path: Path) -> None:
    """A reader cancelled mid-stream does not disturb the intent or later readers."""
    streamer = Streamer(2)
    async with open_host(tmp_path, make_trigger("test.work", streamer.acquire)) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind="test.work")
        first: list[Any] = []
        got_first = anyio.Event()
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(read_stream, agent, intent.id, first, 0, got_first)
                streamer.allow[0].set()
                await got_first.wait()
                tg.cancel_scope.cancel()
            streamer.allow[1].set()
            streamer.allow[2].set()
            assert (await agent.wait_for_intent(intent.id)).status == "completed"
            rest: list[Any] = []
            await read_stream(agent, intent.id, rest)
        assert first == [streamer.chunk(0)]
        assert rest == [streamer.chunk(0), streamer.chunk(1)]


async def test_cancel_reaches_a_streaming_acquire(tmp_path: Path) -> None:
    """A cancel while acquire streams aborts it with the cancel's reason; readers end."""
    seen: list[AbortError] = []
    wrote = anyio.Event()

    async def acquire(intent: Any, ctx: TriggerContext) -> Any:
        await ctx.stream.write(0)
        wrote.set()
        try:
            with ctx.signal.scope():
                await anyio.sleep_forever()
        except AbortError as exc:
            seen.append(exc)
            raise
        return None

    async with open_host(tmp_path, make_trigger("test.work", acquire)) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind="test.work")
        chunks: list[Any] = []
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(read_stream, agent, intent.id, chunks)
                await wrote.wait()
                await agent.cancel_trigger(
                    trigger_kind="test.work", intent_event_id=intent.id, reason="bye"
                )
        assert chunks == [0]
        assert len(seen) == 1
        assert seen[0].reason == "bye"
