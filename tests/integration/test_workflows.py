"""Durable workflows on a real host: recorded steps and replay, retries, durable sleep across
a restart, run cancellation (asleep, mid-step), reconnecting from another host."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from pydantic import BaseModel, ValidationError

from actors import ActorHost, define_agent_do
from ledger import IntentStatus
from tests.helpers import ManualClock, fast_config, place, wait_until
from tests.workflow_helpers import (
    add,
    calls,
    gate,
    held,
    replay_point,
    replayed,
    reset_state,
    result_of,
    wait_hook,
    watchdog,
    work_until_aborted,
)
from triggers import AbortController, AbortError, AbortSignal, CancelStatus, FatalError, RetryPolicy
from triggers._workflow import RUN_CANCELLED, STEP_COMPLETED, WAIT_CREATED, parse_duration
from triggers.workflows import AbortController as WorkflowAbortController
from triggers.workflows import (
    HookNotFoundError,
    RunCancelledError,
    RunFailedError,
    StepFailedError,
    Workflow,
    WorkflowError,
    create_hook,
    define_hook,
    gather,
    get_hook_by_token,
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

flaky_failures: dict[str, int] = {}


@pytest.fixture(autouse=True)
def _fresh_state() -> None:
    reset_state()
    flaky_failures.clear()


@step(retry=RetryPolicy(max_attempts=3, initial_backoff=0, jitter=False))
async def flaky(key: str) -> str:
    calls[f"flaky:{key}"] += 1
    if flaky_failures.get(key, 0) > 0:
        flaky_failures[key] -= 1
        raise RuntimeError(f"transient {key}")
    return f"ok {key}"


@step
async def refuse() -> None:
    calls["refuse"] += 1
    raise FatalError("no, never")


@step
async def aborts() -> None:
    calls["aborts"] += 1
    raise AbortError("gave up")


@workflow
async def sum_then_sleep(a: int, b: int, nap: float) -> int:
    first = await add(a, b)
    await sleep(nap)
    return await add(first, 1)


@workflow
async def retrying() -> list[str]:
    return [await flaky("x"), await flaky("y")]


@workflow
async def catches_failures() -> str:
    try:
        await refuse()
    except StepFailedError as exc:
        return f"caught {exc.error_type}: {exc.message} after {exc.attempts}"
    return "unreachable"


@workflow
async def lets_it_fail() -> None:
    await aborts()


@workflow
async def long_sleep() -> str:
    await add(1, 1)
    await sleep("1h")
    return "woke"


cleanups: list[str] = []


@workflow
async def two_held_steps() -> str:
    try:
        await held("one")
        await held("two")
        return "both"
    finally:
        cleanups.append("finally ran")


ALL: list[Workflow[Any, Any]] = [
    sum_then_sleep,
    retrying,
    catches_failures,
    lets_it_fail,
    long_sleep,
    two_held_steps,
]
AgentDO = define_agent_do(workflows=ALL)


def host(tmp_path: Path, **options: Any) -> ActorHost:
    options.setdefault("config", fast_config())
    return ActorHost(AgentDO, **place(tmp_path), **options)


async def test_steps_are_recorded_and_not_rerun_after_a_sleep(tmp_path: Path) -> None:
    """A run's steps are ledger facts; after its sleep the body is replayed and the completed
    step is answered from the ledger, not run again. (The clock stands still until the run
    is asleep, so the sleep surely suspends it, however long recording it takes.)"""
    clock = ManualClock()
    async with host(tmp_path, clock=clock) as h:
        agent = h.get("u:1")
        run = await start(sum_then_sleep, [2, 3, 0.05], actor=agent)

        async def asleep() -> bool:
            slept = await agent.events(kinds=[WAIT_CREATED])
            return bool(slept) and await run.status() is IntentStatus.PENDING

        await wait_until(agent, asleep)
        clock.advance(1000)
        assert await result_of(run) == 6
        assert calls["add"] == 2
        assert await run.status() is IntentStatus.COMPLETED
        facts = await h.get("u:1").events(kinds=[STEP_COMPLETED])
        assert [(f.payload["seq"], f.payload["result"]) for f in facts] == [(1, 5), (3, 6)]


async def test_steps_retry_with_backoff(tmp_path: Path) -> None:
    """A step that fails twice then succeeds is retried within its policy."""
    flaky_failures.update(x=2, y=0)
    async with host(tmp_path) as h:
        run = await start(retrying, actor=h.get("u:1"))
        assert await result_of(run) == ["ok x", "ok y"]
        assert (calls["flaky:x"], calls["flaky:y"]) == (3, 1)


async def test_fatal_step_is_not_retried_and_can_be_caught(tmp_path: Path) -> None:
    """FatalError ends a step at once: StepFailedError reaches the body, which may catch it."""
    async with host(tmp_path) as h:
        run = await start(catches_failures, actor=h.get("u:1"))
        assert await result_of(run) == "caught FatalError: no, never after 1"
        assert calls["refuse"] == 1


async def test_abort_error_in_a_step_is_fatal_and_fails_the_run(tmp_path: Path) -> None:
    """An abort error in a step is not retried; uncaught, the run fails."""
    async with host(tmp_path) as h:
        run = await start(lets_it_fail, actor=h.get("u:1"))
        with pytest.raises(RunFailedError, match="StepFailedError"):
            await result_of(run)
        assert calls["aborts"] == 1
        assert await run.status() is IntentStatus.FAILED


async def test_sleep_survives_a_restart_and_holds_nothing(tmp_path: Path) -> None:
    """A sleeping run is a due time: no attempt runs meanwhile; after a restart and the end of
    the sleep it resumes, and the step before the sleep is not run again."""
    clock_ms = [1_800_000_000_000]
    async with host(tmp_path, clock=lambda: clock_ms[0]) as h:
        run = await start(long_sleep, actor=h.get("u:1"))

        async def settled() -> bool:
            return not ((await h.get("u:1").intent(run.run_id)).attempts != 0 or calls["add"] != 1)

        await wait_until(h.get("u:1"), settled)
        assert await run.status() is IntentStatus.PENDING
        assert h.scheduler is not None
        assert list(h.scheduler.running_attempts()) == []
    clock_ms[0] += 3_600_001
    async with host(tmp_path, clock=lambda: clock_ms[0]) as h:
        again = await get_run(run.run_id, actor=h.get("u:1"))
        assert await result_of(again) == "woke"
    assert calls["add"] == 1


async def test_cancel_while_asleep_resumes_the_run_to_end_it(tmp_path: Path) -> None:
    """Cancelling a sleeping run answers requested and resumes it at once (not at the sleep's
    end): it records run_cancelled; result() raises RunCancelledError with the reason; a
    second cancel says it had ended."""
    async with host(tmp_path) as h:
        run = await start(long_sleep, actor=h.get("u:1"))

        async def settled() -> bool:
            return not (calls["add"] != 1 or await run.status() is not IntentStatus.PENDING)

        await wait_until(h.get("u:1"), settled)
        result = await run.cancel("not needed any more")
        assert result.status is CancelStatus.REQUESTED
        with pytest.raises(RunCancelledError) as caught:
            await result_of(run)
        assert caught.value.reason == "not needed any more"
        facts = await h.get("u:1").events(kinds=[RUN_CANCELLED])
        assert [f.payload for f in facts] == [{"reason": "not needed any more"}]
        again = await run.cancel("twice")
        assert again.status is CancelStatus.ALREADY_COMPLETED
        assert again.terminal_status is IntentStatus.CANCELLED


async def test_cancel_mid_step_lets_the_step_finish_then_stops(tmp_path: Path) -> None:
    """A cancel while a step runs does not abort that step; the run stops at its next step
    call, its finally block runs, and the next step never starts."""
    cleanups.clear()
    async with host(tmp_path) as h:
        run = await start(two_held_steps, actor=h.get("u:1"))
        with anyio.fail_after(20):
            await gate("one:started").wait()
        assert (await run.cancel("stop")).status is CancelStatus.REQUESTED
        gate("one:release").set()
        with pytest.raises(RunCancelledError, match="stop"):
            await result_of(run)
        assert calls["held:one"] == 1
        assert calls["held:two"] == 0
        assert cleanups == ["finally ran"]
        completed = await h.get("u:1").events(kinds=[STEP_COMPLETED])
        assert [f.payload["result"] for f in completed] == ["one"]


async def test_get_run_from_a_client_process_view(tmp_path: Path) -> None:
    """A client host (no scheduler) reconnects by run id and waits for the result."""
    async with host(tmp_path) as h, host(tmp_path, run_scheduler=False) as client:
        run = await start(sum_then_sleep, [1, 1, 0], actor=h.get("u:2"))
        remote = await get_run(run.run_id, actor=client.get("u:2"))
        assert await result_of(remote) == 3


async def test_completed_run_cancel_says_so(tmp_path: Path) -> None:
    """Cancelling a completed run answers already_completed with terminal_status completed."""
    async with host(tmp_path) as h:
        run = await start(sum_then_sleep, [1, 1, 0], actor=h.get("u:3"))
        await result_of(run)
        result = await run.cancel()
        assert (result.status, result.terminal_status) == (
            CancelStatus.ALREADY_COMPLETED, IntentStatus.COMPLETED,
        )  # fmt: skip


async def test_unregistered_workflow_is_refused(tmp_path: Path) -> None:
    """start() refuses a workflow its actor class does not register, writing nothing; get_run
    refuses an intent that is not a run."""

    @workflow
    async def stray() -> None:
        return None

    async with host(tmp_path) as h:
        with pytest.raises(WorkflowError, match="not registered"):
            await start(stray, actor=h.get("u:4"))
        assert await h.get("u:4").intents() == []
    plain = ActorHost(define_agent_do(), data_dir=tmp_path / "other", config=fast_config())
    async with plain as p:
        with pytest.raises(WorkflowError, match="not registered"):
            await start(sum_then_sleep, [1, 2, 0], actor=p.get("x"))


async def test_sleep_outside_a_workflow_and_durations() -> None:
    """sleep() outside a workflow raises; durations read seconds, timedeltas and strings."""
    with pytest.raises(RuntimeError, match="workflow"):
        await sleep(1)
    assert parse_duration("30s") == 30_000
    assert parse_duration("5min") == 300_000
    assert parse_duration("250ms") == 250
    assert parse_duration(1.5) == 1_500
    for bad in ("soon", "-1s", -1, float("nan")):
        with pytest.raises(ValueError):  # noqa: PT011
            parse_duration(bad)
    with pytest.raises(ValueError, match=">= 0"):
        parse_duration("-1s")  # negative, not unreadable


# -- hooks ------------------------------------------------------------------------------------


class Approval(BaseModel):
    approved: bool
    by: str


approval = define_hook(Approval)


@workflow
async def waits_for_approval(request: str) -> str:
    await add(1, 1)
    async with approval.create(token=f"approve:{request}") as hook:
        decision = await hook
    return f"{request}: {'yes' if decision.approved else 'no'} by {decision.by}"


@workflow
async def raw_hook() -> Any:
    return await create_hook(token="raw")


ALL.extend([waits_for_approval, raw_hook])
HookDO = define_agent_do(workflows=ALL)


def hook_host(tmp_path: Path, **options: Any) -> ActorHost:
    options.setdefault("config", fast_config())
    return ActorHost(HookDO, **place(tmp_path), **options)


async def test_hook_wait_holds_nothing_and_resume_wakes_the_run(tmp_path: Path) -> None:
    """A run waiting on a hook is pending with no attempt; a typed resume (validated) wakes it,
    the payload reaches the body, and the hook is disposed (its token free again)."""
    async with hook_host(tmp_path) as h:
        agent = h.get("u:h")
        run = await start(waits_for_approval, ["r1"], actor=agent)
        assert await wait_hook(agent, "approve:r1") == run.run_id

        async def settled() -> bool:
            return not (await run.status() is not IntentStatus.PENDING)

        await wait_until(agent, settled)
        assert h.scheduler is not None
        assert list(h.scheduler.running_attempts()) == []
        with pytest.raises(ValidationError):
            await approval.resume("approve:r1", {"approved": "maybe"}, actor=agent)
        assert (
            await approval.resume("approve:r1", Approval(approved=True, by="ann"), actor=agent)
            == run.run_id
        )
        assert await result_of(run) == "r1: yes by ann"
        assert calls["add"] == 1
        with pytest.raises(HookNotFoundError):
            await get_hook_by_token("approve:r1", actor=agent)


async def test_resume_unknown_token_and_conflicting_tokens(tmp_path: Path) -> None:
    """Resuming a token no active hook holds raises HookNotFoundError and writes nothing; a
    second run creating a held token fails with a conflict."""
    async with hook_host(tmp_path) as h:
        agent = h.get("u:c")
        with pytest.raises(HookNotFoundError):
            await resume_hook("nobody", {"x": 1}, actor=agent)
        first = await start(raw_hook, actor=agent)
        await wait_hook(agent, "raw")
        second = await start(raw_hook, actor=agent)
        with pytest.raises(RunFailedError, match="HookConflictError"):
            await result_of(second)
        await resume_hook("raw", {"x": 2}, actor=agent)
        assert await result_of(first) == {"x": 2}


async def test_resume_landing_while_the_attempt_suspends_is_not_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resume that lands after the attempt looked for it but before its suspension commits
    still wakes the run (the commit sees it and reschedules the run for now)."""
    from triggers import _workflow

    original = _workflow._Run.wait_hook
    agents: list[Any] = []

    async def resume_in_the_gap(self: Any, seq: int, *args: Any) -> Any:
        try:
            return await original(self, seq, *args)
        except _workflow._Suspend:
            if not agents[1:]:
                agents.append("resumed")
                token, _ = self.hooks_created[seq]
                await resume_hook(token, "in the gap", actor=agents[0])
            raise

    monkeypatch.setattr(_workflow._Run, "wait_hook", resume_in_the_gap)
    async with hook_host(tmp_path) as h:
        agent = h.get("u:gap")
        agents.append(agent)
        run = await start(raw_hook, actor=agent)
        assert await result_of(run) == "in the gap"
        assert agents[1:] == ["resumed"]


