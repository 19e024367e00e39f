"""The scheduler's own bookkeeping: when a claim needs a second look at its actor."""

from __future__ import annotations

import sqlite3
import threading
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from ledger import (
    IntentStatus,
    LedgerUnavailableError,
    LedgerWriteError,
    ledger_relpath,
    ms_to_datetime,
)
from tests.helpers import (
    CANCELLED,
    DONE,
    TERMINAL_KINDS,
    Gate,
    ManualClock,
    fast_config,
    make_trigger,
    open_host,
)
from triggers._engine import claim_op
from triggers._scheduler import Scheduler
from triggers._slots import Slots, Taken

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
        entered, release, hold = _hold()
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


def _hold() -> tuple[threading.Event, threading.Event, Any]:
    """A store operation that holds the ledger worker from ``entered`` until ``release``."""
    entered, release = threading.Event(), threading.Event()

    def hold(tx: LedgerTx) -> None:
        entered.set()
        release.wait(10)

    return entered, release, hold


def _watch_claims(monkeypatch: pytest.MonkeyPatch) -> tuple[anyio.Event, list[bool]]:
    """An event set once the first claim's answer for "a" has been handled, and whether the
    scheduler then meant to look at "a" again (read right after that answer)."""
    done = anyio.Event()
    again: list[bool] = []
    real = Scheduler._claimed

    def claimed(self: Scheduler, actor_id: str, *args: Any) -> None:
        real(self, actor_id, *args)
        if actor_id == "a" and not again:
            again.append(_looks_again(self, actor_id))
            done.set()

    monkeypatch.setattr(Scheduler, "_claimed", claimed)
    return done, again


def _looks_again(scheduler: Scheduler, actor_id: str) -> bool:
    """The actor's work runs here, or the scheduler will look at the actor again."""
    return (
        any(key[0] == actor_id for key in scheduler._running)
        or actor_id in scheduler._ready
        or actor_id in scheduler._claiming
        or actor_id in scheduler._armed
    )


async def test_a_rescan_during_a_queued_claim_redrives_the_dead_owners_claim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim queued before a peer was found dead carries the old ``dead_owners`` list. The
    rescan's hint that follows the discovery must send the scheduler back to the actor, even
    though the queued claim's transaction begins after the hint: that claim cannot redrive
    the dead peer's attempt. Otherwise the redrive waits for the lease to run out."""
    clock = ManualClock()
    # The dead peer's attempt: claimed by "ghost" with a lease far in the future.
    async with open_host(tmp_path, make_trigger(), run_scheduler=False, clock=clock) as client:
        agent = client.get("a")
        intent = await agent.enqueue_trigger(
            trigger_kind="test.work", payload=None, at=ms_to_datetime(clock() + 3 * HOUR_MS)
        )
        clock.advance(3 * HOUR_MS)
        ghost = claim_op(
            client.spec.registry, limit=10, host_id="ghost", lease_ms=10 * HOUR_MS,
            dead_owners=(), own_tokens=frozenset(), max_redrives=5, slots=Slots(10),
            taken=Taken(),
        )  # fmt: skip
        assert len((await client.store.run("a", ghost)).claimed) == 1

    done, again = _watch_claims(monkeypatch)
    config = fast_config(poll_interval=3600.0, lease=3600.0)
    async with open_host(tmp_path, make_trigger(), clock=clock, config=config) as host:
        scheduler = host.scheduler
        assert scheduler is not None
        dead: list[str] = []
        scheduler._dead_owners = lambda: list(dead)  # what the host's registry says
        entered, release, hold = _hold()
        async with anyio.create_task_group() as tg:
            tg.start_soon(host.store.run, "blocker", hold)
            try:
                assert await anyio.to_thread.run_sync(entered.wait, 10)
                scheduler.hint("a")  # some change: a claim is queued (ghost still alive)
                await anyio.wait_all_tasks_blocked()
                assert "a" in scheduler._claiming
                dead.append("ghost")  # the registry refresh finds the peer dead ...
                scheduler.hint("a")  # ... and its rescan hints the actor, as rescan() does
                clock.advance(1)  # time passes before the queued claim runs
            finally:
                release.set()
            with anyio.fail_after(10):
                await done.wait()
        assert again == [True], "nothing redrives the dead peer's attempt before its lease ends"
        with anyio.fail_after(10):
            assert (await host.get("a").wait_for_intent(intent.id)).status == "completed"


