"""``DistributedAbortController`` within one process: get-or-create, durable and idempotent
abort, TTL expiry, the grace period, and a broken ledger (other processes: test_processes)."""

from __future__ import annotations

import functools
from datetime import timedelta
from typing import TYPE_CHECKING

import anyio
import pytest

from ledger import IntentStatus, LedgerTx, ledger_relpath
from tests.helpers import ManualClock, open_host
from triggers import AbortSignal, DistributedAbortController
from triggers._distributed import _REGISTRY, _TRIGGER, KIND
from triggers._engine import Outcome, settle_op

if TYPE_CHECKING:
    from pathlib import Path

    from actors import ActorHost

pytestmark = [pytest.mark.anyio, pytest.mark.contract]

ABORTED = "trigger.abort_controller.aborted"


async def fired(signal: AbortSignal) -> object:
    """Wait (bounded) for the signal; returns its reason."""
    with anyio.fail_after(10):
        await signal.wait()
    return signal.reason


async def facts(host: ActorHost, name: str) -> list[tuple[str, object]]:
    return [(e.kind, e.payload) for e in await host.get(name).events(kinds=[ABORTED])]


async def test_create_is_an_atomic_get_or_create(tmp_path: Path) -> None:
    """Many concurrent ``create(id)`` calls, through several hosts of one data directory, all
    get the same controller; another id gets another one."""
    async with open_host(tmp_path) as one, open_host(tmp_path, run_scheduler=False) as two:
        found: list[int] = []

        async def create(host: ActorHost) -> None:
            found.append((await DistributedAbortController.create("chat:1", host=host)).run_id)

        async with anyio.create_task_group() as tg:
            for index in range(20):
                tg.start_soon(create, one if index % 2 else two)
        assert len(set(found)) == 1
        other = await DistributedAbortController.create("chat:2", host=one)
        assert other.id == "chat:2"
        intents = await one.get("chat:1").intents()
        assert [i.intent_event_id for i in intents] == found[:1]
        assert intents[0].status is IntentStatus.PENDING


async def test_abort_before_anyone_listens_is_kept(tmp_path: Path) -> None:
    """An abort right after create, with no signal read yet, is durable: a signal read later,
    from another host, fires with the reason."""
    async with open_host(tmp_path) as host:
        controller = await DistributedAbortController.create("task:build-1", host=host)
        await controller.abort("Cancelled by admin")
    async with open_host(tmp_path, run_scheduler=False) as later:
        again = await DistributedAbortController.create("task:build-1", host=later)
        assert again.run_id == controller.run_id
        assert await fired(again.signal) == "Cancelled by admin"
        assert await facts(later, "task:build-1") == [
            (ABORTED, {"reason": "Cancelled by admin", "expired": False})
        ]


async def test_signal_fires_in_another_host_on_abort(tmp_path: Path) -> None:
    """A signal read before the abort fires when another host aborts; reading the signal
    returns at once and always gives the same signal."""
    async with open_host(tmp_path) as a, open_host(tmp_path, run_scheduler=False) as b:
        listener = await DistributedAbortController.create("chat:7", host=a)
        signal = listener.signal
        assert listener.signal is signal
        await anyio.wait_all_tasks_blocked()
        assert not signal.aborted
        aborter = await DistributedAbortController.create("chat:7", host=b)
        await aborter.abort("User cancelled")
        assert await fired(signal) == "User cancelled"


async def test_second_abort_keeps_the_first_reason(tmp_path: Path) -> None:
    """Abort is idempotent: the second one changes nothing, the first reason stays."""
    async with open_host(tmp_path) as host:
        controller = await DistributedAbortController.create("c", host=host)
        await controller.abort("first")
        await controller.abort("second")
        assert await fired(controller.signal) == "first"
        assert await facts(host, "c") == [(ABORTED, {"reason": "first", "expired": False})]


async def test_ttl_expiry_fires_the_signal(tmp_path: Path) -> None:
    """When the TTL passes, the signal fires with a reason ending in "(expired)", and a later
    abort is a quiet no-op."""
    async with open_host(tmp_path) as host:
        controller = await DistributedAbortController.create("quick-task", host=host, ttl=0.05)
        reason = await fired(controller.signal)
        assert isinstance(reason, str)
        assert reason.endswith("(expired)")
        await controller.abort("too late")
        assert await facts(host, "quick-task") == [(ABORTED, {"reason": reason, "expired": True})]
        state = await host.get("quick-task").intent(controller.run_id)
        assert state.status is IntentStatus.COMPLETED


async def test_waiting_controller_holds_no_attempt(tmp_path: Path) -> None:
    """A controller waiting for its TTL is a due time: no attempt runs for it."""
    async with open_host(tmp_path) as host:
        await DistributedAbortController.create("idle", host=host, ttl=timedelta(hours=1))
        await anyio.wait_all_tasks_blocked()
        assert host.scheduler is not None
        assert list(host.scheduler.running_attempts()) == []


async def test_grace_keeps_a_fired_controller_findable(tmp_path: Path) -> None:
    """Within ``grace`` after an abort, ``create(id)`` finds the fired controller (its signal
    fires at once); after it, ``create(id)`` starts a fresh, unfired one."""
    clock = ManualClock()
    async with open_host(tmp_path, run_scheduler=False, clock=clock) as host:
        first = await DistributedAbortController.create("job", host=host, grace=60)
        await first.abort("stop")
        clock.advance(59_000)
        late = await DistributedAbortController.create("job", host=host, grace=1)
        assert late.run_id == first.run_id
        assert await fired(late.signal) == "stop"
        clock.advance(2_000)
        fresh = await DistributedAbortController.create("job", host=host)
        assert fresh.run_id != first.run_id
        await anyio.wait_all_tasks_blocked()
        assert not fresh.signal.aborted
        await first.abort("old controller")  # a quiet no-op on the ended one
        await anyio.wait_all_tasks_blocked()
        assert not fresh.signal.aborted


