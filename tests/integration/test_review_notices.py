"""Review of the commit hooks, notices and shard workers: each test failed on the first version."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from actors._wakeup import SUPPORTED
from ledger import JSON, IntentStatus, LedgerClosedError, LedgerStore, LedgerTx
from tests.helpers import make_trigger, open_host
from triggers._engine import cancel_op

if TYPE_CHECKING:
    from pathlib import Path

    from actors import ActorHost
    from ledger import Committed
    from triggers import TriggerContext

pytestmark = pytest.mark.anyio

KIND = "test.work"


class Attempts:
    """An acquire that waits for its signal; records each attempt's signal."""

    def __init__(self) -> None:
        self.signals: dict[int, Any] = {}
        self.started: dict[int, anyio.Event] = {}

    def event(self, intent_event_id: int) -> anyio.Event:
        return self.started.setdefault(intent_event_id, anyio.Event())

    async def acquire(self, intent: JSON, ctx: TriggerContext) -> JSON:
        self.signals[ctx.intent_event_id] = ctx.signal
        self.event(ctx.intent_event_id).set()
        await ctx.signal.wait()
        ctx.signal.throw_if_aborted()
        return None


def _record_deliveries(host: ActorHost) -> tuple[list[tuple[str, int, bool]], anyio.Event]:
    """Wrap the scheduler's ``deliver_cancel`` to see what the wake-up handed it."""
    scheduler = host.scheduler
    assert scheduler is not None
    original = scheduler.deliver_cancel
    calls: list[tuple[str, int, bool]] = []
    called = anyio.Event()

    def deliver(actor_id: str, intent_event_id: int, reason: str | None) -> bool:
        found = original(actor_id, intent_event_id, reason)
        calls.append((actor_id, intent_event_id, found))
        called.set()
        return found

    scheduler.deliver_cancel = deliver  # type: ignore[method-assign]
    return calls, called


# -- 1. the shard worker after close -------------------------------------------------------


async def test_run_index_after_close_does_not_hang(tmp_path: Path) -> None:
    """``run_index`` on a closed store raises ``LedgerClosedError`` (it once queued onto a
    worker thread that had ended, and waited forever)."""
    store = LedgerStore(tmp_path)
    async with store:
        await store.run("a", lambda tx: tx.insert_event("test.note", None))
    task = asyncio.ensure_future(store.run_index(lambda index: index.actors()))
    done, _ = await asyncio.wait({task}, timeout=5)
    if not done:
        task.cancel()  # native cancellation reaches through anyio's shield
        with contextlib.suppress(BaseException):
            await task
    assert done, "run_index on a closed store never returned"
    error = task.exception()
    assert error is None or isinstance(error, LedgerClosedError)


async def test_run_index_whose_function_raises_stop_iteration_does_not_hang(
    tmp_path: Path,
) -> None:
    """A future cannot carry ``StopIteration`` (asyncio refuses it inside the loop callback,
    leaving the caller waiting forever): it comes back as ``RuntimeError``."""
    async with LedgerStore(tmp_path) as store:

        def read(index: Any) -> None:
            next(iter(index.actors()))  # no actors yet: StopIteration

        task = asyncio.ensure_future(store.run_index(read))
        done, _ = await asyncio.wait({task}, timeout=5)
        if not done:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        assert done, "run_index never returned: its future was never settled"
        assert isinstance(task.exception(), RuntimeError)


# -- 2. a verified cancel that beats the claim's answer ------------------------------------


