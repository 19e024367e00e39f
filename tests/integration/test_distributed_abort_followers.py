"""The task that follows a ``DistributedAbortController``'s signal: it lives exactly as long
as someone holds the controller or the signal, or listens to it; it sleeps until a wake-up
rather than reading the ledger every second; and it still fires the signal when the abort
comes from another host, or when no wake-up arrives at all (the fallback poll)."""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import pytest

from tests.helpers import fast_config, open_host, open_store
from triggers import AbortSignal, DistributedAbortController
from triggers._distributed import _REGISTRY, _TRIGGER, SLOWEST_POLL, _Follower
from triggers._engine import cancel_op

if TYPE_CHECKING:
    from pathlib import Path

    from actors import ActorHost

pytestmark = [pytest.mark.anyio, pytest.mark.contract]


async def settled_tasks() -> int:
    """The number of tasks of the loop, once every task is blocked."""
    await anyio.wait_all_tasks_blocked()
    return len(asyncio.all_tasks())


def followed_actors(host: ActorHost, prefix: str) -> list[str]:
    """Actors starting with ``prefix`` whose notices someone in this process follows."""
    return [actor for actor, _ in host.store._followers if actor.startswith(prefix)]


async def read_and_drop(host: ActorHost, count: int) -> weakref.ref[AbortSignal]:
    """Make ``count`` controllers, read each one's signal in an empty ``scope()`` (the
    review's reproduction), then let go of them all; a weak reference to the last signal."""
    last: weakref.ref[AbortSignal] | None = None
    for index in range(count):
        controller = await DistributedAbortController.create(f"drop:{index}", host=host, ttl=3600)
        with controller.signal.scope():
            pass
        last = weakref.ref(controller.signal)
    assert last is not None
    return last


async def test_followers_of_dropped_controllers_end(tmp_path: Path) -> None:
    """After 200 controllers whose signals were read are dropped, no follower task, notice
    callback or signal of theirs is left: the tasks are as many as before."""
    async with open_host(tmp_path, run_scheduler=False) as host:
        before = await settled_tasks()
        last = await read_and_drop(host, 200)
        gc.collect()
        assert last() is None, "nothing else may hold a signal nobody uses"
        assert await settled_tasks() == before
        assert followed_actors(host, "drop:") == []


async def test_followers_of_held_controllers_stay_until_dropped(tmp_path: Path) -> None:
    """A follower runs while its controller is held (one task each), and ends once it is
    dropped, even with no garbage collection: the last reference going is enough."""
    async with open_host(tmp_path, run_scheduler=False) as host:
        before = await settled_tasks()
        held = [await DistributedAbortController.create(f"held:{i}", host=host) for i in range(5)]
        assert not any(controller.signal.aborted for controller in held)
        assert await settled_tasks() == before + 5
        held.pop()
        assert await settled_tasks() == before + 4
        held.clear()
        assert await settled_tasks() == before
        assert followed_actors(host, "held:") == []


async def test_a_signal_let_go_on_another_thread_ends_its_follower(tmp_path: Path) -> None:
    """The last reference to a signal may go on any thread: its follower still ends, woken
    on the event loop's own thread."""
    async with open_host(tmp_path, run_scheduler=False) as host:
        before = await settled_tasks()
        box = [(await DistributedAbortController.create("thread", host=host)).signal]
        assert await settled_tasks() == before + 1
        seen = weakref.ref(box[0])
        await anyio.to_thread.run_sync(box.clear)
        assert seen() is None
        assert await settled_tasks() == before


