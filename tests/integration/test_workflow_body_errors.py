"""Durable workflows: what a body raises decides how the run ends. Its own errors fail the
run at once (an abort of its own making and storage errors no retry helps included); only the
run's own cancel ends it cancelled, and only storage trouble runs the body again."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

from actors import ActorHost, define_agent_do
from ledger import IntentStatus, LedgerStore
from tests.helpers import fast_config, place
from tests.workflow_helpers import calls, reset_state, result_of
from triggers import AbortError, AbortSignal, _workflow
from triggers._engine import cancel_op
from triggers._workflow import RUN_CANCELLED, RUN_FAILED, STEP_ATTEMPT_FAILED, WORKFLOW_KIND
from triggers.workflows import (
    RunFailedError,
    StepFailedError,
    get_hook_by_token,
    get_run,
    get_writable,
    resume_hook,
    sleep,
    start,
    step,
    workflow,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

pytestmark = [pytest.mark.anyio, pytest.mark.contract]


@pytest.fixture(autouse=True)
def _fresh_state() -> None:
    reset_state()


@step
async def waits_forever() -> None:
    calls["waits"] += 1
    await AbortSignal().wait()  # never fires: only the body's own timeout ends it


@workflow
async def raises_its_own_abort() -> None:
    calls["body"] += 1
    raise AbortError("mine")


@workflow
async def times_itself_out() -> None:
    calls["body"] += 1
    with AbortSignal.timeout(0.01).scope():
        await waits_forever()


@workflow
async def writes_a_set() -> None:
    calls["body"] += 1
    await get_writable().write({1, 2})


@workflow
async def reads_an_unknown_run() -> None:
    calls["body"] += 1
    await get_run(999, actor=_host[0].get("u:1"))


@step
async def sleeps_durably_inside() -> None:
    calls["inner"] += 1
    await sleep("1s")  # a body's call: a mistake inside a step


@workflow
async def misuses_a_step() -> str:
    try:
        await sleeps_durably_inside()
    except StepFailedError as exc:
        return f"{exc.attempts} {exc.error_type}"
    return "unreachable"


@workflow
async def fails_after_a_cancel_elsewhere() -> None:
    """Records a cancel of its own run the way another process would (through a store of
    its own: no wake-up reaches this host, so the run's signal stays unaborted), then
    fails."""
    run_id = _workflow._current.get().ctx.intent_event_id
    trigger = BodyDO.registry.get(WORKFLOW_KIND)
    async with LedgerStore(_host[0].data_dir) as elsewhere:
        await elsewhere.run("u:x", cancel_op(BodyDO.registry, trigger, run_id, "stop", None))
    raise ValueError("failed after the cancel")


async def await_a_cancelled_future() -> None:
    """Await a future someone else cancelled (as a library's inner task may be): a
    ``CancelledError`` that is no cancellation of the awaiting task."""
    inner = asyncio.ensure_future(asyncio.sleep(3600))
    inner.cancel()
    await inner


@workflow
async def meets_a_stray_cancel() -> None:
    calls["body"] += 1
    await await_a_cancelled_future()


@step
async def meets_a_stray_cancel_once() -> str:
    calls["inner"] += 1
    if calls["inner"] == 1:
        await await_a_cancelled_future()
    return "done"


@workflow
async def retries_a_stray_cancel() -> str:
    return await meets_a_stray_cancel_once()


_host: list[ActorHost] = []

BodyDO = define_agent_do(
    workflows=[
        raises_its_own_abort, times_itself_out, writes_a_set, reads_an_unknown_run,
        misuses_a_step, fails_after_a_cancel_elsewhere, meets_a_stray_cancel,
        retries_a_stray_cancel,
    ]
)  # fmt: skip


@pytest.mark.sqlite_only
async def test_a_body_failing_after_a_recorded_cancel_ends_cancelled_without_a_failure_fact(
    tmp_path: Path,
) -> None:
    """A cancel recorded in the ledger before the body fails (from another process, not yet
    on the run's signal) ends the run ``cancelled``, and leaves no ``run_failed`` fact beside
    its ``run_cancelled`` one."""
    config = fast_config(poll_interval=30.0)  # no poll hears the cancel during the attempt
    async with ActorHost(BodyDO, data_dir=tmp_path, config=config) as h:
        _host[:] = [h]
        agent = h.get("u:x")
        run = await start(fails_after_a_cancel_elsewhere, actor=agent)
        state = await agent.wait_for_intent(run.run_id)
        kinds = [event.kind for event in await agent.events(intent_event_id=run.run_id)]
    assert state.status is IntentStatus.CANCELLED
    assert RUN_CANCELLED in kinds
    assert RUN_FAILED not in kinds


async def test_a_body_call_awaited_in_a_step_fails_the_step_without_retries(
    tmp_path: Path,
) -> None:
    """``sleep`` (or a hook, gather, race) inside a step is a mistake in the code: the step
    fails on its first attempt instead of being retried with backoff."""
    async with ActorHost(BodyDO, **place(tmp_path), config=fast_config()) as h:
        run = await start(misuses_a_step, actor=h.get("u:m"))
        assert await result_of(run, 30) == "1 StepMisuseError"
        assert calls["inner"] == 1


async def test_a_step_meeting_a_stray_cancel_fails_that_step_attempt(tmp_path: Path) -> None:
    """A ``CancelledError`` that cancels nothing, raised in a step, is that step attempt's
    failure: recorded and retried like any error (it escaped the step machinery)."""
    async with ActorHost(BodyDO, **place(tmp_path), config=fast_config()) as h:
        agent = h.get("u:s")
        run = await start(retries_a_stray_cancel, actor=agent)
        assert await result_of(run, 30) == "done"
        assert calls["inner"] == 2
        kinds = [event.kind for event in await agent.events(intent_event_id=run.run_id)]
        assert kinds.count(STEP_ATTEMPT_FAILED) == 1


@pytest.mark.parametrize(
    ("wf", "error_type"),
    [
        (raises_its_own_abort, "AbortError"),
        (times_itself_out, "AbortError"),
        (writes_a_set, "PayloadError"),
        (reads_an_unknown_run, "IntentNotFoundError"),
        (meets_a_stray_cancel, "CancelledError"),
    ],
)
async def test_a_body_error_fails_the_run_on_its_first_attempt(
    tmp_path: Path, wf: object, error_type: str
) -> None:
    """An ``AbortError`` the body raises while nobody cancelled the run (its own timeout),
    a payload the ledger cannot hold, an unknown run id and a ``CancelledError`` that cancels
    nothing (it went on retrying the whole run) are the body's failures: the run ends
    ``failed`` at once, its body ran once, no ``trigger.cancel_requested`` fact."""
    async with ActorHost(BodyDO, **place(tmp_path), config=fast_config()) as h:
        _host[:] = [h]
        agent = h.get("u:1")
        run = await start(wf, actor=agent)  # type: ignore[arg-type]
        with pytest.raises(RunFailedError) as caught:
            await result_of(run, 30)
        assert caught.value.failure.error_type == error_type
        assert await run.status() is IntentStatus.FAILED
        state = await agent.intent(run.run_id)
        assert state.attempts == 1
        assert state.cancel_requested_at is None
        assert calls["body"] == 1


async def test_a_name_given_for_the_actor_is_refused() -> None:
    """``actor=`` takes the handle (``host.get(name)``): a name gets a TypeError saying so,
    not an AttributeError from inside."""
    calls_with_a_name: list[Callable[[], Awaitable[object]]] = [
        lambda: start(raises_its_own_abort, actor="u:1"),  # type: ignore[arg-type]
        lambda: get_run(1, actor="u:1"),  # type: ignore[arg-type]
        lambda: resume_hook("token", actor="u:1"),
        lambda: get_hook_by_token("token", actor="u:1"),
    ]
    for call in calls_with_a_name:
        with pytest.raises(TypeError, match=r"actor's handle \(host.get\('u:1'\)\)"):
            await call()


@workflow
async def takes_a_url(url: str, *, retries: int = 1) -> str:
    return url


async def test_arguments_the_body_cannot_take_are_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    """``start`` with too many or too few arguments for the body raises ``TypeError`` naming
    its signature, and records no run (the run was recorded and failed at once)."""
    spec = define_agent_do(workflows=[takes_a_url])
    async with ActorHost(spec, **place(tmp_path), config=fast_config()) as h:
        agent = h.get("u:a")
        for args in ([], ["https://a", "https://b"]):
            with pytest.raises(TypeError, match=r"takes \(url, \*, retries=1\), not [02] arg"):
                await start(takes_a_url, args, actor=agent)
        assert await agent.events() == []
        run = await start(takes_a_url, ["https://a"], actor=agent)
        assert await result_of(run) == "https://a"


def test_calling_a_workflow_says_to_start_it() -> None:
    """Calling a workflow like a function raises a ``TypeError`` that says how to start a
    run (it said only that the object is not callable)."""
    with pytest.raises(TypeError, match=r"start a run with start\(takes_a_url, \[args"):
        takes_a_url("https://a")
