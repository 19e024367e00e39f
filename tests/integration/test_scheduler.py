"""The scheduler's own bookkeeping: when a claim needs a second look at its actor."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import anyio
import pytest

from ledger import ms_to_datetime
from tests.helpers import ManualClock, fast_config, make_trigger, open_host
from triggers._scheduler import Scheduler

if TYPE_CHECKING:
    from pathlib import Path

    from ledger import LedgerTx

pytestmark = pytest.mark.anyio

HOUR_MS = 3_600_000


@pytest.mark.parametrize(("seen_offset_ms", "claims"), [(-1, 1), (0, 2)])
async def test_a_hint_seen_before_the_claim_began_needs_no_second_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seen_offset_ms: int, claims: int
) -> None:
    """A hint that arrives while an actor's claim is queued sends the scheduler back to the
    actor only if the change it reports may postdate the claim's look: a poll read before the
    claim began (``seen_at`` earlier than its transaction's clock) does not; one read at the
    same clock reading does. Polls of a busy host would otherwise reopen every actor once
    more after its work settled."""
    started: list[str] = []
    real_start = Scheduler._start_claim

    def counting_start(self: Scheduler, actor_id: str) -> None:
        started.append(actor_id)
        real_start(self, actor_id)

    monkeypatch.setattr(Scheduler, "_start_claim", counting_start)
    clock = ManualClock()
    config = fast_config(poll_interval=3600.0)  # no poll of its own during the test
    async with open_host(tmp_path, make_trigger(), clock=clock, config=config) as host:
        scheduler = host.scheduler
        assert scheduler is not None
        agent = host.get("a")
        intent = await agent.enqueue_trigger(
            trigger_kind="test.work", payload=None, at=ms_to_datetime(clock() + HOUR_MS)
        )
        # Hold the ledger worker so that the claim stays queued while the hint arrives.
        entered, release = threading.Event(), threading.Event()

        def hold(tx: LedgerTx) -> None:
            entered.set()
            release.wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(host.store.run, "blocker", hold)
            try:
                assert await anyio.to_thread.run_sync(entered.wait, 10)
                clock.advance(HOUR_MS + 1)
                scheduler.hint("a")
                await anyio.wait_all_tasks_blocked()  # the dispatch loop queued the claim
                assert "a" in scheduler._claiming
                scheduler.hint("a", seen_at=clock() + seen_offset_ms)
            finally:
                release.set()
        state = await agent.wait_for_intent(intent.id)
        assert state.status == "completed"
        await anyio.wait_all_tasks_blocked()  # a second look, if any, has been queued
    assert started == ["a"] * claims
