"""A pool of long-lived tasks that run attempts (a task spawn costs more than a no-op attempt)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

Job = tuple[Callable[..., Awaitable[None]], tuple[Any, ...]]


class _Idle:
    __slots__ = ("event", "job")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.job: Job | None = None


class TaskPool:
    """Runs ``await fn(*args)`` jobs on tasks of ``task_group``, reusing idle ones.

    A job goes to an idle task when there is one, else to a new task; tasks are never more
    than the peak number of jobs running at once, and they live and die with the task group
    (structured concurrency: nothing outlives it). A job that raises brings the group down,
    as a task of its own would.
    """

    __slots__ = ("_idle", "_tg")

    def __init__(self, task_group: TaskGroup) -> None:
        self._tg = task_group
        self._idle: list[_Idle] = []

    def start_soon(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run ``fn(*args)`` on an idle task or a new one."""
        if self._idle:
            idle = self._idle.pop()
            idle.job = (fn, args)
            idle.event.set()
        else:
            self._tg.start_soon(self._work, (fn, args))

    async def _work(self, job: Job) -> None:
        while True:
            fn, args = job
            await fn(*args)
            idle = _Idle()
            self._idle.append(idle)
            await idle.event.wait()
            assert idle.job is not None
            job = idle.job
