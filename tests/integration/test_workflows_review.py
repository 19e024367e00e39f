"""Durable workflows, from a review: replaying aborts, divergence of any kind of call, hook
conflicts and body stream writes on replay, durable step retries, run cancellation (steps in
flight, waiting runs, cleanup steps in finally blocks), calls refused inside steps, and
gather and race nested in each other."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from actors import ActorHost, define_agent_do
from ledger import IntentStatus
from tests.helpers import ManualClock, fast_config, place, wait_until
from tests.workflow_helpers import (
    add,
    calls,
    cancel_seen,
    gate,
    held,
    release_resource,
    replay_point,
    replayed,
    reset_state,
    result_of,
    seen,
    wait_hook,
    watchdog,
    work_until_aborted,
)
from triggers import FatalError, RetryPolicy
from triggers._workflow import STEP_ATTEMPT_FAILED, STEP_COMPLETED, WAIT_CREATED
from triggers.workflows import (
    AbortController,
    HookConflictError,
    RunCancelledError,
    RunFailedError,
    StepFailedError,
    create_hook,
    gather,
    get_run,
    get_writable,
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

flip: list[str] = []


@pytest.fixture(autouse=True)
def _fresh_state() -> None:
    reset_state()
    flip.clear()


# -- replaying the durable AbortController ------------------------------------------------------


@step
async def abort_then_fail(controller: AbortController) -> None:
    await controller.abort("done here")
    raise FatalError("and failed")


@step
async def abort_now(controller: AbortController) -> str:
    await controller.abort("now")
    return "aborted"


@workflow
async def watchdog_made_first() -> list[bool]:
    controller = AbortController()
    with contextlib.suppress(StepFailedError):
        await gather(watchdog(controller), work_until_aborted(controller.signal))
    aborted = controller.signal.aborted  # True the first time: the watchdog aborted it
    await replay_point()  # the rest runs on a replay
    return [aborted]


@workflow
async def aborting_step_fails() -> list[bool]:
    controller = AbortController()
    with contextlib.suppress(StepFailedError):
        await abort_then_fail(controller)
    aborted = controller.signal.aborted
    await replay_point()  # the rest runs on a replay
    return [aborted]


@workflow
async def abort_beside_a_sleep() -> list[bool]:
    controller = AbortController()
    await gather(abort_now(controller), sleep(0.05))  # the sleep is the group's last place
    aborted = controller.signal.aborted
    await replay_point()  # the rest runs on a replay
    return [aborted]


ControllerDO = define_agent_do(
    workflows=[watchdog_made_first, aborting_step_fails, abort_beside_a_sleep]
)


@pytest.mark.parametrize(
    "wf",
    [
        pytest.param(watchdog_made_first, id="a-failed-step-ends-the-gather"),
        pytest.param(aborting_step_fails, id="the-aborting-step-fails"),
        pytest.param(abort_beside_a_sleep, id="a-sleep-ends-the-gather"),
    ],
)
async def test_a_step_abort_replays_right_after_the_aborting_step(tmp_path: Path, wf: Any) -> None:
    """An abort made by a step is seen on replay as soon as that step is answered from the
    ledger, as it was the first time: when the gather's last call is a step that failed of
    the abort, when the aborting step itself failed, and when the gather's last call is a
    sleep."""
    async with ActorHost(ControllerDO, **place(tmp_path), config=fast_config()) as h:
        run = await start(wf, actor=h.get("u:w"))
        assert await replayed(run, h.get("u:w")) == [True]
        assert calls["work"] <= 1


# -- divergence -----------------------------------------------------------------------------------


@workflow
async def sleep_then_step_on_replay() -> str:
    if not flip:
        flip.append("first execution")
        await sleep("1h")  # call 1 is a sleep the first time...
    else:
        await add(1, 1)  # ...and a step on replay
    return "done"


@workflow
async def swallows_the_divergence() -> str:
    if not flip:
        flip.append("first execution")
        await sleep("1h")
    else:
        with contextlib.suppress(Exception):
            await add(1, 1)
    return "swallowed"


DivergeDO = define_agent_do(workflows=[sleep_then_step_on_replay, swallows_the_divergence])


async def replayed_after_its_sleep(tmp_path: Path, wf: Any) -> tuple[ManualClock, int]:
    """Start ``wf`` on a manual clock and stop its host once the run sleeps its hour, then
    end the hour: returns the clock and the run's id, for a new host to replay it."""
    clock = ManualClock()
    async with ActorHost(DivergeDO, **place(tmp_path), config=fast_config(), clock=clock) as h:
        agent = h.get("u:d")
        run = await start(wf, actor=agent)

        async def asleep() -> bool:
            slept = await agent.events(kinds=[WAIT_CREATED])
            return bool(slept) and await run.status() is IntentStatus.PENDING

        await wait_until(agent, asleep)
    clock.advance(3_600_001)
    return clock, run.run_id


