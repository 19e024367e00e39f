"""PostgreSQL outages and connection trouble while a host runs: nothing that goes wrong with
the server may end the host, hang it or leak what it holds.

Each test runs against the session's real server (``postgres_server``), which it halts,
restarts or pauses itself. Reconnect windows are shortened with ``monkeypatch`` to keep the
tests fast; methods of the host are wrapped only to know when something happened, or to
start an outage at a chosen moment.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from actors import ActorHost, define_agent_do
from ledger import LedgerWriteError, ProcessInfo
from tests.helpers import DONE, TERMINAL_KINDS, Gate, fast_config, make_trigger

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.postgres import PostgresServer

pytestmark = [pytest.mark.anyio, pytest.mark.reliability]

KIND = "test.work"


def _ensure_running(server: PostgresServer) -> None:
    """Start the server again unless it runs."""
    try:
        server._run(server.bindir / "pg_ctl", "-D", server.data, "status")
    except RuntimeError:  # not running
        server.resume()


@pytest.fixture(autouse=True)
def _server_up_afterwards(postgres_server: PostgresServer) -> Iterator[None]:
    """A test that failed while the session's server was down leaves it running again."""
    yield
    _ensure_running(postgres_server)


async def _resume(server: PostgresServer) -> None:
    """Start the server again (unless it runs), also from a cancelled scope: a host that
    ended on an error cancels the test's body."""
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(_ensure_running, server)


def _short_reconnects(monkeypatch: pytest.MonkeyPatch) -> None:
    from ledger import _pg

    monkeypatch.setattr(_pg, "_RECONNECT_S", 0.2)  # a reconnect gives up after about 1.2 s


async def _run_one(host: ActorHost, actor: str = "chat") -> int:
    agent = host.get(actor)
    intent = await agent.enqueue_trigger(trigger_kind=KIND)
    with anyio.fail_after(20):
        assert (await agent.wait_for_intent(intent.id)).status == "completed"
    return intent.id


