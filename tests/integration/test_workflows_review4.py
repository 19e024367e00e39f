"""Durable workflows, from a fourth review: a nested race's timeout (a sleep merged with a
hook into one suspension) is not waited for while another member of the enclosing race or
gather still works: ``_Group.await_patiently`` waits for the hooks only and ignores the
suspension's due time."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import pytest

from actors import ActorHost, define_agent_do
from tests.helpers import fast_config, place
from tests.workflow_helpers import calls, gate, held, reset_state
from triggers.workflows import create_hook, race, sleep, start, workflow

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [pytest.mark.anyio, pytest.mark.contract]


@pytest.fixture(autouse=True)
def _fresh_state() -> None:
    reset_state()


@workflow
async def timeout_in_a_race() -> Any:
    # "an approval, or 0.3 s without one" raced against a long step
    return await race(race(create_hook(token="approve"), sleep(0.3)), held("long"))


TimeoutDO = define_agent_do(workflows=[timeout_in_a_race])


async def test_a_timeout_nested_in_a_race_fires_while_another_member_works(
    tmp_path: Path,
) -> None:
    """race(race(hook, sleep(0.3)), long_step()): the inner race ends at 0.3 s (its sleep
    wins, no payload came), so it wins the outer race and the long step is stopped. The
    inner race suspends with the sleep's due time and the hook merged; the outer race's
    group then waits for the hook only, never for the due time: the timeout does not fire
    while the long step works (a hang if that step waits for ever), and once the step ends
    it wins the race instead (a wrong result)."""
    async with ActorHost(TimeoutDO, **place(tmp_path), config=fast_config()) as h:
        agent = h.get("u:timeout")
        run = await start(timeout_in_a_race, actor=agent)
        with anyio.fail_after(20):
            await gate("long:started").wait()
        result: list[Any] = []
        with anyio.move_on_after(10):
            result.append(await run.result())
        gate("long:release").set()
        if not result:
            with anyio.fail_after(20):
                late = await run.result()
            pytest.fail(
                "the 0.3 s timeout in the nested race did not fire in 10 s while the other "
                f"member worked; once that step ended, the race returned {late!r}"
            )
        assert result == [None], "the nested race's sleep should have won"
        assert calls["held:long"] == 1
