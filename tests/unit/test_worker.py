"""The shard worker thread: in order, errors carried back, and no cancelling out of a call."""

from __future__ import annotations

import threading

import anyio
import anyio.lowlevel
import pytest

from ledger._worker import Worker

pytestmark = pytest.mark.anyio


async def test_runs_in_order_on_its_own_thread() -> None:
    worker = Worker("test-worker")
    try:
        seen: list[tuple[int, int]] = []

        def step(n: int) -> int:
            seen.append((n, threading.get_ident()))
            return n * 2

        async with anyio.create_task_group() as tg:
            for n in range(20):
                tg.start_soon(worker.run, step, n)
        assert [n for n, _ in seen] == list(range(20))
        assert {ident for _, ident in seen} == {seen[0][1]}
        assert seen[0][1] != threading.get_ident()
        assert await worker.run(step, 21) == 42
    finally:
        await worker.stop()


async def test_errors_are_raised_to_the_caller() -> None:
    worker = Worker("test-worker")
    try:

        def fail() -> None:
            raise KeyError("missing")

        with pytest.raises(KeyError, match="missing"):
            await worker.run(fail)
        assert await worker.run(lambda: "still serving") == "still serving"
    finally:
        await worker.stop()


async def test_a_cancelled_caller_still_sees_its_call_finish() -> None:
    """Cancelling the caller does not abandon the call: it runs to the end, then the
    cancellation takes effect (as with ``anyio.to_thread.run_sync``)."""
    worker = Worker("test-worker")
    try:
        entered = threading.Event()
        release = threading.Event()
        finished: list[str] = []

        def slow() -> str:
            entered.set()
            release.wait(10)
            finished.append("done")
            return "done"

        async with anyio.create_task_group() as tg:
            with anyio.CancelScope() as scope:

                async def cancel_when_running() -> None:
                    await anyio.to_thread.run_sync(entered.wait, 10)
                    scope.cancel()
                    await anyio.wait_all_tasks_blocked()
                    release.set()

                tg.start_soon(cancel_when_running)
                await worker.run(slow)
                await anyio.lowlevel.checkpoint()
                pytest.fail("the cancellation should take effect once the call returned")
        assert scope.cancelled_caught
        assert finished == ["done"]
    finally:
        await worker.stop()


async def test_stop_finishes_what_was_submitted() -> None:
    worker = Worker("test-worker")
    done: list[int] = []
    async with anyio.create_task_group() as tg:
        for n in range(5):
            tg.start_soon(worker.run, done.append, n)
        await anyio.wait_all_tasks_blocked()
        await worker.stop()
    assert done == list(range(5))