async def test_cancel_a_run_waiting_on_a_hook(tmp_path: Path) -> None:
    """Cancelling a run that waits on a hook resumes it at once to end it cancelled; its
    token is then free."""
    async with hook_host(tmp_path) as h:
        agent = h.get("u:x")
        run = await start(raw_hook, actor=agent)
        await wait_hook(agent, "raw")

        async def settled() -> bool:
            return not (await run.status() is not IntentStatus.PENDING)

        await wait_until(agent, settled)
        assert (await run.cancel("user cancelled")).status is CancelStatus.REQUESTED
        with pytest.raises(RunCancelledError):
            await result_of(run)
        with pytest.raises(HookNotFoundError):
            await resume_hook("raw", 1, actor=agent)


# -- streams ----------------------------------------------------------------------------------


@step
async def narrate(words: list[str]) -> int:
    writer = get_writable()
    for word in words:
        await writer.write({"word": word})
    return len(words)


@workflow
async def storyteller(words: list[str]) -> int:
    told = await narrate(words)
    await get_writable().write({"done": told})
    return told


StreamDO = define_agent_do(workflows=[storyteller])


async def test_run_stream_replays_and_ends_with_the_run(tmp_path: Path) -> None:
    """Chunks written with get_writable() in steps and in the body are read with
    run.get_readable() from the start, and the reader ends when the run does."""
    async with ActorHost(StreamDO, **place(tmp_path), config=fast_config()) as h:
        run = await start(storyteller, [["once", "upon"]], actor=h.get("u:s"))
        assert await result_of(run) == 2
        with anyio.fail_after(20):
            chunks = [chunk async for chunk in run.get_readable()]
        assert chunks == [{"word": "once"}, {"word": "upon"}, {"done": 2}]
        with anyio.fail_after(20):
            assert [c async for c in run.get_readable(start=2)] == [{"done": 2}]
    with pytest.raises(RuntimeError, match="workflow"):
        get_writable()