async def test_a_poll_row_that_fell_due_after_the_read_still_gets_a_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A poll reads at R a row due at D > R; by the time its hints go out the clock is past
    D, so the hint marks the actor ready, with ``seen_at=R`` and no timer. A claim of the
    actor that looked at R < looked_at < D found nothing due, yet is taken to have covered
    the hint: the intent then waits for the next poll (a whole poll interval)."""
    clock = ManualClock()
    start = clock()
    due = start + 2 * HOUR_MS  # beyond the first poll's horizon (start + 1 hour)
    async with open_host(tmp_path, make_trigger(), run_scheduler=False, clock=clock) as client:
        intent = await client.get("a").enqueue_trigger(
            trigger_kind="test.work", payload=None, at=ms_to_datetime(due)
        )

    done, again = _watch_claims(monkeypatch)
    config = fast_config(poll_interval=3600.0)
    async with open_host(tmp_path, make_trigger(), clock=clock, config=config) as host:
        scheduler = host.scheduler
        store = host.store
        assert scheduler is not None
        await anyio.wait_all_tasks_blocked()
        assert not _looks_again(scheduler, "a")  # the first poll did not reach it
        clock.now = due - 20
        entered1, release1, hold1 = _hold()
        entered2, release2, hold2 = _hold()
        real_run_index = store.run_index

        async def run_index(fn: Any) -> Any:
            if "_poll" not in fn.__qualname__:
                return await real_run_index(fn)

            def read(index: Any) -> Any:
                result = fn(index)  # read at due - 20
                clock.advance(5)  # the claim's batch starts at due - 15
                return result

            result = await real_run_index(read)
            await anyio.to_thread.run_sync(entered2.wait, 10)  # the claim has looked
            clock.advance(30)  # the hints go out at due + 15
            return result

        monkeypatch.setattr(store, "run_index", run_index)
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.run, "b1", hold1)
            try:
                assert await anyio.to_thread.run_sync(entered1.wait, 10)
                scheduler.hint("a")  # some change of "a": its claim is queued
                await anyio.wait_all_tasks_blocked()
                assert "a" in scheduler._claiming
                tg.start_soon(store.run, "b2", hold2)  # runs in the claim's batch, after it
                polled = anyio.Event()

                async def poll() -> None:
                    await scheduler._poll(clock())
                    polled.set()

                tg.start_soon(poll)  # its read is queued on the worker before the claim
                await anyio.wait_all_tasks_blocked()
                release1.set()
                with anyio.fail_after(10):
                    await polled.wait()  # the poll's hint arrived during the claim
                assert "a" in scheduler._recheck
            finally:
                release1.set()
                release2.set()
            with anyio.fail_after(10):
                await done.wait()
        assert clock() >= due
        assert again == [True], "the intent, due now, waits for the next poll"
        with anyio.fail_after(10):
            assert (await host.get("a").wait_for_intent(intent.id)).status == "completed"


async def test_a_claim_with_no_free_slot_takes_no_write_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim that finds every slot taken as its transaction begins can only find that out:
    it answers at once, leaving the actor ready, without the ledger's write lock, so neither
    waits for another process that holds it nor holds it against that process."""
    answers: list[BaseException | None] = []
    answered = anyio.Event()
    real = Scheduler._claimed

    def claimed(self: Scheduler, actor_id: str, taken: Taken, result: Any, error: Any) -> None:
        real(self, actor_id, taken, result, error)
        if actor_id == "b":
            answers.append(error)
            answered.set()

    monkeypatch.setattr(Scheduler, "_claimed", claimed)
    gate = Gate()
    config = fast_config(max_concurrency=1, poll_interval=3600.0)
    trigger = make_trigger(acquire=gate.acquire)
    async with open_host(tmp_path, trigger, config=config, lock_timeout=1.0) as host:
        scheduler = host.scheduler
        assert scheduler is not None
        first = await host.get("a").enqueue_trigger(trigger_kind="test.work")
        await gate.wait_started(first.id)
        second = await host.get("b").enqueue_trigger(trigger_kind="test.work")
        assert scheduler._slots.free == 0
        other = sqlite3.connect(host.data_dir / ledger_relpath("b"), isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process writes to "b"
        try:
            del scheduler._ready["b"]  # ready since its enqueue: claim it by hand instead
            scheduler._start_claim("b")
            with anyio.fail_after(30):
                await answered.wait()
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert answers == [None], "answered without waiting for the lock"
        assert "b" in scheduler._ready, "ready again: claimed once a slot frees"
        gate.open(first.id)
        gate.open(second.id)
        with anyio.fail_after(30):
            state = await host.get("b").wait_for_intent(second.id)
        assert state.status is IntentStatus.COMPLETED


async def test_an_intent_claimed_again_while_its_old_attempt_runs_here_stays_in_hand(
    tmp_path: Path,
) -> None:
    """Another host took an intent over from this host's stalled attempt and gave it back
    (shown here by releasing the old claim directly, as its retry would): this host claims
    it again while the old attempt still runs. When the old one ends (its settle finds the
    claim lost), the new one is still this host's: a cancel reaches it, the intent ends once,
    and both attempts' slots come back."""
    tokens: list[str | None] = []
    first_started, second_started, finish_first = anyio.Event(), anyio.Event(), anyio.Event()
    unstick = anyio.Event()
    gate = Gate()

    async def acquire(intent: Any, ctx: Any) -> Any:
        if intent != "x":
            return await gate.acquire(intent, ctx)
        tokens.append(ctx._claim_token)
        if len(tokens) == 1:
            first_started.set()
            await finish_first.wait()  # stalled: it neither sees nor heeds the signal
            return "late"
        second_started.set()
        with ctx.signal.scope():
            await unstick.wait()  # set only when the test ends: this waits for the cancel
        return "not cancelled"

    async with open_host(
        tmp_path, make_trigger(acquire=acquire), config=fast_config(max_concurrency=2)
    ) as host:
        scheduler = host.scheduler
        assert scheduler is not None
        finished = anyio.Event()
        real_finished = scheduler._finished

        def finishing(*args: Any) -> None:
            real_finished(*args)
            finished.set()

        scheduler._finished = finishing  # type: ignore[method-assign,assignment]
        agent = host.get("chat")
        x = await agent.enqueue_trigger(trigger_kind="test.work", payload="x")
        with anyio.fail_after(10):
            await first_started.wait()
        token = tokens[0]
        assert token is not None

        def take_back(tx: LedgerTx) -> bool:
            return tx.release(x.id, token, due_at=tx.now_ms, count_attempt=False, redrive=True)

        assert await host.store.run("chat", take_back)
        with anyio.fail_after(10):
            await second_started.wait()
        finish_first.set()
        try:
            with anyio.fail_after(10):
                await finished.wait()  # the old attempt has ended (lost)
            result = await agent.cancel_trigger(trigger_kind="test.work", intent_event_id=x.id)
            assert result.status == "requested"
            with anyio.fail_after(10):
                assert (await agent.wait_for_intent(x.id)).status == "cancelled"
        finally:
            unstick.set()  # lets the host stop even when the cancel never arrived
        # Both slots are free again: two intents run at once.
        y = await agent.enqueue_trigger(trigger_kind="test.work", payload="y")
        z = await agent.enqueue_trigger(trigger_kind="test.work", payload="z")
        for intent in (y, z):
            await gate.wait_started(intent.id)
        for intent in (y, z):
            gate.open(intent.id)
        facts = await agent.events(intent_event_id=x.id, kinds=TERMINAL_KINDS)
    assert [f.kind for f in facts] == [CANCELLED]


@pytest.mark.parametrize(
    ("error", "redriven"),
    [(LedgerUnavailableError, False), (LedgerWriteError, True)],
    ids=["storage unreachable: retried until it lands", "refused: given up after four"],
)
async def test_a_failed_settle_is_retried_while_the_storage_is_out_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: type[Exception], redriven: bool
) -> None:
    """Six settles of an attempt fail in a row. If the storage could not be reached, the
    settle is tried again until it lands: the attempt's work counts, once. If the storage
    refused it (an error it may give every time), it is given up after four retries: the
    lease runs out and a redrive runs the intent again. One terminal fact either way."""
    from triggers import _scheduler

    monkeypatch.setattr(_scheduler, "_SETTLE_RETRY_MAX_S", 0.01)
    gate = Gate()
    async with open_host(
        tmp_path, make_trigger(acquire=gate.acquire), config=fast_config(lease=1.0)
    ) as host:
        agent = host.get("chat")
        intent = await agent.enqueue_trigger(trigger_kind="test.work")
        store = host.store
        real_run, real_submit = store.run, store.submit
        failures = 0

        def failing(fn: Any) -> Exception | None:
            nonlocal failures
            if failures >= 6 or not fn.__qualname__.startswith("settle_op."):
                return None
            failures += 1
            return error(tmp_path, "out")

        async def run(actor_id: str, fn: Any, **options: Any) -> Any:
            if (exc := failing(fn)) is not None:
                raise exc
            return await real_run(actor_id, fn, **options)

        def submit(actor_id: str, fn: Any, after: Any, **options: Any) -> None:
            if (exc := failing(fn)) is not None:
                after(None, exc)
                return
            real_submit(actor_id, fn, after, **options)

        monkeypatch.setattr(store, "run", run)
        monkeypatch.setattr(store, "submit", submit)
        await gate.wait_started(intent.id)
        gate.open(intent.id)
        with anyio.fail_after(20):
            assert (await agent.wait_for_intent(intent.id)).status == "completed"
        facts = await agent.events(kinds=TERMINAL_KINDS)
    assert [(f.intent_event_id, f.kind) for f in facts] == [(intent.id, DONE)]
    expected = (
        [(intent.id, 1, False), (intent.id, 1, True)] if redriven else [(intent.id, 1, False)]
    )
    assert [a[:3] for a in gate.attempts] == expected