async def test_a_replay_calling_a_step_where_a_sleep_was_recorded_diverges(tmp_path: Path) -> None:
    """A replay whose call at a place is a step while the run recorded a sleep there fails
    the run with ReplayDivergenceError naming both; the step does not run."""
    clock, run_id = await replayed_after_its_sleep(tmp_path, sleep_then_step_on_replay)
    async with ActorHost(DivergeDO, **place(tmp_path), config=fast_config(), clock=clock) as h:
        run = await get_run(run_id, actor=h.get("u:d"))
        with pytest.raises(RunFailedError, match="ReplayDivergenceError") as caught:
            await result_of(run)
        assert "as step 'add', but the run recorded sleep there" in str(caught.value)
        assert calls["add"] == 0


async def test_a_divergence_fails_the_run_even_if_the_body_catches_it(tmp_path: Path) -> None:
    """A body that catches the ReplayDivergenceError (a broad except) still fails: its later
    calls would be matched to the wrong facts."""
    clock, run_id = await replayed_after_its_sleep(tmp_path, swallows_the_divergence)
    async with ActorHost(DivergeDO, **place(tmp_path), config=fast_config(), clock=clock) as h:
        run = await get_run(run_id, actor=h.get("u:d"))
        with pytest.raises(RunFailedError, match="ReplayDivergenceError"):
            await result_of(run)


# -- hooks ----------------------------------------------------------------------------------------


async def nap() -> None:
    await sleep(0.05)


@workflow
async def hook_around_own_task_group() -> Any:
    async with create_hook(token="tg-hook") as hook:
        async with anyio.create_task_group() as tg:
            tg.start_soon(nap)  # suspends the run (a BaseExceptionGroup leaves the block)
        return await hook


@workflow
async def holds_the_token() -> Any:
    return await create_hook(token="shared")


@workflow
async def falls_back_when_busy() -> str:
    try:
        async with create_hook(token="shared") as hook:
            got = await hook
    except HookConflictError:
        got = "busy"  # the body took this path the first time...
    await create_hook(token="continue")  # ...then waited here
    return str(got)


HookDO = define_agent_do(
    workflows=[hook_around_own_task_group, holds_the_token, falls_back_when_busy]
)


async def test_a_hook_around_the_bodys_own_task_group_survives_a_suspension(
    tmp_path: Path,
) -> None:
    """A suspension that leaves an ``async with create_hook(...)`` block inside a group (the
    body's own task group) keeps the hook, as a bare one does: the token is still resumable
    after the sleep."""
    async with ActorHost(HookDO, **place(tmp_path), config=fast_config()) as h:
        agent = h.get("u:tg")
        run = await start(hook_around_own_task_group, actor=agent)

        async def waiting_on_the_hook() -> bool:
            woke = await agent.events(kinds=["trigger.workflow.wait_completed"])
            return bool(woke) and await run.status() is IntentStatus.PENDING

        await wait_until(agent, waiting_on_the_hook)
        await resume_hook("tg-hook", {"ok": True}, actor=agent)
        assert await result_of(run) == {"ok": True}