async def test_a_rescan_after_the_wakeup_reconnects_survives_the_server_going_down_again(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server restarts; the listening connection comes back and the host rescans its
    due work ("everything may have changed"). The server goes down again right then (a
    flapping server, a failover in two steps): the rescan cannot read the due-time index.
    The host must carry on (the next poll reads it again) and run new work once the server
    is back."""
    _short_reconnects(monkeypatch)
    url = postgres_server.create_database()
    spec = define_agent_do(triggers=[make_trigger(KIND)])
    async with ActorHost(spec, database_url=url, config=fast_config()) as host:
        first = await _run_one(host)
        assert host.scheduler is not None
        rescan = host.scheduler.rescan
        rescan_ended = anyio.Event()
        restarted = anyio.Event()
        armed = True

        async def flapping(horizon_s: float = 0.0) -> None:
            nonlocal armed
            if horizon_s == 0.0 and armed:
                armed = False  # the first rescan after a reconnect of the wake-ups only
                # The wake-up connection is back: the server goes down again at once.
                await restarted.wait()  # (once pg_ctl is done with the restart)
                await anyio.to_thread.run_sync(postgres_server.halt)
                try:
                    await rescan(horizon_s)
                finally:
                    rescan_ended.set()
                return
            await rescan(horizon_s)

        monkeypatch.setattr(host.scheduler, "rescan", flapping)
        try:
            await anyio.to_thread.run_sync(postgres_server.restart)
            restarted.set()
            with anyio.fail_after(20):
                await rescan_ended.wait()
        finally:
            await _resume(postgres_server)
        second = await _run_one(host)
        facts = await host.get("chat").events(kinds=TERMINAL_KINDS)
    assert [(f.intent_event_id, f.kind) for f in facts] == [(first, DONE), (second, DONE)]


async def test_recovering_a_dead_peer_survives_the_server_going_down_meanwhile(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The housekeeping reads the registry and finds a process of this machine dead, then
    rescans the due-time index to redrive its claims. The server goes down between the two
    reads: the rescan fails. Like a failed registry read, that must be logged and retried
    at the next round, not end the host."""
    _short_reconnects(monkeypatch)
    url = postgres_server.create_database()
    spec = define_agent_do(triggers=[make_trigger(KIND)])
    async with ActorHost(spec, database_url=url, config=fast_config()) as host:
        first = await _run_one(host)
        scheduler = host.scheduler
        assert scheduler is not None
        assert host._wake is not None
        rescan = scheduler.rescan
        rescan_ended = anyio.Event()
        halted = False

        async def outage_first(horizon_s: float = 0.0) -> None:
            nonlocal halted
            if horizon_s > 0 and not halted:
                halted = True
                await anyio.to_thread.run_sync(postgres_server.halt)
                try:
                    await rescan(horizon_s)
                finally:
                    rescan_ended.set()
                return
            await rescan(horizon_s)

        monkeypatch.setattr(scheduler, "rescan", outage_first)
        gone = subprocess.Popen(["true"])
        gone.wait()
        wake = host._wake
        dead = ProcessInfo(
            id="deadbeefdeadbeef", pid=gone.pid, machine=wake.machine, started="1",
            address=None, scheduler=True, heartbeat_at=host.store.clock(),
        )  # fmt: skip
        try:
            await host.store.run_index(lambda index: index.register_process(dead))
            with anyio.fail_after(20):
                await rescan_ended.wait()
        finally:
            await _resume(postgres_server)
        second = await _run_one(host)
        facts = await host.get("chat").events(kinds=TERMINAL_KINDS)
    assert [(f.intent_event_id, f.kind) for f in facts] == [(first, DONE), (second, DONE)]


async def test_a_host_stops_while_its_registry_connection_hangs(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server stops answering on the host's registry connection without closing it (a
    network partition, a frozen server: modelled by stopping its backend process with
    SIGSTOP). The housekeeping's registry read then waits for an answer that does not come.
    The read times out (the statement timeout, shortened here) and its connection is
    dropped and replaced: the registry is read again, and leaving the host ends without
    waiting for the server."""
    _short_reconnects(monkeypatch)
    from ledger import _pg

    # A statement unanswered for 3 s drops its connection (60 s by default).
    monkeypatch.setattr(_pg, "_STATEMENT_TIMEOUT_S", 3.0)
    url = postgres_server.create_database()
    spec = define_agent_do(triggers=[make_trigger(KIND)])
    paused: list[int] = []
    stopped = anyio.Event()
    rescued = False

    def resume_backends() -> None:
        while paused:
            os.kill(paused.pop(), signal.SIGCONT)

    async def watchdog() -> None:
        nonlocal rescued
        with anyio.move_on_after(12):
            await stopped.wait()
            return
        rescued = bool(paused)
        resume_backends()  # lets a hung stop finish, so the test ends either way

    try:
        async with anyio.create_task_group() as tg:
            async with ActorHost(spec, database_url=url, config=fast_config()) as host:
                await _run_one(host)
                index = host.store._index  # type: ignore[attr-defined]
                assert index is not None
                refresh = host._refresh_and_recover
                reading, recovered = anyio.Event(), anyio.Event()

                async def watched() -> bool:
                    if paused:
                        reading.set()  # a registry read is sent to the paused backend
                    readable = await refresh()
                    if readable and reading.is_set():
                        recovered.set()  # read again, on a new connection
                    return readable

                monkeypatch.setattr(host, "_refresh_and_recover", watched)
                pid = index.raw.get_server_pid()
                os.kill(pid, signal.SIGSTOP)
                paused.append(pid)
                with anyio.fail_after(10):
                    await reading.wait()
                with anyio.fail_after(20):
                    await recovered.wait()
                tg.start_soon(watchdog)
            stopped.set()
    finally:
        resume_backends()
    assert not rescued, "the host stopped only once its connection answered again"


async def test_a_distributed_abort_signal_does_not_fire_because_of_an_outage(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A followed ``DistributedAbortController`` signal re-reads the controller's ledger now
    and then. The server goes down for a few seconds: that read fails. Nobody aborted the
    controller, so its signal must not fire (the work it guards would stop for nothing, in
    this process only); once the server is back, a real abort still fires it."""
    from triggers import DistributedAbortController

    _short_reconnects(monkeypatch)
    url = postgres_server.create_database()
    spec = define_agent_do(triggers=[make_trigger(KIND)])
    async with ActorHost(spec, database_url=url, config=fast_config()) as host:
        controller = await DistributedAbortController.create("job:1", host=host)
        store_run = host.store.run
        outage = False
        failed_read = anyio.Event()

        async def watched(actor_id: str, fn: Any, **options: Any) -> Any:
            during = outage
            try:
                return await store_run(actor_id, fn, **options)
            except Exception:
                if during and actor_id == "job:1":
                    failed_read.set()  # the follower's read, during the outage
                raise

        monkeypatch.setattr(host.store, "run", watched)
        signal_ = controller.signal
        reasons: list[object] = []
        signal_.add_listener(lambda s: reasons.append(s.reason))
        outage = True
        await anyio.to_thread.run_sync(postgres_server.halt)
        try:
            with anyio.fail_after(20):
                await failed_read.wait()
        finally:
            outage = False
            await _resume(postgres_server)
        assert not signal_.aborted, f"fired without an abort: {signal_.reason!r}"
        await controller.abort("stop")
        with anyio.fail_after(10):
            await signal_.wait()
    assert reasons == ["stop"]


async def test_an_operation_during_an_outage_waits_for_one_reconnect_window_not_two(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the server is down, a batch finds its connection closed and tries to reconnect
    for one reconnect window (about 11 s by default). When that fails, nothing is gained by
    running the batch again on the same closed connection: it only waits out a second
    window (every operation of the shard waits twice as long to fail, and a stopping host
    pays it for each settle it retries)."""
    import asyncio

    _short_reconnects(monkeypatch)
    url = postgres_server.create_database()
    spec = define_agent_do(triggers=[make_trigger(KIND)])
    async with ActorHost(spec, database_url=url, run_scheduler=False) as client:
        agent = client.get("chat")
        await agent.enqueue_trigger(trigger_kind=KIND)
        store = client.store
        reconnect = store._reconnect  # type: ignore[attr-defined]
        by_pumps = 0

        async def counted() -> Any:
            nonlocal by_pumps
            task = asyncio.current_task()
            if task is not None and "_pump" in task.get_name():
                by_pumps += 1
            return await reconnect()

        monkeypatch.setattr(store, "_reconnect", counted)
        await anyio.to_thread.run_sync(postgres_server.halt)
        try:
            with anyio.fail_after(20), pytest.raises(LedgerWriteError):
                await agent.events()
        finally:
            await _resume(postgres_server)
        assert by_pumps == 1
        assert len(await agent.events()) == 1  # and it reconnects once the server is back


async def test_a_host_stopping_during_an_outage_releases_its_attempt_once_the_server_is_back(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server goes down while an attempt runs; then the host is left. The attempt gets
    its grace and is aborted with reason "shutdown"; its settle cannot land and is retried.
    The server comes back meanwhile: the retry lands, the intent is released, and the host
    stops. Another host then runs the intent to its end, exactly once."""
    _short_reconnects(monkeypatch)
    url = postgres_server.create_database()
    gate = Gate()
    spec = define_agent_do(triggers=[make_trigger(KIND, gate.acquire)])
    settle_failed = anyio.Event()
    down = True

    async def resume_after_a_failed_settle() -> None:
        nonlocal down
        with anyio.fail_after(20):
            await settle_failed.wait()
        await _resume(postgres_server)
        down = False

    try:
        async with anyio.create_task_group() as tg:
            with anyio.fail_after(30):
                async with ActorHost(spec, database_url=url, config=fast_config()) as one:
                    intent = await one.get("chat").enqueue_trigger(trigger_kind=KIND)
                    await gate.wait_started(intent.id)
                    scheduler = one.scheduler
                    assert scheduler is not None
                    settle_again = scheduler._settle_again

                    async def watched(*args: Any) -> None:
                        settle_failed.set()  # the first settle failed: retried from here
                        await settle_again(*args)

                    monkeypatch.setattr(scheduler, "_settle_again", watched)
                    await anyio.to_thread.run_sync(postgres_server.halt)
                    tg.start_soon(resume_after_a_failed_settle)
    finally:
        if down:
            await _resume(postgres_server)
    assert gate.attempts == [(intent.id, 1, False, False)]
    async with ActorHost(spec, database_url=url, config=fast_config()) as two:
        gate.open(intent.id)
        with anyio.fail_after(20):
            assert (await two.get("chat").wait_for_intent(intent.id)).status == "completed"
        facts = await two.get("chat").events(kinds=TERMINAL_KINDS)
    assert [(f.intent_event_id, f.kind) for f in facts] == [(intent.id, DONE)]
    # Released by the shutdown (no attempt spent, marked a redrive), then run once more.
    assert gate.attempts == [(intent.id, 1, False, False), (intent.id, 1, True, False)]


async def test_an_attempt_outlives_an_outage_longer_than_its_lease(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server is down longer than an attempt's lease: its renewals fail meanwhile. Once
    the server is back they succeed again; the attempt, never interrupted, ends once, and
    the host (which does not take its own running attempt for a lost claim) runs it only
    once."""
    _short_reconnects(monkeypatch)
    url = postgres_server.create_database()
    gate = Gate()
    spec = define_agent_do(triggers=[make_trigger(KIND, gate.acquire)])
    config = fast_config(lease=1.5)
    async with ActorHost(spec, database_url=url, config=config) as host:
        agent = host.get("chat")
        intent = await agent.enqueue_trigger(trigger_kind=KIND)
        await gate.wait_started(intent.id)
        scheduler = host.scheduler
        assert scheduler is not None
        renew = scheduler._renew
        halted_at: float | None = None
        lease_over = anyio.Event()
        renewed_after = anyio.Event()

        async def watched(actor_id: str, tokens: list[str]) -> None:
            began, down_since = anyio.current_time(), halted_at
            back = lease_over.is_set() and down_since is None
            await renew(actor_id, tokens)
            if back:
                renewed_after.set()  # began once the server was back
            elif down_since is not None and began - down_since > config.lease:
                lease_over.set()  # a renewal failed after the lease ran out

        monkeypatch.setattr(scheduler, "_renew", watched)
        await anyio.to_thread.run_sync(postgres_server.halt)
        halted_at = anyio.current_time()
        try:
            with anyio.fail_after(20):
                await lease_over.wait()
        finally:
            await _resume(postgres_server)
            halted_at = None
        with anyio.fail_after(20):
            await renewed_after.wait()
        gate.open(intent.id)
        with anyio.fail_after(20):
            assert (await agent.wait_for_intent(intent.id)).status == "completed"
        facts = await agent.events(kinds=TERMINAL_KINDS)
    assert [(f.intent_event_id, f.kind) for f in facts] == [(intent.id, DONE)]
    assert gate.attempts == [(intent.id, 1, False, False)]


async def test_a_wakeup_connection_that_stops_answering_is_replaced(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server stops answering on the host's wake-up connection without closing it (its
    backend stopped with SIGSTOP). The connection's idle probe gets no answer: it is
    dropped once the statement timeout (shortened here) passes, and the host listens on a
    new one (before, the probe waited forever: no notification reached the host again)."""
    from actors import _pgwake
    from ledger import _pg

    monkeypatch.setattr(_pg, "_STATEMENT_TIMEOUT_S", 2.0)
    url = postgres_server.create_database()
    spec = define_agent_do(triggers=[make_trigger(KIND)])
    paused: list[int] = []
    listening = anyio.Event()
    real_listen = _pgwake.NotifyWakeup._listen

    async def watched(self: _pgwake.NotifyWakeup) -> Any:
        conn = await real_listen(self)
        if paused:
            listening.set()  # listening again, on a new connection
        return conn

    monkeypatch.setattr(_pgwake.NotifyWakeup, "_listen", watched)
    try:
        async with ActorHost(spec, database_url=url, config=fast_config()) as host:
            wake = host._wake
            assert isinstance(wake, _pgwake.NotifyWakeup)
            assert wake._conn is not None
            frozen = wake._conn
            os.kill(frozen.get_server_pid(), signal.SIGSTOP)
            paused.append(frozen.get_server_pid())
            with anyio.fail_after(20):
                await listening.wait()
            assert frozen.is_closed()
            assert wake._conn is not None
            assert not wake._conn.is_closed()
            await _run_one(host)
    finally:
        while paused:
            os.kill(paused.pop(), signal.SIGCONT)


async def test_an_attempt_ending_in_a_long_outage_settles_once_the_server_is_back(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attempt ends while the server is down, and stays down through many retries of
    its settle (before, four tries over about 6 s, then the attempt was given up: its lease
    ran out and its finished work was run again). The settle keeps being retried while the
    host runs; once the server is back it lands: one attempt, one terminal fact."""
    from triggers import _scheduler

    _short_reconnects(monkeypatch)
    monkeypatch.setattr(_scheduler, "_SETTLE_RETRY_MAX_S", 0.05)
    url = postgres_server.create_database()
    gate = Gate()
    spec = define_agent_do(triggers=[make_trigger(KIND, gate.acquire)])
    async with ActorHost(spec, database_url=url, config=fast_config()) as host:
        agent = host.get("chat")
        intent = await agent.enqueue_trigger(trigger_kind=KIND)
        await gate.wait_started(intent.id)
        store_run = host.store.run
        failed = 0
        many = anyio.Event()

        async def watched(actor_id: str, fn: Any, **options: Any) -> Any:
            nonlocal failed
            try:
                return await store_run(actor_id, fn, **options)
            except LedgerWriteError:
                if options.get("reads") == intent.id:
                    failed += 1  # a settle (the only operation naming the intent here)
                    if failed >= 5:  # one more than the retries before this change
                        many.set()
                raise

        monkeypatch.setattr(host.store, "run", watched)
        await anyio.to_thread.run_sync(postgres_server.halt)
        try:
            gate.open(intent.id)  # the attempt ends: its settle cannot land
            with anyio.fail_after(30):
                await many.wait()
        finally:
            await _resume(postgres_server)
        with anyio.fail_after(30):
            assert (await agent.wait_for_intent(intent.id)).status == "completed"
        facts = await agent.events(kinds=TERMINAL_KINDS)
    assert [(f.intent_event_id, f.kind) for f in facts] == [(intent.id, DONE)]
    assert gate.attempts == [(intent.id, 1, False, False)]  # not run again