# -- gather and race ----------------------------------------------------------------------------


@workflow
async def fan_out() -> list[int]:
    sums = await gather(add(1, 1), add(2, 2), add(3, 3))
    await replay_point()  # the rest runs on a replay
    return [*sums, await add(sums[-1], 1)]


@workflow
async def timeout_pattern() -> Any:
    winner = await race(held("slow"), sleep(0.05))
    await replay_point()  # the rest runs on a replay
    return winner


@workflow
async def first_responder() -> Any:
    return await race(add(20, 22), sleep("1h"))


RaceDO = define_agent_do(workflows=[fan_out, timeout_pattern, first_responder])


async def test_gather_runs_each_step_once_and_replays_in_order(tmp_path: Path) -> None:
    """gather() returns results in argument order; the replay matches each gathered call to
    its own recorded result, running none again."""
    async with ActorHost(RaceDO, **place(tmp_path), config=fast_config()) as h:
        run = await start(fan_out, actor=h.get("u:g"))
        assert await replayed(run, h.get("u:g")) == [2, 4, 6, 7]
        assert calls["add"] == 4


async def test_race_timeout_pattern_records_the_winner(tmp_path: Path) -> None:
    """race(step, sleep) where the sleep ends first: it wins, the step is stopped, and the
    replay returns the same winner without running the step again."""
    async with ActorHost(RaceDO, **place(tmp_path), config=fast_config()) as h:
        run = await start(timeout_pattern, actor=h.get("u:r"))
        assert await replayed(run, h.get("u:r")) is None
        assert calls["held:slow"] == 1
        won = await h.get("u:r").events(kinds=["trigger.workflow.race_won"])
        assert [e.payload for e in won] == [{"seq": 3, "index": 1}]  # after its two calls
        assert await h.get("u:r").events(kinds=[STEP_COMPLETED]) == []