async def test_a_caught_hook_conflict_replays_as_a_conflict(tmp_path: Path) -> None:
    """A HookConflictError the body caught is recorded: once the other holder has ended, the
    replay raises the same conflict at the same place and takes the path it took."""
    async with ActorHost(HookDO, **place(tmp_path), config=fast_config()) as h:
        agent = h.get("u:k")
        holder = await start(holds_the_token, actor=agent)
        await wait_hook(agent, "shared")
        fallback = await start(falls_back_when_busy, actor=agent)
        await wait_hook(agent, "continue")
        await resume_hook("shared", "for the holder", actor=agent)
        assert await result_of(holder) == "for the holder"
        await resume_hook("continue", None, actor=agent)
        assert await result_of(fallback, 10) == "busy"


# -- streams --------------------------------------------------------------------------------------


@workflow
async def body_writes_around_a_replay() -> str:
    await get_writable().write("starting")
    await replay_point()  # the rest runs on a replay
    await get_writable().write("done")
    return "ok"


@step
async def narrate() -> int:
    writer = get_writable()
    await writer.write("once")
    await writer.write("upon")
    return 2


@workflow
async def step_writes_then_replays() -> list[int]:
    told = await narrate()
    await replay_point()  # the rest runs on a replay
    return [told, await add(1, 2)]


StreamDO = define_agent_do(workflows=[body_writes_around_a_replay, step_writes_then_replays])


async def test_body_stream_writes_are_not_repeated_by_replays(tmp_path: Path) -> None:
    """A chunk the body writes before its replay point is written once, not again by the
    replay."""
    async with ActorHost(StreamDO, **place(tmp_path), config=fast_config()) as h:
        run = await start(body_writes_around_a_replay, actor=h.get("u:s"))
        assert await replayed(run, h.get("u:s")) == "ok"
        with anyio.fail_after(20):
            chunks = [chunk async for chunk in run.get_readable()]
        assert chunks == ["starting", "done"]


async def test_a_step_writing_to_the_stream_takes_no_place_in_the_run(tmp_path: Path) -> None:
    """A step's writes are plain writes: the replay, which answers the step from the ledger
    without running it, matches every later call to its own fact."""
    async with ActorHost(StreamDO, **place(tmp_path), config=fast_config()) as h:
        run = await start(step_writes_then_replays, actor=h.get("u:w"))
        assert await replayed(run, h.get("u:w")) == [2, 3]
        with anyio.fail_after(20):
            assert [chunk async for chunk in run.get_readable()] == ["once", "upon"]


# -- step retries -------------------------------------------------------------------------------


@step(retry=RetryPolicy(max_attempts=3, initial_backoff=3600, jitter=False))
async def fails_then_backs_off() -> str:
    calls["backoff"] += 1
    gate("backoff:failed").set()
    if calls["backoff"] == 1:
        raise RuntimeError("transient")
    return "second time lucky"


@workflow
async def long_backoff() -> str:
    return await fails_then_backs_off()


@step(retry=RetryPolicy(max_attempts=2, initial_backoff=0, jitter=False))
async def fails_blocks_fails() -> str:
    calls["fbf"] += 1
    if calls["fbf"] == 2:
        gate("fbf:second").set()
        await anyio.sleep_forever()  # the host stops during this attempt
    raise RuntimeError(f"failure {calls['fbf']}")


@workflow
async def restart_mid_retries() -> str:
    try:
        return await fails_blocks_fails()
    except StepFailedError as exc:
        return f"gave up after {exc.attempts}"


RetryDO = define_agent_do(workflows=[long_backoff, restart_mid_retries])


def retry_host(tmp_path: Path, **options: Any) -> ActorHost:
    return ActorHost(RetryDO, **place(tmp_path), config=fast_config(), **options)


