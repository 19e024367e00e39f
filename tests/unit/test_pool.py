"""The attempt task pool and the slot counter the scheduler is built on."""

from __future__ import annotations

import threading

import anyio
import anyio.lowlevel
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
        pool.close()  # the idle tasks end: the group can end


async def test_pool_job_error_reaches_the_task_group() -> None:
    """A job that raises fails its task group like a task of its own would."""

    async def boom() -> None:
        raise RuntimeError("boom")

    with pytest.raises(ExceptionGroup) as caught:
        async with anyio.create_task_group() as tg:
            TaskPool(tg).start_soon(boom)
    assert caught.group_contains(RuntimeError, match="boom")


async def test_pool_jobs_run_to_their_end_through_the_group_cancellation() -> None:
    """A job given before or after its group was cancelled (an ``after`` callback of a
    transaction that was in flight) runs to its end, checkpoints included: an attempt must
    settle whatever cancels the task around the host. ``close()`` then ends the idle tasks,
    and a job given after it runs on a task that ends with it."""
    ran: list[str] = []
    gate = anyio.Event()

    async def job(name: str) -> None:
        ran.append(f"{name} started")
        await gate.wait()
        await anyio.lowlevel.checkpoint()  # a second checkpoint, shielded too
        ran.append(f"{name} done")

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            pool = TaskPool(tg)
            pool.start_soon(job, "first")
            await anyio.wait_all_tasks_blocked()
            tg.cancel_scope.cancel()
            with anyio.CancelScope(shield=True):
                pool.start_soon(job, "late")
                await anyio.wait_all_tasks_blocked()
                assert ran == ["first started", "late started"]
                gate.set()
                await anyio.wait_all_tasks_blocked()
                assert ran[2:] == ["first done", "late done"]
                pool.start_soon(job, "idle task reused")  # on the task "first" left idle
                await anyio.wait_all_tasks_blocked()
                pool.close()
                pool.start_soon(job, "after close")
    assert ran[4:] == [
        "idle task reused started",
        "idle task reused done",
        "after close started",
        "after close done",
    ]


async def test_pool_close_ends_the_idle_tasks() -> None:
    """The group's cancellation does not end the idle tasks (they are shielded); ``close()``
    does, so the group can end."""
    gate = anyio.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            pool = TaskPool(tg)
            pool.start_soon(gate.wait)
            pool.start_soon(gate.wait)
            await anyio.wait_all_tasks_blocked()
            gate.set()
            await anyio.wait_all_tasks_blocked()
            alive = len(anyio.get_running_tasks())
            tg.cancel_scope.cancel()
            with anyio.CancelScope(shield=True):
                await anyio.wait_all_tasks_blocked()
                assert len(anyio.get_running_tasks()) == alive
                pool.close()
                await anyio.wait_all_tasks_blocked()
                assert len(anyio.get_running_tasks()) == alive - 2


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