async def test_race_winner_disposes_a_long_sleep(tmp_path: Path) -> None:
    """A step that beats a one-hour sleep ends the race at once: the run completes without
    waiting for the sleep."""
    async with ActorHost(RaceDO, **place(tmp_path), config=fast_config()) as h:
        run = await start(first_responder, actor=h.get("u:f"))
        assert await result_of(run) == 42


# -- the durable abort controller -------------------------------------------------------------


@workflow
async def watched() -> list[Any]:
    controller = WorkflowAbortController()
    try:
        await gather(work_until_aborted(controller.signal), watchdog(controller))
    except StepFailedError as exc:
        outcome = f"{exc.step} stopped: {exc.message}"
    await replay_point()  # the rest runs on a replay
    return [outcome, controller.signal.aborted, controller.signal.reason]


@workflow
async def abort_in_order() -> list[bool]:
    controller = WorkflowAbortController()
    before = controller.signal.aborted
    await add(1, 1)
    await controller.abort("enough")
    after = controller.signal.aborted
    await replay_point()  # the rest runs on a replay
    return [before, after, controller.signal.aborted]


ControllerDO = define_agent_do(workflows=[watched, abort_in_order])


async def test_step_initiated_abort_stops_the_other_step(tmp_path: Path) -> None:
    """A watchdog step aborts the workflow's controller: the step working with its signal
    stops at once (fatal, not retried), the abort is one recorded fact, and the replay after
    a sleep sees the same outcome."""
    async with ActorHost(ControllerDO, **place(tmp_path), config=fast_config()) as h:
        run = await start(watched, actor=h.get("u:w"))
        assert await replayed(run, h.get("u:w")) == [
            "work_until_aborted stopped: aborted: quota exceeded", True, "quota exceeded",
        ]  # fmt: skip
        assert calls["work"] == 1
        aborted = await h.get("u:w").events(kinds=["trigger.workflow.controller_aborted"])
        assert len(aborted) == 1