async def test_a_long_retry_backoff_holds_no_attempt(tmp_path: Path) -> None:
    """A step's backoff is a durable wait: during an hour's backoff the run is pending with no
    attempt running; after a restart and the backoff's end the step's next attempt runs."""
    clock_ms = [1_800_000_000_000]
    async with retry_host(tmp_path, clock=lambda: clock_ms[0]) as h:
        agent = h.get("u:b")
        run = await start(long_backoff, actor=agent)

        async def backing_off() -> bool:
            failed = await agent.events(kinds=[STEP_ATTEMPT_FAILED])
            return bool(failed) and await run.status() is IntentStatus.PENDING

        await wait_until(agent, backing_off)
        assert h.scheduler is not None
        assert list(h.scheduler.running_attempts()) == []
    clock_ms[0] += 3_600_001
    async with retry_host(tmp_path, clock=lambda: clock_ms[0]) as h:
        again = await get_run(run.run_id, actor=h.get("u:b"))
        assert await result_of(again) == "second time lucky"
    assert calls["backoff"] == 2


async def test_cancel_during_a_step_retry_backoff_is_prompt(tmp_path: Path) -> None:
    """A run whose step waits out an hour's retry backoff is cancelled at once, not after it."""
    async with retry_host(tmp_path) as h:
        run = await start(long_backoff, actor=h.get("u:c"))
        with anyio.fail_after(20):
            await gate("backoff:failed").wait()
        await run.cancel("stop waiting")
        with pytest.raises(RunCancelledError, match="stop waiting"):
            await result_of(run, 10)
        assert calls["backoff"] == 1


async def test_step_attempts_are_counted_across_a_host_restart(tmp_path: Path) -> None:
    """max_attempts=2: attempt 1 fails, attempt 2 is interrupted by a host shutdown (not a
    failure); after the restart the step gets one more attempt, not a fresh budget of two."""
    async with retry_host(tmp_path) as h:
        run = await start(restart_mid_retries, actor=h.get("u:r"))
        with anyio.fail_after(20):
            await gate("fbf:second").wait()
    async with retry_host(tmp_path) as h:
        again = await get_run(run.run_id, actor=h.get("u:r"))
        assert await result_of(again) == "gave up after 2"
    assert calls["fbf"] == 3, f"the step ran {calls['fbf']} times for a budget of 2 attempts"


# -- run cancellation -----------------------------------------------------------------------------


@step
async def fails_when_released() -> None:
    gate("doomed:started").set()
    await gate("doomed:release").wait()
    raise FatalError("it failed as well")


@step(retry=RetryPolicy(max_attempts=3, initial_backoff=0.05, jitter=False))
async def flaky_release() -> str:
    calls["flaky_release"] += 1
    if calls["flaky_release"] == 1:
        raise RuntimeError("busy, try again")
    return "released"


@workflow
async def step_races_sleep() -> Any:
    return await race(held("racer"), sleep("1h"))


@workflow
async def catches_a_step_failure_beside_a_sleep() -> str:
    try:
        await gather(fails_when_released(), sleep("1h"))
    except StepFailedError:
        await add(1, 1)  # the body would carry on, as if it was not cancelled
        return "caught the step's failure"
    return "unreachable"


@workflow
async def cleanup_step_in_finally() -> str:
    try:
        await add(1, 1)
        await sleep("1h")
        return "done"
    finally:
        await release_resource()


@workflow
async def cleanup_after_a_hook() -> str:
    try:
        await add(1, 1)
        await create_hook(token="never-resumed")
        return "done"
    finally:
        await release_resource()


@workflow
async def cleanup_after_a_step() -> str:
    try:
        await held("busy")
        await add(1, 1)
        return "done"
    finally:
        await release_resource()


@workflow
async def retrying_cleanup() -> str:
    try:
        await sleep("1h")
        return "done"
    finally:
        await flaky_release()


@workflow
async def notes_its_start() -> int:
    calls["body began"] += 1
    return await add(1, 1)


