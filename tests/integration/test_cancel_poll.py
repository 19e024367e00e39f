"""The cancel poll: the fallback that aborts running attempts when no wake-up came.

The cancels here are written by a bare ledger store beside the host, which sends no wake-up
(no datagram, no NOTIFY), so only the host's periodic poll of its running attempts can
deliver them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import pytest

from ledger import IntentStatus
from tests.helpers import make_trigger, open_host, open_store

if TYPE_CHECKING:
    from pathlib import Path

    from ledger import JSON, LedgerTx
    from triggers import TriggerContext

pytestmark = [pytest.mark.anyio, pytest.mark.contract]

ACTORS = ("a", "b", "c")


async def test_the_poll_aborts_the_cancelled_attempts_of_every_actor(tmp_path: Path) -> None:
    """Two attempts run on each of three actors; one of each pair has its cancel recorded
    with no wake-up. Every one of those ends cancelled; the others still run."""
    running: set[tuple[str, int]] = set()
    all_started = anyio.Event()

    async def acquire(intent: JSON, ctx: TriggerContext) -> JSON:
        running.add((ctx.actor_id, ctx.intent_event_id))
        if len(running) == 2 * len(ACTORS):
            all_started.set()
        await ctx.signal.wait()
        ctx.signal.throw_if_aborted()
        return None

    async with open_host(tmp_path, make_trigger(acquire=acquire)) as host:
        intents: dict[str, list[int]] = {}
        for name in ACTORS:
            for _ in range(2):
                intent = await host.get(name).enqueue_trigger(trigger_kind="test.work")
                intents.setdefault(name, []).append(intent.id)
        with anyio.fail_after(10):
            await all_started.wait()

        async with open_store(tmp_path) as beside:
            for name, (first, _) in intents.items():

                def cancel(tx: LedgerTx, intent_event_id: int = first) -> None:
                    tx.request_cancel(intent_event_id, reason="stop", requested_by="beside")

                await beside.run(name, cancel)

        with anyio.fail_after(20):
            for name, (first, _) in intents.items():
                state = await host.get(name).wait_for_intent(first)
                assert state.status is IntentStatus.CANCELLED
        for name, (_, second) in intents.items():
            state = await host.get(name).intent(second)
            assert state.status is IntentStatus.RUNNING
