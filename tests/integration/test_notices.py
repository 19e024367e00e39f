"""Notices (``LedgerTx.announce``): committed news delivered to followers at once, here and in
other processes, and never for writes that rolled back; and the wake-up that carries them,
trusted only when the kernel vouches for its sender."""

from __future__ import annotations

import os
import socket
import struct
import threading
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from actors._wakeup import SUPPORTED, Message
from ledger import JSON, LedgerStore, LedgerTx
from tests.helpers import open_host, open_store
from triggers import DistributedAbortController

if TYPE_CHECKING:
    from pathlib import Path

    from actors import ActorHost

pytestmark = pytest.mark.anyio


def announcing(topic: str, data: JSON) -> Any:
    def op(tx: LedgerTx) -> str:
        tx.insert_event("test.note", None)
        tx.announce(topic, data)
        return "done"

    return op


@pytest.mark.contract
async def test_follower_hears_a_notice_before_the_writer_hears_its_answer(
    tmp_path: Path,
) -> None:
    async with open_store(tmp_path) as store:
        heard: list[tuple[JSON, bool]] = []
        answered = False
        store.follow_notices("a", "topic", lambda data: heard.append((data, answered)))
        assert await store.run("a", announcing("topic", {"n": 1})) == "done"
        answered = True
        assert heard == [({"n": 1}, False)]
        await store.run("a", announcing("other", 2))
        await store.run("b", announcing("topic", 3))
        assert heard == [({"n": 1}, False)]


@pytest.mark.contract
async def test_no_notice_for_a_write_that_rolled_back(tmp_path: Path) -> None:
    """An operation that fails, or a savepoint that rolls back, takes its notices with it."""
    async with open_store(tmp_path) as store:
        heard: list[JSON] = []
        store.follow_notices("a", "t", heard.append)

        def failing(tx: LedgerTx) -> None:
            tx.announce("t", "lost")
            raise RuntimeError("no")

        def partly(tx: LedgerTx) -> None:
            try:
                with tx.savepoint():
                    tx.announce("t", "undone")
                    raise ValueError("inner")
            except ValueError:
                pass
            tx.announce("t", "kept")

        with pytest.raises(RuntimeError):
            await store.run("a", failing)
        await store.run("a", partly)
        assert heard == ["kept"]

        # In a batch, a failing operation's notices go; its neighbours' stay.
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.run, "a", announcing("t", "first"))
            tg.start_soon(_expect_error, store, failing)
            tg.start_soon(store.run, "a", announcing("t", "last"))
        assert sorted(map(str, heard)) == ["first", "kept", "last"]


async def _expect_error(store: Any, fn: Any) -> None:
    with pytest.raises(RuntimeError):
        await store.run("a", fn)


@pytest.mark.contract
async def test_stop_following_and_follower_errors(tmp_path: Path) -> None:
    """A follower that raises is logged and does not stop the others or the answer."""
    async with open_store(tmp_path) as store:
        heard: list[JSON] = []

        def broken(data: JSON) -> None:
            raise RuntimeError("follower bug")

        store.follow_notices("a", "t", broken)
        stop = store.follow_notices("a", "t", heard.append)
        assert await store.run("a", announcing("t", 1)) == "done"
        stop()
        stop()  # twice is harmless
        await store.run("a", announcing("t", 2))
        assert heard == [1]


@pytest.mark.contract
async def test_announce_refuses_what_could_not_travel(tmp_path: Path) -> None:
    async with open_store(tmp_path) as store:

        def bad(tx: LedgerTx) -> None:
            tx.announce("t", {"x": float("nan")})

        with pytest.raises(ValueError, match="JSON"):
            await store.run("a", bad)
        with pytest.raises(ValueError, match="NUL"):
            await store.run("a", lambda tx: tx.announce("t\0", 1))


