"""Run synchronous ledger code over an async driver, on the event loop, without threads.

The trigger engine's operations are synchronous functions of a ``LedgerTx`` (they never
await, so a batch of them runs in one go). For PostgreSQL the driver is asyncpg, which only
awaits. ``run_bridged`` runs the synchronous function in a greenlet; each statement it issues
through ``wait_for`` switches back to the calling coroutine, which awaits the driver and
switches the result (or the error) back in. No thread hop, one event loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar, cast

import greenlet

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

T = TypeVar("T")


class _Bridged(greenlet.greenlet):  # type: ignore[misc]  # greenlet ships no types
    """A greenlet running synchronous code whose awaits are done by its parent."""


async def run_bridged(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)``; every ``wait_for(awaitable)`` inside it is awaited here."""
    child = _Bridged(fn)
    request = child.switch(*args)
    while not child.dead:
        try:
            value = await cast("Awaitable[Any]", request)
        except BaseException as exc:
            request = child.throw(exc)
        else:
            request = child.switch(value)
    return cast("T", request)


def wait_for(awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` from synchronous code running under ``run_bridged``.

    Raises:
        RuntimeError: called outside ``run_bridged`` (the awaitable is closed unawaited).
    """
    current = greenlet.getcurrent()
    if not isinstance(current, _Bridged):
        close = getattr(awaitable, "close", None)
        if close is not None:
            close()
        raise RuntimeError("wait_for() called outside run_bridged()")
    return cast("T", current.parent.switch(awaitable))