async def test_replay_applies_the_abort_where_it_happened(tmp_path: Path) -> None:
    """On replay the controller is not aborted before the point where the body aborted it."""
    async with ActorHost(ControllerDO, **place(tmp_path), config=fast_config()) as h:
        run = await start(abort_in_order, actor=h.get("u:o"))
        assert await replayed(run, h.get("u:o")) == [False, True, True]


async def test_start_with_a_signal(tmp_path: Path) -> None:
    """A signal given to start() cancels the run when it aborts; an already aborted one
    raises AbortError and writes nothing."""
    async with host(tmp_path) as h:
        agent = h.get("u:sig")
        with pytest.raises(AbortError):
            await start(long_sleep, actor=agent, signal=AbortSignal.abort("too late"))
        assert await agent.intents() == []
        controller = AbortController()
        run = await start(long_sleep, actor=agent, signal=controller.signal)

        async def settled() -> bool:
            return not (calls["add"] != 1 or await run.status() is not IntentStatus.PENDING)

        await wait_until(agent, settled)
        controller.abort("user left")
        with pytest.raises(RunCancelledError, match="user left"):
            await result_of(run)


@workflow
async def stoppable_by_user() -> Any:
    controller = WorkflowAbortController()
    stop = create_hook(token="stop:job")
    winner = await race(work_until_aborted(controller.signal), stop)
    await controller.abort("the user pressed stop")
    await replay_point()  # the rest runs on a replay
    return winner