@pytest.mark.contract
async def test_another_process_hears_the_notice(tmp_path: Path) -> None:
    """Two hosts on one place are two processes in its registry: the writer's wake-up carries
    the notice, and the other host hands it to its follower."""
    async with (
        open_host(tmp_path, run_scheduler=False) as writer,
        open_host(tmp_path, run_scheduler=False) as reader,
    ):
        await writer.store.run("a", announcing("setup", None))  # the ledger exists for both
        # Wake-ups go to the peers the writer knows: make sure it has read the registry since
        # the reader joined (the reader's hello only starts that read).
        await writer._refresh_peers()
        heard = anyio.Event()
        got: list[JSON] = []

        def follower(data: JSON) -> None:
            got.append(data)
            heard.set()

        reader.store.follow_notices("a", "t", follower)
        await writer.store.run("a", announcing("t", {"reason": "stop"}))
        with anyio.fail_after(10):
            await heard.wait()
        assert got == [{"reason": "stop"}]


@pytest.mark.contract
async def test_an_abort_fires_a_local_signal_before_abort_returns(tmp_path: Path) -> None:
    """The signal follows the controller's notice: no re-read stands between the abort's
    commit and the signal (reading it again still finds the same reason)."""
    async with open_host(tmp_path, run_scheduler=False) as host:
        controller = await DistributedAbortController.create("job", host=host)
        signal = controller.signal
        await anyio.wait_all_tasks_blocked()
        assert not signal.aborted
        await controller.abort("user pressed stop")
        assert signal.aborted
        assert signal.reason == "user pressed stop"
        again = await DistributedAbortController.create("job", host=host)
        with anyio.fail_after(10):
            await again.signal.wait()
        assert again.signal.reason == "user pressed stop"


@pytest.mark.contract
async def test_commit_hooks_run_before_the_answer(tmp_path: Path) -> None:
    """A commit hook sees each committed batch before its writers are answered (on SQLite,
    on the shard's worker thread)."""
    async with open_store(tmp_path) as store:
        seen: list[tuple[list[str], int]] = []
        store.add_commit_hook(
            lambda committed: seen.append(([c.actor_id for c in committed], threading.get_ident()))
        )

        def op(tx: LedgerTx) -> int:
            tx.insert_event("test.note", None)
            return len(seen)

        assert await store.run("a", op) == 0
        assert [actors for actors, _ in seen] == [["a"]]
        if isinstance(store, LedgerStore):
            assert seen[0][1] != threading.get_ident()


# -- the transport's trust -------------------------------------------------------------------


def _send(host: ActorHost, message: Message, uid: int | None = None) -> None:
    """Send ``message`` to ``host`` from a bare socket; as ``uid`` if given (needs root)."""
    address = host._wake.address if host._wake is not None else None
    assert address is not None
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        ancillary = []
        if uid is not None:
            credentials = struct.pack("iII", os.getpid(), uid, uid)
            ancillary = [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, credentials)]
        sock.sendmsg([message.encode()], ancillary, 0, "\0" + address)


async def _received(host: ActorHost, actor_id: str, version: int) -> None:
    with anyio.fail_after(10):
        await host.store.wait_changed(actor_id, version)


@pytest.mark.skipif(not SUPPORTED, reason="wake-up sockets are Linux-only")
async def test_a_verified_datagram_of_the_same_user_is_trusted(tmp_path: Path) -> None:
    async with open_host(tmp_path, run_scheduler=False) as host:
        got: list[JSON] = []
        host.store.follow_notices("a", "t", got.append)
        version = host.store.version("a")
        _send(host, Message(changed=["a"], notices=[("a", "t", "same user")], verified=True))
        await _received(host, "a", version)
        assert got == ["same user"]


@pytest.mark.skipif(not SUPPORTED, reason="wake-up sockets are Linux-only")
@pytest.mark.skipif(os.geteuid() != 0, reason="sending as another user needs root")
async def test_a_datagram_of_another_user_is_only_a_hint(tmp_path: Path) -> None:
    """Anyone on the machine can reach the socket: a datagram whose sender the kernel says is
    another user wakes readers (who re-read) but its notices are not believed."""
    async with open_host(tmp_path, run_scheduler=False) as host:
        got: list[JSON] = []
        host.store.follow_notices("a", "t", got.append)
        version = host.store.version("a")
        forged = Message(changed=["a"], notices=[("a", "t", "forged")], verified=True)
        _send(host, forged, uid=65534)
        await _received(host, "a", version)
        assert got == []
        version = host.store.version("a")
        _send(host, Message(changed=["a"], notices=[("a", "t", "root")], verified=True), uid=0)
        await _received(host, "a", version)
        assert got == ["root"]
