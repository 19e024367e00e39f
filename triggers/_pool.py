"""A pool of long-lived tasks that run attempts (a task spawn costs more than a no-op attempt)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

Job = tuple[Callable[..., Awaitable[None]], tuple[Any, ...]]


class _Idle:
    """An idle task's mailbox: the job it is given, and the future that wakes it."""

    __slots__ = ("job", "wake")

    def __init__(self, wake: asyncio.Future[None]) -> None:
        self.wake = wake
        self.job: Job | None = None


class TaskPool:
    """Runs ``await fn(*args)`` jobs on tasks of ``task_group``, reusing idle ones.

    A job goes to an idle task when there is one, else to a new task; tasks are never more
    than the peak number of jobs running at once, and they live within the task group
    (structured concurrency: nothing outlives it). A job that raises brings the group down,
    as a task of its own would.

    The tasks are shielded from the group's cancellation: a job, once given, runs to its
    end (an attempt must settle whatever cancels the task around the host; its own cancel
    scope is how it is cut short). ``close()`` ends the idle tasks; call it before the
    group's end, or the group waits for them.
    """

    __slots__ = ("_closed", "_idle", "_tg")

    def __init__(self, task_group: TaskGroup) -> None:
        self._tg = task_group
        self._idle: list[_Idle] = []
        self._closed = False

    def close(self) -> None:
        """End the idle tasks; a job given later runs on a task that ends after it."""
        self._closed = True
        idle, self._idle = self._idle, []
        for entry in idle:
            if not entry.wake.done():
                entry.wake.set_result(None)  # no job: the task ends

    def start_soon(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run ``fn(*args)`` on an idle task or a new one."""
        if self._idle:
            idle = self._idle.pop()
            idle.job = (fn, args)
            idle.wake.set_result(None)
            return
        self._tg.start_soon(self._work, (fn, args))

    async def _work(self, job: Job) -> None:
        # A bare asyncio future per wait (the pool runs on asyncio, as the store does):
        # anyio's Event costs several times more, once per attempt.
        loop = asyncio.get_running_loop()
        with anyio.CancelScope(shield=True):
            while True:
                fn, args = job
                await fn(*args)
                if self._closed:
                    return
                idle = _Idle(loop.create_future())
                self._idle.append(idle)
                await idle.wake
                if idle.job is None:
                    return  # closed
                job = idle.job
