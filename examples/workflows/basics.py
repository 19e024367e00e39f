"""Durable workflows: recorded steps, durable sleep, a hook resumed from outside, cancellation.

Run it with ``.venv/bin/python examples/workflows/basics.py``. Each section prints what
happened:

1. steps and a durable sleep: the step before the sleep is not run again on replay;
2. user-triggered cancellation with a hook: the run waits (holding nothing) until an
   HTTP-style handler resumes its hook with the user's decision;
3. abort errors skip retries: a step raising ``AbortError`` is not retried;
4. run cancellation: a cancel stops the run at its next step, its ``finally`` runs.
"""

from __future__ import annotations

import sys
import tempfile
from collections import Counter

import anyio
import structlog
from pydantic import BaseModel

from actors import ActorHost, define_agent_do
from triggers import AbortError
from triggers.workflows import (
    HookNotFoundError,
    RunCancelledError,
    StepFailedError,
    define_hook,
    get_hook_by_token,
    sleep,
    start,
    step,
    workflow,
)

runs: Counter[str] = Counter()


@step
async def fetch_report(name: str) -> dict[str, str]:
    runs["fetch_report"] += 1
    return {"name": name, "body": f"the {name} report"}


@step
async def publish(report: dict[str, str]) -> str:
    runs["publish"] += 1
    return f"published {report['name']}"


@workflow(name="examples.report")
async def report(name: str) -> str:
    fetched = await fetch_report(name)
    await sleep("200ms")  # durable: the run is rescheduled, not a sleeping task
    return await publish(fetched)


class Decision(BaseModel):
    approved: bool
    by: str


decision_hook = define_hook(Decision)


@workflow(name="examples.approval")
async def approval(request: str) -> str:
    draft = await fetch_report(request)
    async with decision_hook.create(token=f"decision:{request}") as hook:
        decision = await hook  # waits durably for resume_hook / decision_hook.resume
    if not decision.approved:
        return f"{request}: rejected by {decision.by}"
    return await publish(draft) + f" (approved by {decision.by})"


@step
async def call_provider() -> str:
    runs["call_provider"] += 1
    raise AbortError("the provider cancelled the job")


@workflow(name="examples.no_retry")
async def no_retry() -> str:
    try:
        return await call_provider()
    except StepFailedError as error:
        return f"gave up after {error.attempts} attempt(s): {error.message}"


started = anyio.Event()
release = anyio.Event()
cleanups: list[str] = []


@step
async def long_step() -> str:
    started.set()
    await release.wait()
    return "long step done"


@workflow(name="examples.cancellable")
async def cancellable() -> str:
    try:
        await long_step()
        await long_step()
        return "finished"
    finally:
        cleanups.append("cleanup ran")


AgentDO = define_agent_do(workflows=[report, approval, no_retry, cancellable])


async def handle_decision_request(host: ActorHost, request: str, body: dict[str, object]) -> int:
    """What an HTTP route would do: validate the body and resume the run's hook."""
    return await decision_hook.resume(f"decision:{request}", body, actor=host.get("team:1"))


async def hook_created(host: ActorHost, token: str) -> None:
    """Wait until a run has created the hook (a user would see a pending request in a UI)."""
    while True:
        try:
            await get_hook_by_token(token, actor=host.get("team:1"))
            return
        except HookNotFoundError:
            await anyio.sleep(0.01)


async def main(data_dir: str) -> None:
    async with ActorHost(AgentDO, data_dir=data_dir) as host:
        agent = host.get("team:1")

        run = await start(report, ["q3"], actor=agent)
        print(f"1. report: {await run.result()!r}; fetch_report ran {runs['fetch_report']}x")

        run = await start(approval, ["launch"], actor=agent)
        await hook_created(host, "decision:launch")  # the run now waits, holding nothing
        await handle_decision_request(host, "launch", {"approved": True, "by": "ann"})
        print(f"2. approval: {await run.result()!r}")

        run = await start(no_retry, actor=agent)
        print(f"3. no_retry: {await run.result()!r}; call_provider ran {runs['call_provider']}x")

        run = await start(cancellable, actor=agent)
        await started.wait()
        answer = await run.cancel("user pressed stop")
        release.set()  # the running step finishes, then the body gets RunCancelledError
        try:
            await run.result()
        except RunCancelledError as error:
            print(f"4. cancellable: cancel answered {answer.status}; {error}; {cleanups}")


if __name__ == "__main__":
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    directory = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="workflows-")
    anyio.run(main, directory)
