"""Abort patterns in durable workflows: timeouts, first responder, one signal for a pipeline.

Run it with ``.venv/bin/python examples/workflows/abort_patterns.py``. Each section prints what
happened:

1. cancellable workflow with a timeout: ``race`` a long step against a durable ``sleep``;
   when the sleep wins, abort the controller so the step stops too;
2. fetch with a timeout: the same, for a slow fetch;
3. first responder: ``race`` several providers; the first answer wins and the losers' shared
   signal is aborted;
4. pipeline with one signal: every stage gets the same signal; aborting it after stage two
   stops the pipeline there;
5. step-initiated abort: a watchdog step aborts the controller when the work goes over
   budget;
6. user-triggered cancellation: ``race`` the work against a hook; an HTTP-style handler
   resumes the hook and the work stops at once.
"""

from __future__ import annotations

import sys
import tempfile
from typing import TYPE_CHECKING

import anyio
import structlog

from actors import ActorHost, define_agent_do
from triggers.workflows import (
    AbortController,
    HookNotFoundError,
    StepFailedError,
    create_hook,
    gather,
    race,
    resume_hook,
    sleep,
    start,
    step,
    workflow,
)

if TYPE_CHECKING:
    from triggers import AbortSignal


@step
async def generate_report(signal: AbortSignal) -> str:
    with signal.scope():  # stops as soon as the workflow aborts the signal
        await anyio.sleep(30)
    return "report"


@workflow(name="patterns.cancellable_with_timeout")
async def cancellable_with_timeout() -> str:
    controller = AbortController()
    try:
        winner = await race(generate_report(controller.signal), sleep("200ms"))
    except StepFailedError as error:
        return f"report failed: {error.message}"
    if winner is None:  # the sleep won
        await controller.abort("timed out after 200ms")
        return f"timed out; step signal aborted={controller.signal.aborted}"
    return str(winner)


@step
async def fetch(url: str, delay: float, signal: AbortSignal) -> str:
    with signal.scope():
        await anyio.sleep(delay)
    return f"body of {url}"


@workflow(name="patterns.fetch_with_timeout")
async def fetch_with_timeout(url: str, delay: float) -> str:
    controller = AbortController()
    result = await race(fetch(url, delay, controller.signal), sleep("100ms"))
    if result is None:
        await controller.abort("fetch timed out")
        return f"{url}: timed out"
    return str(result)


@workflow(name="patterns.first_responder")
async def first_responder(question: str) -> str:
    controller = AbortController()
    answer = await race(
        fetch(f"provider-a?q={question}", 0.3, controller.signal),
        fetch(f"provider-b?q={question}", 0.05, controller.signal),
        fetch(f"provider-c?q={question}", 0.5, controller.signal),
    )
    await controller.abort("an answer arrived")  # the losers stop
    return str(answer)


@step
async def stage(name: str, signal: AbortSignal) -> str:
    signal.throw_if_aborted()
    return f"{name} done"


@workflow(name="patterns.pipeline")
async def pipeline() -> list[str]:
    controller = AbortController()
    done = [await stage("extract", controller.signal), await stage("transform", controller.signal)]
    await controller.abort("the source changed; stop the pipeline")
    try:
        done.append(await stage("load", controller.signal))
    except StepFailedError as error:
        done.append(f"load skipped ({error.message})")
    return done


@step
async def crunch(signal: AbortSignal) -> str:
    with signal.scope():
        await anyio.sleep(30)
    return "crunched"


@step
async def budget_watchdog(controller: AbortController, budget_s: float) -> str:
    await anyio.sleep(budget_s)
    await controller.abort(f"over budget ({budget_s}s)")
    return "watchdog fired"


@workflow(name="patterns.watchdog")
async def watched() -> str:
    controller = AbortController()
    try:
        await gather(crunch(controller.signal), budget_watchdog(controller, 0.1))
    except StepFailedError as error:
        return f"{error.step} stopped: {error.message}"
    return "finished in budget"


@workflow(name="patterns.user_cancellable")
async def user_cancellable(job: str) -> str:
    controller = AbortController()
    stop = create_hook(token=f"stop:{job}")
    winner = await race(crunch(controller.signal), stop)
    await controller.abort("the user pressed stop")
    return f"{job}: {winner}" if isinstance(winner, str) else f"{job}: stopped by {winner}"


async def stop_button_handler(host: ActorHost, job: str) -> None:
    """What a POST /jobs/{job}/stop route would do (after the run has created its hook)."""
    while True:
        try:
            await resume_hook(f"stop:{job}", {"by": "ann"}, actor=host.get("patterns:1"))
            return
        except HookNotFoundError:
            await anyio.sleep(0.01)


AgentDO = define_agent_do(
    workflows=[
        cancellable_with_timeout, fetch_with_timeout, first_responder, pipeline, watched,
        user_cancellable,
    ]
)  # fmt: skip


async def main(data_dir: str) -> None:
    async with ActorHost(AgentDO, data_dir=data_dir) as host:
        agent = host.get("patterns:1")
        run = await start(cancellable_with_timeout, actor=agent)
        print(f"1. cancellable with timeout: {await run.result()}")
        run = await start(fetch_with_timeout, ["https://slow.example", 5.0], actor=agent)
        print(f"2. fetch with timeout: {await run.result()}")
        run = await start(fetch_with_timeout, ["https://fast.example", 0.01], actor=agent)
        print(f"2. fetch in time: {await run.result()}")
        run = await start(first_responder, ["weather"], actor=agent)
        print(f"3. first responder: {await run.result()}")
        run = await start(pipeline, actor=agent)
        print(f"4. pipeline: {await run.result()}")
        run = await start(watched, actor=agent)
        print(f"5. step-initiated abort: {await run.result()}")
        run = await start(user_cancellable, ["export-9"], actor=agent)
        await stop_button_handler(host, "export-9")
        print(f"6. user-triggered cancellation: {await run.result()}")


if __name__ == "__main__":
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    directory = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="patterns-")
    anyio.run(main, directory)
