"""Durable workflows, from a second review: cleanup steps after a cancel (the first call
after it, and one interrupted by a restart after a cancelled race), hooks of a race's losing
gather, body errors from the body's own task group, non-JSON step results, a cancel after
the first attempt was lost, sleeps and hooks awaited in steps."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import pytest

from actors import ActorHost, define_agent_do
from ledger import IntentStatus, LedgerWriteError
from tests.helpers import fast_config, place, wait_until
from tests.workflow_helpers import (
    add,
    calls,
    cancel_seen,
    gate,
    held,
    release_resource,
    reset_state,
    result_of,
    seen,
    wait_hook,
)
from triggers import _workflow
from triggers._workflow import RACE_WON, STEP_COMPLETED
from triggers.workflows import (
    HookNotFoundError,
    RunCancelledError,
    RunFailedError,
    StepFailedError,
    create_hook,
    gather,
    get_hook_by_token,
    get_run,
    race,
    resume_hook,
    sleep,
    start,
    step,
    workflow,
)

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [pytest.mark.anyio, pytest.mark.contract]


@pytest.fixture(autouse=True)
def _fresh_state() -> None:
    reset_state()


# -- cleanup steps after a cancel ------------------------------------------------------------------


@workflow
async def one_step_then_cleanup() -> str:
    try:
        return await held("only")
    finally:
        await release_resource()


@workflow
async def race_then_cleanup() -> Any:
    try:
        return await race(held("racer"), sleep("1h"))
    finally:
        await held("cleanup")


@workflow
async def catches_the_cancel() -> str:
    try:
        return await held("caught")
    except RunCancelledError as exc:
        return f"stopped politely ({exc.reason})"


CleanupDO = define_agent_do(
    workflows=[one_step_then_cleanup, race_then_cleanup, catches_the_cancel]
)


def cleanup_host(tmp_path: Path, **options: Any) -> ActorHost:
    return ActorHost(CleanupDO, **place(tmp_path), config=fast_config(), **options)


async def test_a_cleanup_step_that_is_the_first_call_after_the_cancel_runs(
    tmp_path: Path,
) -> None:
    """The README: a cancelled run's finally blocks run "and steps called there run
    (cleanup)". When the cancel arrives during the try block's last step, the finally
    block's cleanup step is the first call after the cancel: it must run, not raise
    RunCancelledError in place of the cleanup."""
    async with cleanup_host(tmp_path) as h:
        agent = h.get("u:c")
        run = await start(one_step_then_cleanup, actor=agent)
        with anyio.fail_after(20):
            await gate("only:started").wait()
        await run.cancel("user")
        await cancel_seen(agent, run)
        gate("only:release").set()
        with pytest.raises(RunCancelledError):
            await result_of(run)
        assert calls["release"] == 1, "the finally block's cleanup step was refused"


async def test_a_body_that_catches_the_cancel_and_returns_completes_with_its_value(
    tmp_path: Path,
) -> None:
    """The cancel reaches the body at the step that was running (once it has finished and
    been recorded); a body that catches RunCancelledError and returns chose to: the run ends
    completed with that value."""
    async with cleanup_host(tmp_path) as h:
        agent = h.get("u:p")
        run = await start(catches_the_cancel, actor=agent)
        with anyio.fail_after(20):
            await gate("caught:started").wait()
        await run.cancel("user")
        await cancel_seen(agent, run)
        gate("caught:release").set()
        assert await result_of(run) == "stopped politely (user)"
        assert await run.status() is IntentStatus.COMPLETED
        done = [e.payload["result"] for e in await agent.events(kinds=[STEP_COMPLETED])]
        assert done == ["caught"]


async def test_a_cleanup_step_interrupted_by_a_restart_runs_again_after_a_cancelled_race(
    tmp_path: Path,
) -> None:
    """race(step, sleep('1h')) cancelled while the step runs: the race raises
    RunCancelledError (no winner) and the finally block's cleanup step starts. The host stops
    during the cleanup. The replay on the next host must take the same path: the race raises
    the cancel again (it must not now record the finished step as the winner) and the
    cleanup step runs again, to completion."""
    async with cleanup_host(tmp_path) as h:
        agent = h.get("u:r")
        run = await start(race_then_cleanup, actor=agent)
        with anyio.fail_after(20):
            await gate("racer:started").wait()
        await run.cancel("user")
        await cancel_seen(agent, run)
        gate("racer:release").set()
        with anyio.fail_after(20):
            await gate("cleanup:started").wait()
        # Leaving the host's context stops it during the cleanup step.
    gate("cleanup:release").set()
    async with cleanup_host(tmp_path) as h:
        agent = h.get("u:r")
        again = await get_run(run.run_id, actor=agent)
        with pytest.raises(RunCancelledError):
            await result_of(again)
        done = [e.payload["result"] for e in await agent.events(kinds=[STEP_COMPLETED])]
        assert done == ["racer", "cleanup"], "the interrupted cleanup step never completed"
        assert await agent.events(kinds=[RACE_WON]) == [], "the replay found a winner"
    assert calls["held:cleanup"] == 2


# -- hooks of a losing gather ----------------------------------------------------------------------


@workflow
async def hook_loses_in_a_gather() -> str:
    await race(gather(create_hook(token="nested"), add(1, 1)), sleep(0.05))
    await create_hook(token="after-nested")
    return "done"


@workflow
async def hook_loses_a_race() -> str:
    await race(create_hook(token="loser"), sleep(0.05))
    await create_hook(token="after-loser")
    return "done"


HookDO = define_agent_do(workflows=[hook_loses_in_a_gather, hook_loses_a_race])


async def test_a_hook_in_a_gather_that_lost_a_race_frees_its_token(tmp_path: Path) -> None:
    """race(...) disposes of a losing hook (race(create_hook(token=t), sleep(...)) frees t
    once the sleep wins). A hook inside a losing gather lost the race as well; it must not
    keep its token: resume_hook would "deliver" to a hook nobody awaits, and the body could
    not create a hook with that token again (HookConflictError against itself)."""
    async with ActorHost(HookDO, **place(tmp_path), config=fast_config()) as h:
        agent = h.get("u:h")
        run = await start(hook_loses_in_a_gather, actor=agent)
        await wait_hook(agent, "after-nested")
        with pytest.raises(HookNotFoundError):
            await get_hook_by_token("nested", actor=agent)
        await run.cancel("done")


async def test_a_losing_hook_is_disposed_by_the_replay_after_a_crash_before_its_disposal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attempt that records a race's winner may end before it disposes of the losing
    hook (here the disposal meets storage trouble, once). The next attempt answers the race
    from the ledger; it must dispose of the loser then, or the token stays held for good."""
    original = _workflow._Run.dispose_hook
    failed: list[str] = []

    async def fails_once(self: Any, token: str, hook_id: int) -> None:
        if not failed:
            failed.append(token)
            raise LedgerWriteError("u:crash", "the disk is full (injected)")
        await original(self, token, hook_id)

    monkeypatch.setattr(_workflow._Run, "dispose_hook", fails_once)
    async with ActorHost(HookDO, **place(tmp_path), config=fast_config()) as h:
        agent = h.get("u:crash")
        run = await start(hook_loses_a_race, actor=agent)
        await wait_hook(agent, "after-loser")
        assert failed == ["loser"]
        assert await agent.events(kinds=[RACE_WON])
        with pytest.raises(HookNotFoundError):
            await get_hook_by_token("loser", actor=agent)
        await run.cancel("done")


