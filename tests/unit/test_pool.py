"""The attempt task pool and the slot counter the scheduler is built on."""

from __future__ import annotations

import threading

import anyio
import pytest

from triggers._pool import TaskPool
from triggers._slots import Slots

pytestmark = pytest.mark.anyio


async def test_pool_reuses_idle_tasks() -> None:
    """Sequential jobs run on one task; concurrent jobs get one task each, never more."""
    tasks: set[object] = set()
    done = 0

    async def job(release: anyio.Event | None) -> None:
        nonlocal done
        tasks.add(anyio.get_current_task().id)
        if release is not None:
            await release.wait()
        done += 1

    async with anyio.create_task_group() as tg:
        pool = TaskPool(tg)
        for _ in range(5):
            pool.start_soon(job, None)
            await anyio.wait_all_tasks_blocked()
        assert (done, len(tasks)) == (5, 1)
        gates = [anyio.Event() for _ in range(3)]
        for gate in gates:
            pool.start_soon(job, gate)
        await anyio.wait_all_tasks_blocked()
        assert len(tasks) == 3, "two new tasks for two more concurrent jobs, one reused"
        for gate in gates:
            gate.set()
        await anyio.wait_all_tasks_blocked()
        assert done == 8
        tg.cancel_scope.cancel()


async def test_pool_job_error_reaches_the_task_group() -> None:
    """A job that raises fails its task group like a task of its own would."""

    async def boom() -> None:
        raise RuntimeError("boom")

    with pytest.raises(ExceptionGroup) as caught:
        async with anyio.create_task_group() as tg:
            TaskPool(tg).start_soon(boom)
    assert caught.group_contains(RuntimeError, match="boom")


async def test_pool_takes_a_job_while_its_group_is_cancelled() -> None:
    """A job given after the group was cancelled (an ``after`` callback of a transaction that
    was in flight) does not raise: the idle tasks are gone, so it gets a task of its own,
    which runs until its first checkpoint, as any task started in a cancelled group."""
    ran: list[str] = []

    async def job(name: str) -> None:
        ran.append(name)

    async with anyio.create_task_group() as tg:
        pool = TaskPool(tg)
        pool.start_soon(job, "first")
        await anyio.wait_all_tasks_blocked()
        assert ran == ["first"]  # its task now waits, idle
        tg.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            await anyio.wait_all_tasks_blocked()  # the idle task has been cancelled
            pool.start_soon(job, "late")
    assert ran == ["first", "late"]


def test_slots_never_go_below_zero_across_threads() -> None:
    """take() hands out at most the free slots, whichever threads take and give."""
    slots = Slots(10)
    assert slots.take(4) == 4
    assert slots.take(10) == 6
    assert slots.take(1) == 0
    taken: list[int] = []

    def worker() -> None:
        for _ in range(1000):
            slots.give(1)
            taken.append(slots.take(1))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert slots.free == 0
    assert sum(taken) == 4000
