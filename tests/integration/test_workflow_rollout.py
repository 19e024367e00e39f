"""Hosts of different versions on one ledger: a run of a workflow that the claiming host lacks
is left for a host that has it, not failed (a rolling deploy adds a workflow)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import pytest
import structlog.testing

from actors import ActorHost, define_agent_do
from ledger import IntentStatus, LedgerError
from tests.helpers import ManualClock, fast_config, place, wait_until
from triggers import _workflow
from triggers._engine import FAILED
from triggers._workflow import (
    ELSEWHERE_S,
    RUN_CANCELLED,
    RUN_COMPLETED,
    RUN_FAILED,
    RUN_STARTED,
    STEP_COMPLETED,
    WAIT_CREATED,
)
from triggers.workflows import RunCancelledError, get_run, sleep, start, step, workflow

if TYPE_CHECKING:
    from pathlib import Path

    from actors import Agent
    from triggers.workflows import Run

pytestmark = [pytest.mark.anyio, pytest.mark.contract]

ENDINGS = (RUN_COMPLETED, RUN_CANCELLED, RUN_FAILED, FAILED)


@step
async def shout(name: str) -> str:
    return f"HELLO {name.upper()}"


@workflow
async def greet(name: str) -> str:
    return await shout(name)


cleaned: list[str] = []


@step
async def clean_up(name: str) -> None:
    cleaned.append(name)


@workflow
async def napper(name: str) -> str:
    try:
        await sleep("1h")
        return "rested"
    finally:
        await clean_up(name)


@workflow
async def older() -> str:
    return "old"


OLD = define_agent_do(workflows=[older])  # has workflows, but not ``greet`` nor ``napper``
NEW = define_agent_do(workflows=[older, greet, napper])


def host(tmp_path: Path, spec: Any, clock: ManualClock, **options: Any) -> ActorHost:
    return ActorHost(spec, **place(tmp_path), clock=clock, config=fast_config(), **options)


async def put_back(agent: Agent, run: Run, clock: ManualClock) -> None:
    """Wait until the host of ``agent`` has claimed ``run`` and put it back for later."""

    async def deferred() -> bool:
        state = await agent.intent(run.run_id)
        due_ms = round(state.due_at.timestamp() * 1000)
        return state.status is IntentStatus.PENDING and due_ms > clock.now

    await wait_until(agent, deferred)


async def test_a_host_lacking_the_workflow_leaves_the_run_for_one_that_has_it(
    tmp_path: Path,
) -> None:
    """An old host claims a run of a workflow it lacks: the run is put back, due again
    ELSEWHERE_S later, with no attempt spent and nothing written. A new host then runs it
    once: one terminal fact, no failure."""
    clock = ManualClock()
    async with (
        host(tmp_path, OLD, clock) as old,
        host(tmp_path, NEW, clock, run_scheduler=False) as client,
    ):
        run = await start(greet, ["ada"], actor=client.get("chat"))
        await put_back(old.get("chat"), run, clock)
        state = await old.get("chat").intent(run.run_id)
        assert state.attempts == 0
        assert state.terminal_event_ids == ()
        facts = await old.get("chat").events(intent_event_id=run.run_id)
        assert [f.kind for f in facts] == [RUN_STARTED]
    clock.advance(round(ELSEWHERE_S * 1000))  # due again: the new host's first poll finds it
    async with host(tmp_path, NEW, clock) as new:
        with anyio.fail_after(20):
            again = await get_run(run.run_id, actor=new.get("chat"))
            assert await again.result() == "HELLO ADA"
        endings = await new.get("chat").events(intent_event_id=run.run_id, kinds=ENDINGS)
    assert [(f.kind, f.payload["result"]) for f in endings] == [(RUN_COMPLETED, "HELLO ADA")]


async def test_a_run_no_host_can_run_waits_and_can_be_cancelled(tmp_path: Path) -> None:
    """With only hosts that lack its workflow, a run waits (it is not failed), however often
    it is claimed, with one warning in the log for the minute; cancelled, it ends
    cancelled, with one terminal fact."""
    clock = ManualClock()
    unwarned = define_agent_do(workflows=[older])  # an actor class that has not warned yet
    async with (
        host(tmp_path, unwarned, clock) as old,
        host(tmp_path, NEW, clock, run_scheduler=False) as client,
    ):
        with structlog.testing.capture_logs() as logs:
            run = await start(greet, ["ada"], actor=client.get("chat"))
            for _ in range(3):
                await put_back(old.get("chat"), run, clock)
                clock.advance(round(ELSEWHERE_S * 1000))
            await put_back(old.get("chat"), run, clock)
        warned = [e for e in logs if e["event"] == "workflow_not_here"]
        assert [(e["log_level"], e["workflow"]) for e in warned][:1] == [("warning", greet.name)]
        assert all(e["log_level"] == "debug" for e in warned[1:])
        assert await run.status() is IntentStatus.PENDING
        # A run's cancel asks its body to stop (its finally blocks run): the host that
        # lacks the workflow ends it cancelled when it claims it.
        assert (await run.cancel()).status == "requested"
        with anyio.fail_after(20):
            state = await old.get("chat").wait_for_intent(run.run_id)
        assert state.status is IntentStatus.CANCELLED
        endings = await old.get("chat").events(intent_event_id=run.run_id, kinds=ENDINGS)
    assert [f.kind for f in endings] == [RUN_CANCELLED]


@pytest.mark.parametrize("unreadable", [False, True], ids=["facts read", "facts unreadable"])
async def test_a_cancelled_run_that_began_keeps_its_cleanup_for_a_host_that_has_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unreadable: bool
) -> None:
    """A run began on a new host (it sleeps inside try/finally); the new host stops and the
    run is cancelled while only an old host runs. The old host puts it back rather than
    ending it (also when it cannot read the run's facts to tell whether it began), so that
    its finally block runs: the next new host replays it, runs the cleanup step, and it
    ends cancelled, with one terminal fact."""
    cleaned.clear()
    clock = ManualClock()
    async with host(tmp_path, NEW, clock) as new:
        agent = new.get("chat")
        run = await start(napper, ["ada"], actor=agent)

        async def asleep() -> bool:
            slept = await agent.events(kinds=[WAIT_CREATED])
            return bool(slept) and await run.status() is IntentStatus.PENDING

        await wait_until(agent, asleep)
    if unreadable:

        async def unreadable_facts(_ctx: object) -> None:
            raise LedgerError("the facts cannot be read now")

        monkeypatch.setattr(_workflow, "_replay_facts", unreadable_facts)
    async with (
        host(tmp_path, OLD, clock) as old,
        host(tmp_path, NEW, clock, run_scheduler=False) as client,
    ):
        run = await get_run(run.run_id, actor=client.get("chat"))
        assert (await run.cancel()).status == "requested"  # due at once: the old host claims it
        await put_back(old.get("chat"), run, clock)
        assert await run.status() is IntentStatus.PENDING
        assert cleaned == []
    monkeypatch.undo()
    clock.advance(round(ELSEWHERE_S * 1000))
    async with host(tmp_path, NEW, clock) as new:
        run = await get_run(run.run_id, actor=new.get("chat"))
        with anyio.fail_after(20), pytest.raises(RunCancelledError):
            await run.result()
        endings = await new.get("chat").events(intent_event_id=run.run_id, kinds=ENDINGS)
        steps = await new.get("chat").events(intent_event_id=run.run_id, kinds=[STEP_COMPLETED])
    assert cleaned == ["ada"]
    assert len(steps) == 1
    assert [f.kind for f in endings] == [RUN_CANCELLED]