@pytest.mark.skipif(not SUPPORTED, reason="wake-up sockets are Linux-only")
async def test_verified_cancel_arriving_before_the_claim_is_registered_is_not_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer's hook sends the cancel from its worker thread right after COMMIT. If it
    reaches the owner between the owner's claim COMMIT and the moment its loop registers the
    attempt, ``deliver_cancel`` finds nothing; the owner then reads the ledger once, behind its
    claim, and aborts the attempt (with the poll fallback off)."""
    attempts = Attempts()
    trigger = make_trigger(KIND, attempts.acquire)
    async with (
        open_host(tmp_path, trigger, run_scheduler=False) as writer,
        open_host(tmp_path, trigger) as owner,
    ):

        async def no_poll(scheduler: Any) -> None:
            """The poll fallback off: only the wake-up may deliver the cancel."""

        monkeypatch.setattr(owner, "_poll_cancels", no_poll)
        calls, delivered = _record_deliveries(owner)

        # Hold the owner's shard worker right after it commits the claim (as a busy GIL or
        # a slow hook would), so its loop has not heard the claim's answer yet.
        loop = asyncio.get_running_loop()
        claim_committed = anyio.Event()
        release = threading.Event()
        armed = threading.Event()

        def hold(committed: list[Committed]) -> None:
            if armed.is_set() and any(
                c.actor_id == "a" and c.effects.due_may_rise for c in committed
            ):
                armed.clear()
                loop.call_soon_threadsafe(claim_committed.set)
                release.wait(20)

        owner.store.add_commit_hook(hold)
        armed.set()
        try:
            intent = await writer.get("a").enqueue_trigger(trigger_kind=KIND)
            with anyio.fail_after(10):
                await claim_committed.wait()
            result = await writer.get("a").cancel_trigger(
                trigger_kind=KIND, intent_event_id=intent.id, reason="stop"
            )
            assert result.status.value == "requested"
            with anyio.fail_after(10):
                await delivered.wait()  # the owner handled the verified cancel
        finally:
            release.set()
        assert calls[0] == ("a", intent.id, False)  # nothing registered yet
        with anyio.fail_after(10):
            await attempts.event(intent.id).wait()
        signal = attempts.signals[intent.id]
        with anyio.fail_after(5):
            await signal.wait()
        assert signal.reason == "stop"


# -- 3. a cancel rolled back by a savepoint is delivered as verified -----------------------


@pytest.mark.skipif(not SUPPORTED, reason="wake-up sockets are Linux-only")
async def test_cancel_rolled_back_by_a_savepoint_does_not_abort_the_attempt(
    tmp_path: Path,
) -> None:
    """A savepoint that rolls back takes its cancels with it, as it does its notices: verified
    cancels are acted on without a re-read, so a cancel that was never committed must not
    abort the attempt (it once did, and the intent then ended ``cancelled``)."""
    attempts = Attempts()
    trigger = make_trigger(KIND, attempts.acquire)
    async with (
        open_host(tmp_path, trigger, run_scheduler=False) as writer,
        open_host(tmp_path, trigger) as owner,
    ):
        await writer._refresh_peers()  # the writer's wake-ups reach the owner from now on
        intent = await writer.get("a").enqueue_trigger(trigger_kind=KIND)
        with anyio.fail_after(10):
            await attempts.event(intent.id).wait()
        signal = attempts.signals[intent.id]

        probe = anyio.Event()
        owner.store.follow_notices("a", "probe", lambda data: probe.set())
        registry = writer.spec.registry
        op_cancel = cancel_op(registry, registry.get(KIND), intent.id, "never committed", None)

        def op(tx: LedgerTx) -> None:
            with contextlib.suppress(RuntimeError), tx.savepoint():
                op_cancel(tx)
                raise RuntimeError("changed my mind")
            tx.insert_event("test.note", None)
            tx.announce("probe", None)  # the same wake-up carries it, after the cancels

        await writer.store.run("a", op)
        with anyio.fail_after(10):
            await probe.wait()  # the owner has handled the whole wake-up
        aborted, reason = signal.aborted, signal.reason
        # Let the attempt settle if it was (wrongly) aborted, to show where that leads.
        if aborted:
            state = await writer.get("a").wait_for_intent(intent.id)
            assert state.status is not IntentStatus.CANCELLED, (
                f"no cancel was ever committed, yet the intent ended cancelled ({reason!r})"
            )
        assert not aborted, f"attempt aborted by a rolled-back cancel: {reason!r}"
        state = await writer.get("a").intent(intent.id)
        assert state.cancel_requested_at is None
        assert state.status is IntentStatus.RUNNING