async def test_a_known_firing_is_on_the_signal_at_once(tmp_path: Path) -> None:
    """Code that reads ``signal`` right after ``abort()`` returns, or right after ``create``
    found a fired controller, sees it aborted at once: ``with signal.scope():`` raises on
    entry, before any await (no follower task has to run first)."""
    async with open_host(tmp_path, run_scheduler=False) as host:
        read_before = await DistributedAbortController.create("a", host=host)
        signal = read_before.signal
        assert not signal.aborted
        await read_before.abort("stop")
        assert (signal.aborted, signal.reason) == (True, "stop")
        unread = await DistributedAbortController.create("b", host=host)
        await unread.abort("halt")
        assert (unread.signal.aborted, unread.signal.reason) == (True, "halt")
        late = await DistributedAbortController.create("b", host=host)
        assert (late.signal.aborted, late.signal.reason) == (True, "halt")
        again = await DistributedAbortController.create("a", host=host)
        await again.abort("second")
        assert again.signal.reason == "stop", "the first reason stays"


async def test_an_abort_during_the_expiry_attempt_wins_everywhere(tmp_path: Path) -> None:
    """An abort that lands while the expiry's attempt runs fires the aborting process's
    signal at once with its reason; the expiry's commit then records that same abort, so
    every other process hears the same reason (not the expiry's)."""
    clock = ManualClock()
    async with open_host(tmp_path, run_scheduler=False, clock=clock) as host:
        controller = await DistributedAbortController.create("ctl", host=host, ttl=1)
        clock.advance(2_000)
        claim = functools.partial(
            LedgerTx.claim_due, limit=1, host_id="h", lease_until=clock() + 60_000,
            tokens=iter(["tok"]), kinds=[KIND],
        )  # fmt: skip
        [row] = await host.store.run("ctl", claim)  # the expiry's attempt is running
        await controller.abort("stop")
        assert controller.signal.reason == "stop"
        payload = {"ttl_ms": 1_000, "grace_ms": 3_600_000}
        settle = settle_op(
            _REGISTRY, _TRIGGER, row.id, "tok", payload, Outcome.RETURNED, {"ttl_ms": 1_000}, 0
        )
        await host.store.run("ctl", settle)
        assert await facts(host, "ctl") == [(ABORTED, {"reason": "stop", "expired": False})]
        elsewhere = DistributedAbortController(host, "ctl", controller.run_id)
        assert await fired(elsewhere.signal) == "stop"


async def test_a_key_left_by_an_old_ledger_blocks_only_while_its_intent_lives(
    tmp_path: Path,
) -> None:
    """A ledger written before user keys were refused the ``trigger.`` prefix may hold the
    controller's key on another kind's intent: ``create`` refuses while that intent lives,
    and takes the key over once it has ended."""

    def old_intent(tx: LedgerTx) -> int:
        event, _ = tx.append_intent(
            trigger_kind="app.job", intent_event_kind="app.job.requested", payload=None,
            due_at=tx.now_ms + 3_600_000, idempotency_key="trigger.abort_controller",
        )  # fmt: skip
        return event.id

    async with open_host(tmp_path, run_scheduler=False) as host:
        job = await host.store.run("old", old_intent)
        with pytest.raises(ValueError, match=r"held by intent 1 of trigger 'app\.job'"):
            await DistributedAbortController.create("old", host=host)
        await host.store.run("old", lambda tx: tx.finish(job, IntentStatus.COMPLETED, []))
        controller = await DistributedAbortController.create("old", host=host)
        assert controller.run_id != job
        await controller.abort("stop")
        assert controller.signal.reason == "stop"


async def test_a_tiny_ttl_is_one_millisecond(tmp_path: Path) -> None:
    async with open_host(tmp_path, run_scheduler=False) as host:
        controller = await DistributedAbortController.create("t", host=host, ttl=1e-6)
        [created] = await host.get("t").events(kinds=["trigger.abort_controller.created"])
        assert created.payload["ttl_ms"] == 1
        assert controller.run_id == created.id


@pytest.mark.sqlite_only
async def test_broken_ledger_aborts_the_signal(tmp_path: Path) -> None:
    """If the controller's ledger cannot be read, its signal aborts with the error's message
    instead of never firing."""
    async with open_host(tmp_path) as host:
        controller = await DistributedAbortController.create("broken", host=host)
    (tmp_path / ledger_relpath("broken")).write_bytes(b"this is not a database" * 100)
    async with open_host(tmp_path, run_scheduler=False) as host:
        reconnected = DistributedAbortController(host, "broken", controller.run_id)
        reason = await fired(reconnected.signal)
        assert isinstance(reason, str)
        assert "broken" in reason
        assert "could not be read" in reason


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"ttl": 0}, ValueError),
        ({"ttl": -1}, ValueError),
        ({"ttl": float("inf")}, ValueError),
        ({"grace": -1}, ValueError),
        ({"ttl": "1h"}, TypeError),
        ({"ttl": True}, TypeError),
        ({"ttl": 1e20}, ValueError),
        ({"ttl": timedelta(days=365 * 101)}, ValueError),
        ({"grace": 1e12}, ValueError),
    ],
)
async def test_bad_durations_are_refused(
    tmp_path: Path, options: dict[str, object], error: type[Exception]
) -> None:
    """A TTL that is not positive and finite, or a negative grace, writes nothing."""
    async with open_host(tmp_path) as host:
        with pytest.raises(error):
            await DistributedAbortController.create("x", host=host, **options)  # type: ignore[arg-type]
        assert not (tmp_path / ledger_relpath("x")).exists()
