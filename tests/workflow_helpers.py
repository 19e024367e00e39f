"""Helpers shared by the workflow tests: results, hooks, and replays made certain."""

from __future__ import annotations

from typing import Any

import anyio

from ledger import IntentStatus
from tests.helpers import wait_until
from triggers.workflows import HookNotFoundError, create_hook, get_hook_by_token, resume_hook

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