# -- failures of the body ----------------------------------------------------------------------


async def explode() -> None:
    raise ValueError("a bug in the body")


@workflow
async def fails_in_its_own_task_group() -> str:
    calls["body"] += 1
    async with anyio.create_task_group() as tg:
        tg.start_soon(explode)
    return "unreachable"


@step
async def returns_a_set() -> Any:
    calls["set"] += 1
    return {1, 2}


@workflow
async def step_result_is_not_json() -> Any:
    return await returns_a_set()


@workflow
async def swallows_a_non_json_result() -> str:
    try:
        await returns_a_set()
    except StepFailedError as exc:
        seen.append(exc.message)
    await create_hook(token="after-the-set")  # the run waits: its replay meets the step again
    return "carried on"


FailDO = define_agent_do(
    workflows=[fails_in_its_own_task_group, step_result_is_not_json, swallows_a_non_json_result]
)


async def test_a_body_error_raised_from_its_own_task_group_fails_the_run_at_once(
    tmp_path: Path,
) -> None:
    """A bug in the body fails the run (FatalError), not retried by running the body again;
    the same error wrapped in an ExceptionGroup by the body's own task group must too."""
    async with ActorHost(FailDO, **place(tmp_path), config=fast_config()) as h:
        run = await start(fails_in_its_own_task_group, actor=h.get("u:g"))
        with pytest.raises(RunFailedError) as caught:
            await result_of(run, 30)
        assert caught.value.failure.attempts == 1
        assert calls["body"] == 1, f"the failing body ran {calls['body']} times"