StopDO = define_agent_do(workflows=[stoppable_by_user])


async def test_a_hook_resumed_while_a_step_runs_wins_the_race(tmp_path: Path) -> None:
    """race(step, hook): a resume from outside while the step runs wins at once (the attempt
    was woken by the resume, not by the step ending); the step is stopped, and the replay
    returns the same winner."""
    async with ActorHost(StopDO, **place(tmp_path), config=fast_config(poll_interval=30)) as h:
        agent = h.get("u:stop")
        run = await start(stoppable_by_user, actor=agent)
        with anyio.fail_after(20):
            await gate("work:started").wait()
        await wait_hook(agent, "stop:job")
        await resume_hook("stop:job", {"by": "ann"}, actor=agent)
        assert await replayed(run, agent) == {"by": "ann"}
        assert calls["work"] == 1
        assert await agent.events(kinds=[STEP_COMPLETED]) == []


# -- regressions found in review ------------------------------------------------------------------


@step
async def outer() -> int:
    return await add(10, 20) + 1  # a step called inside a step is a plain call


@workflow
async def nested_steps() -> list[int]:
    first = await outer()
    await replay_point()  # the rest runs on a replay
    return [first, await add(1, 2)]


@workflow
async def mixed_sleeps() -> list[Any]:
    return await gather(sleep(0.05), sleep(3600), add(5, 5))


@workflow
async def plain_coroutine_in_gather() -> Any:
    async def helper() -> int:
        return await add(1, 1)

    return await gather(helper(), add(2, 2))