CancelDO = define_agent_do(
    workflows=[
        step_races_sleep, catches_a_step_failure_beside_a_sleep, cleanup_step_in_finally,
        cleanup_after_a_hook, cleanup_after_a_step, retrying_cleanup, notes_its_start,
    ]
)  # fmt: skip


def cancel_host(tmp_path: Path, **options: Any) -> ActorHost:
    return ActorHost(CancelDO, **place(tmp_path), config=fast_config(), **options)


async def test_run_cancel_does_not_stop_a_step_racing_a_sleep(tmp_path: Path) -> None:
    """Run cancellation does not stop steps in flight: with race(step, sleep('1h')), a cancel
    lets the running step finish (its result recorded); the race has no winner and the run
    ends cancelled."""
    async with cancel_host(tmp_path) as h:
        agent = h.get("u:c")
        run = await start(step_races_sleep, actor=agent)
        with anyio.fail_after(20):
            await gate("racer:started").wait()
        await run.cancel("user")
        await cancel_seen(agent, run)
        gate("racer:release").set()
        with pytest.raises(RunCancelledError):
            await result_of(run)
        assert seen == ["racer finished"], "the in-flight step was cancelled by the run cancel"
        assert [e.payload["result"] for e in await agent.events(kinds=[STEP_COMPLETED])] == [
            "racer"
        ]


async def test_gather_raises_the_cancel_before_a_step_failure(tmp_path: Path) -> None:
    """When a gathered step fails while the run is cancelled, gather raises the cancel, not
    the step's failure: a body catching StepFailedError does not carry on as if it ran."""
    async with cancel_host(tmp_path) as h:
        agent = h.get("u:g")
        run = await start(catches_a_step_failure_beside_a_sleep, actor=agent)
        with anyio.fail_after(20):
            await gate("doomed:started").wait()
        await run.cancel("user")
        await cancel_seen(agent, run)
        gate("doomed:release").set()
        with pytest.raises(RunCancelledError):
            await result_of(run)
        assert calls["add"] == 0


@pytest.mark.parametrize(
    "wf",
    [
        pytest.param(cleanup_step_in_finally, id="asleep"),
        pytest.param(cleanup_after_a_hook, id="waiting-on-a-hook"),
    ],
)
async def test_cancelling_a_waiting_run_runs_its_finally_cleanup_step(
    tmp_path: Path, wf: Any
) -> None:
    """A run cancelled while asleep or waiting on a hook is resumed at once: its replay raises
    RunCancelledError where it waits, so its finally block runs, cleanup step included, and
    the run ends cancelled."""
    async with cancel_host(tmp_path) as h:
        agent = h.get("u:f")
        run = await start(wf, actor=agent)

        async def waiting() -> bool:
            return calls["add"] == 1 and await run.status() is IntentStatus.PENDING

        await wait_until(agent, waiting)
        await run.cancel("user")
        with pytest.raises(RunCancelledError, match="user"):
            await result_of(run)
        assert calls["release"] == 1, "the finally block's cleanup step never ran"
        assert calls["add"] == 1


async def test_cancelling_a_running_run_runs_a_cleanup_step_in_finally(tmp_path: Path) -> None:
    """A running run stops at its next call after a cancel; a step called from its finally
    block then runs (cleanup), while the step after the cancelled one never starts."""
    async with cancel_host(tmp_path) as h:
        agent = h.get("u:r")
        run = await start(cleanup_after_a_step, actor=agent)
        with anyio.fail_after(20):
            await gate("busy:started").wait()
        await run.cancel("user")
        await cancel_seen(agent, run)
        gate("busy:release").set()
        with pytest.raises(RunCancelledError):
            await result_of(run)
        assert (calls["add"], calls["release"]) == (0, 1)