async def test_a_step_whose_result_is_not_json_runs_once(tmp_path: Path) -> None:
    """A step returning a value the ledger cannot store (a set) fails the run; it is not
    taken for storage trouble and retried, running the step (its side effects) again."""
    async with ActorHost(FailDO, **place(tmp_path), config=fast_config()) as h:
        run = await start(step_result_is_not_json, actor=h.get("u:j"))
        with pytest.raises(RunFailedError):
            await result_of(run, 30)
        assert calls["set"] == 1, f"the step ran {calls['set']} times"


async def test_a_non_json_step_result_is_a_recorded_step_failure(tmp_path: Path) -> None:
    """A step whose result is not JSON fails for good (StepFailedError, saying why) and the
    failure is recorded: a body that catches it and carries on does not run the step again
    when it is replayed."""
    async with ActorHost(FailDO, **place(tmp_path), config=fast_config()) as h:
        agent = h.get("u:k")
        run = await start(swallows_a_non_json_result, actor=agent)
        await wait_hook(agent, "after-the-set")
        await resume_hook("after-the-set", None, actor=agent)
        assert await result_of(run) == "carried on"
    assert calls["set"] == 1
    assert len(seen) == 2, "the replay did not raise the recorded failure again"
    assert "the result of step 'returns_a_set' is not storable as JSON" in seen[0]


# -- a cancel after a crash in the first step ------------------------------------------------------


async def test_a_run_cancelled_after_its_first_attempt_was_lost_runs_its_finally_cleanup(
    tmp_path: Path,
) -> None:
    """A run whose first step was running when its host stopped has begun (the step's side
    effects may have happened) though no fact is recorded yet. Cancelled then, its next
    attempt must replay it to its first call, raising RunCancelledError there, so that its
    finally block's cleanup step runs; it is not a run that never started."""
    async with cleanup_host(tmp_path) as h:
        run = await start(one_step_then_cleanup, actor=h.get("u:l"))
        with anyio.fail_after(20):
            await gate("only:started").wait()
    async with cleanup_host(tmp_path, run_scheduler=False) as client:
        waiting = await get_run(run.run_id, actor=client.get("u:l"))
        assert (await waiting.cancel("user")).status.value == "requested"
    async with cleanup_host(tmp_path) as h:
        again = await get_run(run.run_id, actor=h.get("u:l"))
        with pytest.raises(RunCancelledError):
            await result_of(again)
    assert calls["held:only"] == 1
    assert calls["release"] == 1, "the body that had begun was cancelled without its cleanup"


# -- workflow calls made in the body, awaited inside a step ----------------------------------------


@step
async def awaits_inside(call: Any) -> str:
    calls["inside"] += 1
    try:
        await call
    except RuntimeError as exc:
        seen.append(str(exc))
        return "refused"
    return "awaited"


@workflow
async def hook_awaited_in_a_step() -> str:
    return await awaits_inside(create_hook(token="in-step"))


@workflow
async def sleep_awaited_in_a_step() -> str:
    return await awaits_inside(sleep(0.01))


@workflow
async def step_call_awaited_in_a_step() -> str:
    return await awaits_inside(add(1, 2))


InStepDO = define_agent_do(
    workflows=[hook_awaited_in_a_step, sleep_awaited_in_a_step, step_call_awaited_in_a_step]
)


@pytest.mark.parametrize(
    "wf",
    [
        pytest.param(hook_awaited_in_a_step, id="a-hook"),
        pytest.param(sleep_awaited_in_a_step, id="a-sleep"),
        pytest.param(step_call_awaited_in_a_step, id="a-step-call"),
    ],
)
async def test_a_hook_or_sleep_made_in_the_body_and_awaited_in_a_step_is_refused(
    tmp_path: Path, wf: Any
) -> None:
    """Steps are plain code: a sleep or hook awaited inside a step (made in the body and
    handed to it) must raise RuntimeError, as sleep() and create_hook() called there do,
    instead of suspending the run in the middle of the step (which then runs again)."""
    async with ActorHost(InStepDO, **place(tmp_path), config=fast_config()) as h:
        agent = h.get("u:i")
        run = await start(wf, actor=agent)

        async def settled() -> bool:
            if await run.status() is not IntentStatus.RUNNING and calls["inside"]:
                return True
            return bool(await agent.events(kinds=["trigger.workflow.hook_created"]))

        await wait_until(agent, settled)
        assert await run.status() is IntentStatus.COMPLETED
        assert await result_of(run) == "refused"
        assert calls["inside"] == 1
        assert "must be awaited in the body, not inside a step" in seen[0]
        assert calls["add"] == 0
