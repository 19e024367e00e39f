"""Helpers shared by the workflow tests: results, hooks, replays made certain, and the steps
several test modules run (with the state they leave for the tests to look at)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import anyio

from ledger import IntentStatus
from tests.helpers import wait_until
from triggers.workflows import (
    AbortController,
    HookNotFoundError,
    create_hook,
    get_hook_by_token,
    resume_hook,
    step,
)

if TYPE_CHECKING:
    from triggers import AbortSignal

calls: Counter[str] = Counter()
"""How often each shared step ran, by name (and key, where it takes one)."""
gates: dict[str, anyio.Event] = {}
seen: list[str] = []
"""What steps saw happen, in order."""


def gate(name: str) -> anyio.Event:
    """The event called ``name``, created on first use."""
    return gates.setdefault(name, anyio.Event())


def reset_state() -> None:
    """Forget what the shared steps recorded (each test module's autouse fixture calls it)."""
    calls.clear()
    gates.clear()
    seen.clear()


@step
async def add(a: int, b: int) -> int:
    calls["add"] += 1
    return a + b


@step
async def held(name: str) -> str:
    """Sets ``{name}:started``, then waits for ``{name}:release``."""
    calls[f"held:{name}"] += 1
    gate(f"{name}:started").set()
    await gate(f"{name}:release").wait()
    seen.append(f"{name} finished")
    return name


@step
async def release_resource() -> str:
    calls["release"] += 1
    return "released"


@step
async def work_until_aborted(signal: AbortSignal) -> str:
    """Sets ``work:started``, then waits for ``signal`` and raises its abort."""
    calls["work"] += 1
    gate("work:started").set()
    await signal.wait()
    signal.throw_if_aborted()
    return "unreachable"


@step
async def watchdog(controller: AbortController) -> str:
    """Aborts ``controller`` once ``work_until_aborted`` has started."""
    await gate("work:started").wait()
    await controller.abort("quota exceeded")
    return "watchdog fired"


REPLAY = "replay"
"""The token of the hook a body suspends on at ``replay_point``."""


async def result_of(run: Any, seconds: float = 20) -> Any:
    """The run's result, failing the test if it takes more than ``seconds``."""
    with anyio.fail_after(seconds):
        return await run.result()


async def wait_hook(agent: Any, token: str) -> int:
    """Wait until the hook exists; returns its run id."""
    found: list[int] = []

    async def created() -> bool:
        try:
            found.append((await get_hook_by_token(token, actor=agent)).run_id)
        except HookNotFoundError:
            return False
        return True

    await wait_until(agent, created)
    return found[-1]


async def cancel_seen(agent: Any, run: Any) -> None:
    """Wait until the run's cancel is recorded and every task has settled after it."""

    async def requested() -> bool:
        return (await agent.intent(run.run_id)).cancel_requested_at is not None

    await wait_until(agent, requested)
    with anyio.fail_after(20):
        await anyio.wait_all_tasks_blocked()


async def replay_point() -> None:
    """In a body: suspend the run until the test resumes it (``replayed``), so everything
    after this point runs on a replay, whatever the machine's speed (a short sleep would not
    do: if recording the wait takes longer than the sleep, the body goes on in the same
    attempt)."""
    async with create_hook(token=REPLAY) as hook:
        await hook


async def replayed(run: Any, agent: Any) -> Any:
    """Resume ``run`` at its replay point once its attempt has ended; the run's result."""
    await wait_hook(agent, REPLAY)

    async def suspended() -> bool:
        return await run.status() is IntentStatus.PENDING

    await wait_until(agent, suspended)
    await resume_hook(REPLAY, None, actor=agent)
    return await result_of(run)