@workflow
async def abort_seen_right_after() -> list[bool]:
    controller = WorkflowAbortController()
    with contextlib.suppress(StepFailedError):
        await gather(work_until_aborted(controller.signal), watchdog(controller))
    seen = controller.signal.aborted  # read before any other call
    await replay_point()  # the rest runs on a replay
    return [seen]


RegressionDO = define_agent_do(
    workflows=[nested_steps, mixed_sleeps, plain_coroutine_in_gather, abort_seen_right_after]
)


async def test_a_step_inside_a_step_does_not_shift_the_replay(tmp_path: Path) -> None:
    """A step called from inside another step runs as a plain call: the replay matches every
    later call to its own fact."""
    async with ActorHost(RegressionDO, **place(tmp_path), config=fast_config()) as h:
        run = await start(nested_steps, actor=h.get("u:n"))
        assert await replayed(run, h.get("u:n")) == [31, 3]


async def test_a_long_sleep_in_a_group_does_not_hold_the_attempt(tmp_path: Path) -> None:
    """gather(short sleep, one-hour sleep, step): once the short sleep and the step are done,
    the run waits for the long sleep without an attempt (it is pending, not running)."""
    async with ActorHost(RegressionDO, **place(tmp_path), config=fast_config()) as h:
        run = await start(mixed_sleeps, actor=h.get("u:m"))
        agent = h.get("u:m")

        async def asleep_after_the_short_sleep() -> bool:
            state = await agent.intent(run.run_id)
            woke = await agent.events(kinds=["trigger.workflow.wait_completed"])
            return state.status is IntentStatus.PENDING and bool(woke)

        await wait_until(agent, asleep_after_the_short_sleep)
        assert calls["add"] == 1
        assert (await run.cancel("enough")).status is CancelStatus.REQUESTED
        with pytest.raises(RunCancelledError, match="enough"):
            await result_of(run)


async def test_plain_coroutines_are_refused_by_gather(tmp_path: Path) -> None:
    """gather() refuses a plain coroutine (its calls could not replay in order): the run fails
    with a TypeError saying what to do."""
    async with ActorHost(RegressionDO, **place(tmp_path), config=fast_config()) as h:
        run = await start(plain_coroutine_in_gather, actor=h.get("u:p"))
        with pytest.raises(RunFailedError, match="TypeError"):
            await result_of(run)


async def test_a_step_abort_is_replayed_right_after_that_step(tmp_path: Path) -> None:
    """An abort made inside a step is seen, on replay, as soon as that step's result is
    replayed, as it was the first time."""
    async with ActorHost(RegressionDO, **place(tmp_path), config=fast_config()) as h:
        run = await start(abort_seen_right_after, actor=h.get("u:a"))
        assert await replayed(run, h.get("u:a")) == [True]


@workflow
async def race_with_losing_hook() -> Any:
    winner = await race(add(1, 1), create_hook(token="loser"))
    await sleep(3600)
    return winner


async def nap_in_a_task() -> None:
    await sleep(0.05)


@workflow
async def own_task_group() -> str:
    async with anyio.create_task_group() as tg:
        tg.start_soon(nap_in_a_task)
    return "woke"


MoreDO = define_agent_do(workflows=[race_with_losing_hook, own_task_group])


async def test_a_hook_that_loses_a_race_releases_its_token(tmp_path: Path) -> None:
    """When a step beats a hook in a race, the hook is disposed: its token is free while the
    run goes on."""
    async with ActorHost(MoreDO, **place(tmp_path), config=fast_config()) as h:
        agent = h.get("u:l")
        run = await start(race_with_losing_hook, actor=agent)

        async def settled() -> bool:
            return bool(await agent.events(kinds=["trigger.workflow.wait_created"]))

        await wait_until(agent, settled)
        assert await run.status() in (IntentStatus.PENDING, IntentStatus.RUNNING)
        with pytest.raises(HookNotFoundError):
            await get_hook_by_token("loser", actor=agent)
        await run.cancel()


