"""``agent.call``: call handles, their signal and abort, merged external signals, composite
signals, and the difference between cancelling the wait and cancelling the work."""

from __future__ import annotations

import inspect
import sqlite3
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import pytest
import structlog
from anyio.lowlevel import checkpoint

from actors import CallHandle, HostClosedError
from ledger import IntentStatus, ledger_relpath
from tests.helpers import CANCELLED, DONE, FAILED, Gate, make_trigger, open_host
from triggers import (
    AbortController,
    AbortError,
    AbortSignal,
    CancelStatus,
    FatalError,
    IntentRejectedError,
    TriggerContext,
    TriggerFailedError,
    UnknownTriggerError,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, MutableMapping
    from pathlib import Path

    from actors import Agent

pytestmark = [pytest.mark.anyio, pytest.mark.contract]

KIND = "test.work"
LATER = datetime(2100, 1, 1, tzinfo=UTC)


async def settle(handle: CallHandle) -> Any:
    """Await a handle (bounded), returning the facts or the error it raised."""
    with anyio.fail_after(10):
        try:
            return await handle
        except (AbortError, TriggerFailedError) as exc:
            return exc


async def test_call_returns_a_handle_at_once_and_records_the_intent(tmp_path: Path) -> None:
    """``call`` is not a coroutine: it returns a handle, and the intent is recorded without
    anyone awaiting the handle."""
    gate = Gate()
    async with open_host(tmp_path, make_trigger(KIND, gate.acquire)) as host:
        agent = host.get("a")
        handle = agent.call(trigger_kind=KIND, payload={"n": 1})
        assert isinstance(handle, CallHandle)
        assert not inspect.iscoroutine(handle)
        assert inspect.isawaitable(handle)
        assert handle.intent_event_id is None
        # Nobody awaits the handle: the intent is still recorded and its attempt starts.
        intent_id = await handle.wait_recorded()
        assert handle.intent_event_id == intent_id
        await gate.wait_started(intent_id)
        assert (await agent.intent(intent_id)).status is IntentStatus.RUNNING
        gate.open(intent_id)
        facts = await settle(handle)
        assert handle.done()
        assert facts == await agent.events(intent_event_id=intent_id, after=intent_id)
        assert [(e.kind, e.payload) for e in facts] == [(DONE, {"intent": {"n": 1}, "attempt": 1})]
        assert not handle.signal.aborted
        assert await handle == facts  # awaiting again gives the same facts


async def test_abort_of_running_work_cancels_it(tmp_path: Path) -> None:
    """``handle.abort(reason)`` of running work answers requested, fires the handle's signal
    before it returns, and the await raises AbortError carrying the reason."""
    gate = Gate()
    async with open_host(tmp_path, make_trigger(KIND, gate.acquire)) as host:
        agent = host.get("a")
        handle = agent.call(trigger_kind=KIND)
        await gate.wait_started(await handle.wait_recorded())
        result = await handle.abort("user-cancel")
        assert result.status is CancelStatus.REQUESTED
        assert result.intent_event_id == handle.intent_event_id
        assert handle.signal.aborted
        assert handle.signal.reason == "user-cancel"
        error = await settle(handle)
        assert isinstance(error, AbortError)
        assert error.reason == "user-cancel"
        assert "user-cancel" in str(error)
        state = await agent.intent(result.intent_event_id)
        assert (state.status, state.cancel_reason) == (IntentStatus.CANCELLED, "user-cancel")
        cancelled = await agent.events(kinds=[CANCELLED])
        assert [e.payload for e in cancelled] == [{"reason": "user-cancel"}]


async def test_abort_of_pending_work_cancels_it_at_once(tmp_path: Path) -> None:
    """Aborting a call due later answers cancelled (commit_cancelled ran in the abort)."""
    async with open_host(tmp_path, make_trigger(KIND)) as host:
        handle = host.get("a").call(trigger_kind=KIND, at=LATER)
        result = await handle.abort("not needed")
        assert result.status is CancelStatus.CANCELLED
        assert result.terminal_status is IntentStatus.CANCELLED
        assert handle.signal.reason == "not needed"
        error = await settle(handle)
        assert isinstance(error, AbortError)
        assert error.reason == "not needed"


async def test_abort_right_after_call_waits_for_the_record(tmp_path: Path) -> None:
    """An abort issued before the intent is recorded waits for it, then cancels it."""
    async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as host:
        handle = host.get("a").call(trigger_kind=KIND)
        assert handle.intent_event_id is None
        result = await handle.abort("changed my mind")
        assert result.status is CancelStatus.CANCELLED
        assert isinstance(await settle(handle), AbortError)


async def test_second_abort_keeps_the_first_reason(tmp_path: Path) -> None:
    """A second abort answers requested again; the first reason stays the recorded one and
    the one on the signal and the error."""
    gate = Gate()
    async with open_host(tmp_path, make_trigger(KIND, gate.acquire)) as host:
        agent = host.get("a")
        other = host.get("a")
        handle = agent.call(trigger_kind=KIND)
        intent_id = await handle.wait_recorded()
        await gate.wait_started(intent_id)
        first = await other.cancel_trigger(
            trigger_kind=KIND, intent_event_id=intent_id, reason="first"
        )
        assert first.status is CancelStatus.REQUESTED
        second = await handle.abort("second")
        assert second.status in (CancelStatus.REQUESTED, CancelStatus.ALREADY_COMPLETED)
        assert handle.signal.reason == "first"
        error = await settle(handle)
        assert isinstance(error, AbortError)
        assert error.reason == "first"


async def test_signal_fires_when_someone_else_cancels(tmp_path: Path) -> None:
    """A cancel through ``cancel_trigger`` by another host object (another client of the same
    data directory) fires the handle's signal and makes the await raise AbortError."""
    gate = Gate()
    async with open_host(tmp_path, make_trigger(KIND, gate.acquire)) as host:
        handle = host.get("a").call(trigger_kind=KIND)
        intent_id = await handle.wait_recorded()
        await gate.wait_started(intent_id)
        async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as client:
            result = await client.get("a").cancel_trigger(
                trigger_kind=KIND, intent_event_id=intent_id, reason="from elsewhere"
            )
            assert result.status is CancelStatus.REQUESTED
            with anyio.fail_after(10):
                await handle.signal.wait()
        assert handle.signal.reason == "from elsewhere"
        error = await settle(handle)
        assert isinstance(error, AbortError)
        assert error.reason == "from elsewhere"


async def test_failed_intent_raises_trigger_failed_error(tmp_path: Path) -> None:
    """A failed intent makes the await raise TriggerFailedError with the failure fact."""

    async def acquire(intent: Any, ctx: TriggerContext) -> Any:
        raise FatalError("provider said no")

    async with open_host(tmp_path, make_trigger(KIND, acquire)) as host:
        handle = host.get("a").call(trigger_kind=KIND)
        error = await settle(handle)
        assert isinstance(error, TriggerFailedError)
        assert (error.failure.error_type, error.failure.message) == (
            "FatalError", "provider said no",
        )  # fmt: skip
        assert error.failure.attempts == 1
        assert [e.kind for e in error.facts] == [FAILED, "trigger.failed"]
        assert "provider said no" in str(error)
        assert not handle.signal.aborted


async def test_cancelling_the_wait_does_not_cancel_the_work(tmp_path: Path) -> None:
    """Cancelling the awaiting task's scope stops only that wait: the intent keeps running,
    completes, and the handle can be awaited again for its facts."""
    gate = Gate()
    async with open_host(tmp_path, make_trigger(KIND, gate.acquire)) as host:
        agent = host.get("a")
        handle = agent.call(trigger_kind=KIND)
        intent_id = await handle.wait_recorded()
        await gate.wait_started(intent_id)
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(handle.result)
                await anyio.wait_all_tasks_blocked()
                scope.cancel()
        assert scope.cancelled_caught
        state = await agent.intent(intent_id)
        assert state.status is IntentStatus.RUNNING
        assert state.cancel_requested_at is None
        assert not handle.signal.aborted
        gate.open(intent_id)
        facts = await settle(handle)
        assert [e.kind for e in facts] == [DONE]


async def test_external_signal_cancels_the_work_durably(tmp_path: Path) -> None:
    """Aborting the ``signal=`` given to ``call`` cancels the intent through cancel_trigger:
    the cancel and its reason are in the ledger, and the await raises AbortError."""
    gate = Gate()
    async with open_host(tmp_path, make_trigger(KIND, gate.acquire)) as host:
        agent = host.get("a")
        controller = AbortController()
        handle = agent.call(trigger_kind=KIND, signal=controller.signal)
        intent_id = await handle.wait_recorded()
        await gate.wait_started(intent_id)
        controller.abort("user-requested-stop")
        error = await settle(handle)
        assert isinstance(error, AbortError)
        assert error.reason == "user-requested-stop"
        assert handle.signal.reason == "user-requested-stop"
        state = await agent.intent(intent_id)
        assert (state.status, state.cancel_reason) == (
            IntentStatus.CANCELLED, "user-requested-stop",
        )  # fmt: skip
        requested = await agent.events(kinds=["trigger.cancel_requested"])
        assert [e.payload["reason"] for e in requested] == ["user-requested-stop"]
        assert controller.signal._listener_count() == 0


async def test_external_abort_before_the_record_still_cancels(tmp_path: Path) -> None:
    """An external abort that lands while the intent is being recorded is not lost."""
    async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as host:
        controller = AbortController()
        handle = host.get("a").call(trigger_kind=KIND, signal=controller.signal)
        controller.abort("early")
        error = await settle(handle)
        assert isinstance(error, AbortError)
        assert error.reason == "early"
        state = await host.get("a").intent(await handle.wait_recorded())
        assert state.status is IntentStatus.CANCELLED


async def test_pre_aborted_signal_writes_nothing(tmp_path: Path) -> None:
    """An already aborted signal raises AbortError from ``call`` itself, before anything is
    written: the actor gets no ledger file at all."""
    async with open_host(tmp_path, make_trigger(KIND)) as host:
        agent = host.get("fresh-actor")
        with pytest.raises(AbortError) as caught:
            agent.call(trigger_kind=KIND, signal=AbortSignal.abort("already done"))
        assert caught.value.reason == "already done"
        await anyio.wait_all_tasks_blocked()
        assert not (tmp_path / ledger_relpath("fresh-actor")).exists()
        assert await agent.intents() == []


async def test_composite_signal_external_side(tmp_path: Path) -> None:
    """``AbortSignal.any([external, timeout])``: the external abort cancels with its reason."""
    gate = Gate()
    async with open_host(tmp_path, make_trigger(KIND, gate.acquire)) as host:
        external = AbortController()
        combined = AbortSignal.any([external.signal, AbortSignal.timeout(3600)])
        handle = host.get("a").call(trigger_kind=KIND, signal=combined)
        await gate.wait_started(await handle.wait_recorded())
        external.abort("user-requested-stop")
        error = await settle(handle)
        assert isinstance(error, AbortError)
        assert error.reason == "user-requested-stop"


async def test_composite_signal_timeout_side(tmp_path: Path) -> None:
    """``AbortSignal.any([external, timeout])``: the timeout cancels the work, and the
    recorded reason says it timed out."""
    async with open_host(tmp_path, make_trigger(KIND, Gate().acquire)) as host:
        external = AbortController()
        combined = AbortSignal.any([external.signal, AbortSignal.timeout(0.05)])
        handle = host.get("a").call(trigger_kind=KIND, signal=combined)
        error = await settle(handle)
        assert isinstance(error, AbortError)
        assert error.reason == "signal timed out after 0.05s"


async def test_ignored_trigger_completes_despite_the_signal(tmp_path: Path) -> None:
    """A trigger that ignores cancellation completes even when the call's signal aborts; the
    handle's signal does not fire."""
    gate = Gate()
    trigger = make_trigger(KIND, gate.acquire, cancellation="ignored")
    async with open_host(tmp_path, trigger) as host:
        controller = AbortController()
        handle = host.get("a").call(trigger_kind=KIND, signal=controller.signal)
        intent_id = await handle.wait_recorded()
        await gate.wait_started(intent_id)
        controller.abort("stop")
        assert (await handle.abort("stop")).status is CancelStatus.IGNORED
        gate.open(intent_id)
        facts = await settle(handle)
        assert [e.kind for e in facts] == [DONE]
        assert not handle.signal.aborted


async def test_completion_that_wins_the_race_is_returned(tmp_path: Path) -> None:
    """Work that completes despite a cancel request is returned as completed; the handle's
    signal did fire for the request."""
    started = anyio.Event()
    finish = anyio.Event()

    async def stubborn(intent: Any, ctx: TriggerContext) -> Any:
        started.set()
        await finish.wait()
        return "done anyway"

    async with open_host(tmp_path, make_trigger(KIND, stubborn)) as host:
        handle = host.get("a").call(trigger_kind=KIND)
        await started.wait()
        assert (await handle.abort("too late")).status is CancelStatus.REQUESTED
        finish.set()
        facts = await settle(handle)
        assert [(e.kind, e.payload) for e in facts if e.kind == DONE] == [(DONE, "done anyway")]
        assert handle.signal.reason == "too late"


async def test_bad_calls_raise_at_once_and_write_nothing(tmp_path: Path) -> None:
    """Unknown kinds, rejected payloads and non-signals raise from ``call`` itself."""

    def positive(payload: Any) -> Any:
        if not (isinstance(payload, int) and payload > 0):
            raise ValueError("must be a positive int")
        return payload

    trigger = make_trigger(KIND, parse_intent=positive)
    async with open_host(tmp_path, trigger) as host:
        agent = host.get("a")
        with pytest.raises(UnknownTriggerError) as unknown:
            agent.call(trigger_kind="nope")
        # The hint names the user's kinds, not the framework's own (``trigger.`` kinds).
        assert str(unknown.value).endswith(f"registered kinds: {KIND}")
        with pytest.raises(IntentRejectedError):
            agent.call(trigger_kind=KIND, payload=-1)
        with pytest.raises(TypeError, match="AbortSignal"):
            agent.call(trigger_kind=KIND, payload=1, signal="stop")  # type: ignore[arg-type]
        await checkpoint()
        assert not (tmp_path / ledger_relpath("a")).exists()


async def test_call_outside_a_running_host_is_refused(tmp_path: Path) -> None:
    """``call`` on a host that is not running raises HostClosedError and writes nothing."""
    async with open_host(tmp_path, make_trigger(KIND)) as host:
        agent = host.get("a")
    with pytest.raises(HostClosedError, match="not running"):
        agent.call(trigger_kind=KIND)
    assert not (tmp_path / ledger_relpath("a")).exists()


async def test_host_closing_first_leaves_the_work_durable(tmp_path: Path) -> None:
    """When the host closes before the intent ends, awaiting raises HostClosedError naming
    the intent; the intent itself is intact for the next host."""
    gate = Gate()
    async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as host:
        handle = host.get("a").call(trigger_kind=KIND, at=LATER)
        intent_id = await handle.wait_recorded()
    with pytest.raises(HostClosedError) as caught:
        await settle(handle)
    assert caught.value.intent_event_id == intent_id
    async with open_host(tmp_path, make_trigger(KIND, gate.acquire)) as host:
        agent: Agent = host.get("a")
        assert (await agent.intent(intent_id)).status is IntentStatus.PENDING


async def test_external_abort_is_recorded_even_when_the_host_closes_at_once(
    tmp_path: Path,
) -> None:
    """An external abort that the host has not acted on when it closes is still recorded as a
    durable cancel on the way out: the next host finds the intent cancelled."""
    async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as host:
        controller = AbortController()
        handle = host.get("a").call(trigger_kind=KIND, at=LATER, signal=controller.signal)
        intent_id = await handle.wait_recorded()
        controller.abort("user closed the tab")
    async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as host:
        state = await host.get("a").intent(intent_id)
        assert (state.status, state.cancel_reason) == (
            IntentStatus.CANCELLED, "user closed the tab",
        )  # fmt: skip


async def test_host_closing_during_the_record_keeps_the_id(tmp_path: Path) -> None:
    """A host that closes while the intent is being recorded still gives the handle its id:
    the HostClosedError names the intent that exists."""
    async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as host:
        handle = host.get("a").call(trigger_kind=KIND, at=LATER)
        await checkpoint()  # the record is on its way, not yet answered
    with pytest.raises(HostClosedError) as caught:
        await settle(handle)
    intent_id = caught.value.intent_event_id
    assert intent_id is not None
    assert handle.intent_event_id == intent_id
    async with open_host(tmp_path, make_trigger(KIND), run_scheduler=False) as host:
        assert [i.intent_event_id for i in await host.get("a").intents()] == [intent_id]


@pytest.mark.sqlite_only
async def test_a_locked_ledger_delays_the_cancel_but_does_not_lose_it(tmp_path: Path) -> None:
    """While another process holds the actor's ledger locked, the external abort's cancel
    fails with LedgerBusyError; the handle retries it and, once the lock is gone, the intent
    is cancelled and the await raises AbortError."""
    gate = Gate()
    async with open_host(tmp_path, make_trigger(KIND, gate.acquire), lock_timeout=0.05) as host:
        controller = AbortController()
        handle = host.get("a").call(trigger_kind=KIND, signal=controller.signal)
        intent_id = await handle.wait_recorded()
        await gate.wait_started(intent_id)
        blocker = sqlite3.connect(tmp_path / ledger_relpath("a"), isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            retried = anyio.Event()

            def watch(logger: Any, name: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
                if event.get("event") == "call_follow_retry":
                    retried.set()  # logged on the event loop thread
                raise structlog.DropEvent

            structlog.configure(processors=[watch])
            controller.abort("stop")
            with anyio.fail_after(10):
                await retried.wait()
            assert not handle.done()
        finally:
            structlog.reset_defaults()
            blocker.execute("ROLLBACK")
            blocker.close()
        error = await settle(handle)
        assert isinstance(error, AbortError)
        assert error.reason == "stop"


async def test_calls_with_one_idempotency_key_follow_one_intent(tmp_path: Path) -> None:
    """A retried ``call`` with the same idempotency key follows the intent the first one
    started (the work runs once); another key starts other work."""
    gate = Gate()
    async with open_host(tmp_path, make_trigger(KIND, gate.acquire)) as host:
        agent = host.get("a")
        first = agent.call(trigger_kind=KIND, payload={"n": 1}, idempotency_key="req-1")
        intent_id = await first.wait_recorded()
        again = agent.call(trigger_kind=KIND, payload={"n": 1}, idempotency_key="req-1")
        assert await again.wait_recorded() == intent_id
        other = agent.call(trigger_kind=KIND, payload={"n": 2}, idempotency_key="req-2")
        other_id = await other.wait_recorded()
        assert other_id != intent_id
        gate.open(intent_id)
        gate.open(other_id)
        assert await settle(first) == await settle(again)
        assert len(await agent.intents()) == 2
        with pytest.raises(TypeError, match="idempotency_key"):
            agent.call(trigger_kind=KIND, idempotency_key=5)  # type: ignore[arg-type]