async def test_a_cleanup_step_retries_after_a_cancel(tmp_path: Path) -> None:
    """A cleanup step that fails in a cancelled run's finally block gets its retries (its
    backoff waited in the attempt, since the run will not wait again)."""
    async with cancel_host(tmp_path) as h:
        agent = h.get("u:y")
        run = await start(retrying_cleanup, actor=agent)

        async def asleep() -> bool:
            woke = await agent.events(kinds=["trigger.workflow.wait_created"])
            return bool(woke) and await run.status() is IntentStatus.PENDING

        await wait_until(agent, asleep)
        await run.cancel("user")
        with pytest.raises(RunCancelledError):
            await result_of(run)
        assert calls["flaky_release"] == 2
        completed = await agent.events(kinds=[STEP_COMPLETED])
        assert [e.payload["step"] for e in completed] == ["flaky_release"]


async def test_a_run_cancelled_before_it_started_never_runs_its_body(tmp_path: Path) -> None:
    """Cancelling a run no host has started yet answers requested; its first attempt ends it
    cancelled without running any of its body."""
    async with cancel_host(tmp_path, run_scheduler=False) as client:
        run = await start(notes_its_start, actor=client.get("u:n"))
        assert (await run.cancel("too soon")).status.value == "requested"
    async with cancel_host(tmp_path) as h:
        again = await get_run(run.run_id, actor=h.get("u:n"))
        with pytest.raises(RunCancelledError, match="too soon"):
            await result_of(again)
    assert calls["body began"] == 0


async def test_a_signal_aborted_without_a_cancel_runs_no_cleanup_step(tmp_path: Path) -> None:
    """An attempt's signal aborted with no cancel requested (the host stopping) stops the
    body at its next call and runs no cleanup step: nothing is recorded that a later replay,
    not cancelled, would not make."""
    async with cancel_host(tmp_path) as h:
        agent = h.get("u:x")
        run = await start(cleanup_after_a_step, actor=agent)
        with anyio.fail_after(20):
            await gate("busy:started").wait()
        assert h.scheduler is not None
        h.scheduler._running[("u:x", run.run_id)].controller.abort("shutdown")
        gate("busy:release").set()
        with pytest.raises(RunCancelledError, match="shutdown"):
            await result_of(run)
        assert (calls["add"], calls["release"]) == (0, 0)


# -- calls that belong to workflow bodies, made inside steps ------------------------------------


@step
async def naps_inside() -> str:
    calls["naps"] += 1
    try:
        await sleep(0.01)
    except RuntimeError as exc:
        seen.append(str(exc))
    return "napped"


@workflow
async def sleeps_in_a_step() -> str:
    return await naps_inside()


@step
async def makes_workflow_objects() -> int:
    calls["inner"] += 1
    for make in (AbortController, create_hook, gather, race):
        try:
            make()
        except RuntimeError as exc:
            seen.append(str(exc))
    return len(seen)


@workflow
async def workflow_objects_in_a_step() -> list[Any]:
    refused = await makes_workflow_objects()
    total = await add(1, 2)
    await replay_point()  # the rest runs on a replay
    return [refused, total]


InStepDO = define_agent_do(workflows=[sleeps_in_a_step, workflow_objects_in_a_step])


async def test_sleep_inside_a_step_is_refused_clearly(tmp_path: Path) -> None:
    """workflows.sleep() inside a step raises a RuntimeError saying to use anyio.sleep,
    instead of suspending the run mid-step."""
    async with ActorHost(InStepDO, **place(tmp_path), config=fast_config()) as h:
        run = await start(sleeps_in_a_step, actor=h.get("u:s"))
        assert await result_of(run) == "napped"
        assert calls["naps"] == 1
        assert len(seen) == 1
        assert "not steps" in seen[0]
        assert "anyio.sleep" in seen[0]


async def test_workflow_objects_inside_a_step_are_refused_without_taking_a_place(
    tmp_path: Path,
) -> None:
    """workflows.AbortController(), create_hook(), gather() and race() inside a step raise a
    RuntimeError naming the alternative, and take no place in the run: the replay matches
    the later step to its own fact."""
    async with ActorHost(InStepDO, **place(tmp_path), config=fast_config()) as h:
        run = await start(workflow_objects_in_a_step, actor=h.get("u:a"))
        assert await replayed(run, h.get("u:a")) == [4, 3]
        assert (calls["inner"], calls["add"]) == (1, 1)
        assert "triggers.AbortController" in seen[0]
        assert "token" in seen[1]
        assert all("not steps" in message for message in seen)