async def test_a_listened_signal_outlives_its_controller(tmp_path: Path) -> None:
    """A signal nobody holds but someone listens to, directly or through ``any()``, is kept
    followed (as the web keeps such signals): an abort from another host reaches the
    listener. Once the signal fired, its follower ends."""
    async with (
        open_host(tmp_path, run_scheduler=False) as here,
        open_host(tmp_path, run_scheduler=False) as there,
    ):
        before = await settled_tasks()
        heard = anyio.Event()
        reasons: list[object] = []

        def listener(signal: AbortSignal) -> None:
            reasons.append(signal.reason)
            heard.set()

        (await DistributedAbortController.create("listened", host=here)).signal.add_listener(
            listener
        )
        combined = AbortSignal.any(
            [(await DistributedAbortController.create("combined", host=here)).signal]
        )
        gc.collect()
        assert await settled_tasks() == before + 2
        await (await DistributedAbortController.create("listened", host=there)).abort("stop")
        await (await DistributedAbortController.create("combined", host=there)).abort("halt")
        with anyio.fail_after(10):
            await heard.wait()
            await combined.wait()
        assert (reasons, combined.reason) == (["stop"], "halt")
        assert await settled_tasks() == before


async def test_a_held_signal_fires_on_an_abort_from_another_host(tmp_path: Path) -> None:
    """Holding only the signal (its controller dropped) is interest enough: an abort from
    another host fires it, and its follower then ends."""
    async with (
        open_host(tmp_path, run_scheduler=False) as here,
        open_host(tmp_path, run_scheduler=False) as there,
    ):
        before = await settled_tasks()
        signal = (await DistributedAbortController.create("chat:1", host=here)).signal
        gc.collect()
        assert await settled_tasks() == before + 1
        assert not signal.aborted
        await (await DistributedAbortController.create("chat:1", host=there)).abort("stop")
        with anyio.fail_after(10):
            await signal.wait()
        assert signal.reason == "stop"
        assert await settled_tasks() == before


async def test_an_abort_with_no_wake_up_arrives_by_the_fallback_poll(tmp_path: Path) -> None:
    """An abort written by a bare store, which wakes no other process and announces to no
    one here, still fires the signal: the follower's fallback poll reads it."""
    async with open_host(tmp_path, run_scheduler=False) as host:
        controller = await DistributedAbortController.create("quiet", host=host)
        signal = controller.signal
        await anyio.wait_all_tasks_blocked()
        cancel = cancel_op(_REGISTRY, _TRIGGER, controller.run_id, "behind its back", None)
        async with open_store(tmp_path) as bare:
            await bare.run("quiet", cancel, create=False)
        with anyio.fail_after(10):
            await signal.wait()
        assert signal.reason == "behind its back"


async def test_a_follower_that_nothing_wakes_polls_ever_further_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live follower reads the ledger when woken; with nothing to wake it, its fallback
    polls come ever further apart: from ``poll_interval`` (jittered down by up to a quarter),
    doubling, up to ``SLOWEST_POLL`` (they came every ``poll_interval`` until the TTL).
    The waits are stood in for, so no time passes: each says nothing woke the follower."""
    waits: list[float] = []
    enough = anyio.Event()

    async def nothing_woke(self: _Follower, version: int, seconds: float) -> bool:
        waits.append(seconds)
        if len(waits) >= 12:
            enough.set()
            await anyio.sleep_forever()
        await anyio.lowlevel.checkpoint()
        return False

    monkeypatch.setattr(_Follower, "_woken", nothing_woke)
    config = fast_config(poll_interval=0.5)
    async with open_host(tmp_path, run_scheduler=False, config=config) as here:
        held = await DistributedAbortController.create("live:1", host=here)
        assert not held.signal.aborted
        with anyio.fail_after(10):
            await enough.wait()
        ceilings = [min(0.5 * 2**n, SLOWEST_POLL) for n in range(12)]
        for wait, ceiling in zip(waits, ceilings, strict=True):
            assert 0.75 * ceiling <= wait <= ceiling, (waits, ceilings)
        assert ceilings[-1] == SLOWEST_POLL
        monkeypatch.undo()  # a real wait again: the abort's wake-up still arrives
    async with (
        open_host(tmp_path, run_scheduler=False, config=config) as here,
        open_host(tmp_path, run_scheduler=False) as there,
    ):
        held = await DistributedAbortController.create("live:2", host=here)
        assert not held.signal.aborted
        await (await DistributedAbortController.create("live:2", host=there)).abort("stop")
        with anyio.fail_after(10):
            await held.signal.wait()
        assert held.signal.reason == "stop"