async def test_a_sleep_inside_the_bodys_own_task_group(tmp_path: Path) -> None:
    """A sleep in a task group the body opens itself suspends the run like any other."""
    async with ActorHost(MoreDO, **place(tmp_path), config=fast_config()) as h:
        run = await start(own_task_group, actor=h.get("u:t"))
        assert await result_of(run) == "woke"


flip: list[str] = []


@workflow
async def nondeterministic() -> Any:
    first = await (add(1, 1) if not flip else narrate(["x"]))  # decided outside any step
    flip.append("replaying")
    async with create_hook(token="diverge") as hook:
        await hook  # the run suspends here until resumed, so it surely replays
    return first


DivergeDO = define_agent_do(workflows=[nondeterministic])


async def test_a_replay_that_diverges_fails_the_run_clearly(tmp_path: Path) -> None:
    """A body that calls a different step on replay fails with ReplayDivergenceError naming
    both steps, instead of returning another step's result."""
    flip.clear()
    async with ActorHost(DivergeDO, **place(tmp_path), config=fast_config()) as h:
        agent = h.get("u:d")
        run = await start(nondeterministic, actor=agent)
        await wait_hook(agent, "diverge")

        async def suspended() -> bool:
            return await run.status() is IntentStatus.PENDING  # its attempt has ended

        await wait_until(agent, suspended)
        await resume_hook("diverge", "go", actor=agent)
        with pytest.raises(RunFailedError, match="ReplayDivergenceError") as caught:
            await result_of(run)
        assert "'add'" in str(caught.value)
        assert "'narrate'" in str(caught.value)


@workflow
async def reuses_a_token() -> list[Any]:
    got = []
    for _ in range(2):
        async with create_hook(token="again") as hook:
            got.append(await hook)
    return got


ReuseDO = define_agent_do(workflows=[reuses_a_token])


async def test_a_token_used_again_after_disposal_gets_its_own_payload(tmp_path: Path) -> None:
    """A run that disposes a hook and creates another with the same token waits for a new
    resume: each hook gets its own payload."""
    async with ActorHost(ReuseDO, **place(tmp_path), config=fast_config()) as h:
        agent = h.get("u:again")
        run = await start(reuses_a_token, actor=agent)
        await wait_hook(agent, "again")
        await resume_hook("again", "first", actor=agent)

        async def settled() -> bool:
            return not (len(await agent.events(kinds=["trigger.workflow.hook_created"])) < 2)

        await wait_until(agent, settled)
        await resume_hook("again", "second", actor=agent)
        assert await result_of(run) == ["first", "second"]


plain_cleanups: list[str] = []


@workflow
async def cleans_up_at_the_end() -> str:
    try:
        await add(1, 1)
        await sleep(0.05)
        return "done"
    finally:
        plain_cleanups.append("finally")
        await add(100, 0)  # a cleanup step: must run once, at the real end


CleanupDO = define_agent_do(workflows=[cleans_up_at_the_end])


async def test_a_cleanup_step_in_finally_runs_only_at_the_end(tmp_path: Path) -> None:
    """A step called from a finally block while the run unwinds to sleep does not run; it runs
    once, when the body really ends (plain code in finally runs at each suspension)."""
    plain_cleanups.clear()
    async with ActorHost(CleanupDO, **place(tmp_path), config=fast_config()) as h:
        agent = h.get("u:c")
        run = await start(cleans_up_at_the_end, actor=agent)
        assert await result_of(run) == "done"
        assert calls["add"] == 2
        kinds = [e.kind for e in await agent.events(intent_event_id=run.run_id)]
        woke = kinds.index("trigger.workflow.wait_completed")
        last_step = len(kinds) - 1 - kinds[::-1].index(STEP_COMPLETED)
        assert last_step > woke, "the cleanup step was recorded before the sleep ended"
        assert plain_cleanups == ["finally", "finally"]