# -- gather and race nested ---------------------------------------------------------------------


@workflow
async def race_of_a_gather() -> Any:
    return await race(gather(add(1, 1), add(2, 2)), sleep("1h"))


@workflow
async def all_or_time_out() -> Any:
    winner = await race(gather(held("a"), held("b")), sleep(0.05))
    await replay_point()  # the rest runs on a replay
    return winner


@workflow
async def gather_of_a_race() -> list[Any]:
    results = await gather(race(add(1, 1), sleep("1h")), add(2, 2))
    await replay_point()  # the rest runs on a replay
    return results


@workflow
async def race_of_nothing() -> str:
    try:
        await race()
    except ValueError as exc:
        return str(exc)
    return "unreachable"


@workflow
async def sleeps_forever_and_a_day() -> str:
    try:
        await sleep("10000000d")
    except ValueError as exc:
        return str(exc)
    return "unreachable"


NestedDO = define_agent_do(
    workflows=[
        race_of_a_gather, all_or_time_out, gather_of_a_race, race_of_nothing,
        sleeps_forever_and_a_day,
    ]
)  # fmt: skip


def nested_host(tmp_path: Path) -> ActorHost:
    return ActorHost(NestedDO, **place(tmp_path), config=fast_config())


async def test_race_of_a_gather_and_a_sleep(tmp_path: Path) -> None:
    """race(gather(a, b), sleep('1h')), "all of these, or time out": the gather wins with its
    results once both steps are done, without waiting for the sleep."""
    async with nested_host(tmp_path) as h:
        run = await start(race_of_a_gather, actor=h.get("u:n"))
        assert await result_of(run) == [2, 4]


async def test_race_of_a_gather_times_out(tmp_path: Path) -> None:
    """When the sleep ends first, the gathered steps are stopped and the replay returns the
    same winner without running them again."""
    async with nested_host(tmp_path) as h:
        agent = h.get("u:t")
        run = await start(all_or_time_out, actor=agent)
        assert await replayed(run, agent) is None
        assert (calls["held:a"], calls["held:b"]) == (1, 1)
        assert await agent.events(kinds=[STEP_COMPLETED]) == []


async def test_gather_of_a_race_replays_deterministically(tmp_path: Path) -> None:
    """gather(race(step, sleep), step): results in order, and the replay answers every call
    from its fact, running no step again."""
    async with nested_host(tmp_path) as h:
        run = await start(gather_of_a_race, actor=h.get("u:g"))
        assert await replayed(run, h.get("u:g")) == [2, 4]
        assert calls["add"] == 2


async def test_a_race_of_nothing_is_refused(tmp_path: Path) -> None:
    """race() with no calls raises ValueError at once (it could never end)."""
    async with nested_host(tmp_path) as h:
        run = await start(race_of_nothing, actor=h.get("u:0"))
        assert await result_of(run) == "race() needs at least one call"


async def test_an_absurdly_long_sleep_is_refused_at_the_call(tmp_path: Path) -> None:
    """A sleep longer than a century raises ValueError at the call, in the body."""
    async with nested_host(tmp_path) as h:
        run = await start(sleeps_forever_and_a_day, actor=h.get("u:l"))
        assert "at most a century" in await result_of(run)


async def test_start_refuses_a_string_as_args(tmp_path: Path) -> None:
    """start(wf, "abc") raises TypeError (args are a list) and writes nothing."""
    async with nested_host(tmp_path) as h:
        agent = h.get("u:a")
        with pytest.raises(TypeError, match="list"):
            await start(race_of_nothing, "abc", actor=agent)
        assert await agent.intents() == []
