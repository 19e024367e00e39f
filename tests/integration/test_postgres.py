"""What only the PostgreSQL backend has: its schema, migrations, ordering across hosts, and
surviving a server restart. The shared semantics are the ``contract`` suites'."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import asyncpg
import pytest
import structlog.testing

from actors import ActorHost, _pgwake, define_agent_do
from actors._pgwake import NotifyWakeup
from actors._wakeup import Message
from ledger import LedgerError, LedgerWriteError, PayloadError, _pg
from ledger.postgres import SCHEMA, SCHEMA_VERSION, PostgresStore
from tests.helpers import (
    CANCELLED,
    DONE,
    TERMINAL_KINDS,
    Gate,
    fast_config,
    make_trigger,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ledger import LedgerTx
    from tests.postgres import PostgresServer

pytestmark = pytest.mark.anyio


async def test_host_takes_exactly_one_place(tmp_path: Any) -> None:
    """Neither or both of data_dir= and database_url= is a TypeError; a URL of another
    scheme is a ValueError. Nothing is created."""
    spec = define_agent_do(triggers=[make_trigger()])
    with pytest.raises(TypeError, match="exactly one"):
        ActorHost(spec)
    with pytest.raises(TypeError, match="exactly one"):
        ActorHost(spec, data_dir=tmp_path, database_url="postgresql://x/y")
    with pytest.raises(ValueError, match="postgresql://"):
        ActorHost(spec, database_url="mysql://x/y")
    assert list(tmp_path.iterdir()) == []


async def test_unreachable_database_names_it_without_the_password(
    postgres_server: PostgresServer,
) -> None:
    """A server that is not there fails entering the store with LedgerWriteError naming the
    URL, the password masked."""
    url = f"postgresql://postgres:s3cret@127.0.0.1:{postgres_server.port + 1}/none"
    with pytest.raises(LedgerWriteError) as caught:
        async with PostgresStore(url):
            pass
    assert "s3cret" not in str(caught.value)
    assert "postgres:***@127.0.0.1" in str(caught.value)


@contextlib.contextmanager
def reported_to_loop() -> Iterator[list[dict[str, Any]]]:
    """What the running event loop's exception handler is given inside the block, unretrieved
    future exceptions among them (garbage is collected on leaving)."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        yield reported
        gc.collect()
    finally:
        loop.set_exception_handler(previous)


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[asyncpg.Connection]:
    """Every connection the store's connect makes during the test (the store's and the
    wake-ups' own), to check that none is left open."""
    made: list[asyncpg.Connection] = []
    real = _pg._connect

    async def recording(
        url: str, connect_timeout: float, command_timeout: float | None
    ) -> asyncpg.Connection:
        conn = await real(url, connect_timeout, command_timeout)
        made.append(conn)
        return conn

    monkeypatch.setattr(_pg, "_connect", recording)
    return made


def all_closed(connections: list[asyncpg.Connection]) -> bool:
    return bool(connections) and all(conn.is_closed() for conn in connections)


async def test_a_connect_cancelled_at_any_step_leaves_nothing_behind(
    database_url: str, connections: list[asyncpg.Connection]
) -> None:
    """The store's connect (every connection of a store and of a host's wake-ups is made by
    it) is cancelled after 0, 1, 2, ... scheduling steps until it connects first, so once at
    every point, among them just after its socket connects (where a cancelled asyncpg connect
    leaves a failed future nobody retrieves, MagicStack/asyncpg#1211). Nothing is reported to
    the event loop's exception handler and no connection stays open."""
    made: list[asyncpg.Connection] = []

    async def open_one() -> None:
        made.append(await _pg.connect(database_url))

    with reported_to_loop() as reported:
        steps = 0
        while not made:
            async with anyio.create_task_group() as tg:
                tg.start_soon(open_one)
                for _ in range(steps):
                    await anyio.lowlevel.checkpoint()
                tg.cancel_scope.cancel()
            steps += 1
        await made[0].close()
        if _pg._abandoned:
            await asyncio.wait(list(_pg._abandoned))
            await anyio.lowlevel.checkpoint()  # their done-callbacks run
    assert steps > 5  # the sweep went through the connect, not past it
    assert reported == []
    assert not _pg._abandoned
    assert all_closed(connections)


async def test_a_connect_cancelled_as_its_loop_ends_leaves_nothing_behind(
    database_url: str, connections: list[asyncpg.Connection]
) -> None:
    """A connect is cancelled after 0 to 19 scheduling steps and its event loop ends 0 to 5
    steps later (a program stopped while it connects): the loop's close must not cut the
    connect short where asyncpg would leave a failed future nobody retrieves. Each run has
    a loop of its own, in a thread; nothing is reported to its exception handler."""
    reported: list[tuple[int, object]] = []

    def one_loop(steps: int, after: int) -> None:
        async def main() -> None:
            loop = asyncio.get_running_loop()
            loop.set_exception_handler(
                lambda _loop, context: reported.append((steps, context.get("exception")))
            )
            async with anyio.create_task_group() as tg:

                async def open_and_close() -> None:
                    await (await _pg.connect(database_url)).close()

                tg.start_soon(open_and_close)
                for _ in range(steps):
                    await anyio.lowlevel.checkpoint()
                tg.cancel_scope.cancel()
            for _ in range(after):
                await anyio.lowlevel.checkpoint()

        anyio.run(main)
        gc.collect()

    for steps in range(20):
        for after in range(6):
            await anyio.to_thread.run_sync(one_loop, steps, after)
    assert reported == []
    assert all_closed(connections)


async def test_wakeups_stopped_at_any_step_leave_nothing_behind(
    database_url: str, monkeypatch: pytest.MonkeyPatch, connections: list[asyncpg.Connection]
) -> None:
    """A host's wake-up endpoint is cancelled 0, 1, 2, ... scheduling steps after its
    connection is made (so while it starts listening), until it opens first, and closed;
    then one is stopped while it sends a burst. Nothing is reported to the event loop's
    exception handler and no connection stays open."""
    connected = anyio.Event()

    async def connect_and_tell(url: str, **options: Any) -> asyncpg.Connection:
        conn = await _pg.connect(url, **options)
        connected.set()
        return conn

    monkeypatch.setattr(_pgwake, "connect", connect_and_tell)
    with reported_to_loop() as reported:
        steps, opened = 0, False
        while not opened:
            connected = anyio.Event()
            wake = NotifyWakeup(database_url, scheduler=False)
            try:
                with anyio.CancelScope() as scope:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(wake.open)
                        await connected.wait()
                        for _ in range(steps):
                            await anyio.lowlevel.checkpoint()
                        scope.cancel()
                opened = wake._conn is not None
            finally:
                await wake.aclose()
            steps += 1
        wake = NotifyWakeup(database_url, scheduler=False)
        await wake.open()
        assert wake.address is not None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(wake.receive_forever, lambda _message: None)
                for n in range(50):
                    wake.send(wake.address, Message(changed=[f"actor-{n}"]))
                await anyio.lowlevel.checkpoint()
                tg.cancel_scope.cancel()
        finally:
            await wake.aclose()
    assert steps > 2  # cancelled while listening at least twice
    assert reported == []
    assert all_closed(connections)


async def test_a_connection_cut_before_listening_is_a_write_error(
    database_url: str, monkeypatch: pytest.MonkeyPatch, connections: list[asyncpg.Connection]
) -> None:
    """The server ends the wake-up connection between its connect and its LISTEN: opening
    raises LedgerWriteError (which the reconnect loop retries), not asyncpg's own error,
    and leaves no connection open."""

    async def connect_then_cut(url: str, **options: Any) -> asyncpg.Connection:
        conn = await _pg.connect(url, **options)
        admin = await asyncpg.connect(url)
        try:
            await admin.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
        finally:
            await admin.close()
        return conn

    monkeypatch.setattr(_pgwake, "connect", connect_then_cut)
    wake = NotifyWakeup(database_url, scheduler=False)
    with pytest.raises(LedgerWriteError, match="cannot listen"):
        await wake.open()
    await wake.aclose()
    assert all_closed(connections)


async def test_every_table_leads_with_the_actor(database_url: str) -> None:
    """Every ledger table's primary key starts with actor_id: the partition key a sharded
    deployment distributes by."""
    async with PostgresStore(database_url):
        pass
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            """
            SELECT c.relname, a.attname
            FROM pg_index i
            JOIN pg_class c ON c.oid = i.indrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace
            JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = i.indkey[0]
            WHERE i.indisprimary AND n.nspname = $1
            """,
            SCHEMA,
        )
    finally:
        await conn.close()
    first = {row["relname"]: row["attname"] for row in rows}
    ledger_tables = {"all_events", "all_intents", "all_projections", "all_stream_chunks"}
    assert ledger_tables <= set(first)
    assert {first[name] for name in ledger_tables | {"actor_ledgers"}} == {"actor_id"}


async def test_hosts_starting_together_migrate_once(database_url: str) -> None:
    """Eight stores entering a fresh database at once all succeed, and the schema is
    migrated exactly once."""
    async with anyio.create_task_group() as tg:
        for _ in range(8):

            async def enter() -> None:
                async with PostgresStore(database_url) as store:
                    await store.run("a", lambda tx: tx.insert_event("x", {}))

            tg.start_soon(enter)
    conn = await asyncpg.connect(database_url)
    try:
        versions = await conn.fetch(f"SELECT version FROM {SCHEMA}.schema_version")
        count = await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.all_events")
    finally:
        await conn.close()
    assert [row["version"] for row in versions] == list(range(1, SCHEMA_VERSION + 1))
    assert count == 8


async def test_a_host_waits_for_another_hosts_long_migration(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another host holds the migration lock longer than the lock timeout (shortened here to
    1 s): a store starting meanwhile waits for it (it failed with asyncpg's own
    LockNotAvailableError) and opens once the lock is released."""
    monkeypatch.setattr(_pg, "_LOCK_TIMEOUT", "1s")
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute("SELECT pg_advisory_lock($1)", _pg._MIGRATION_LOCK)
        opened, migrating = anyio.Event(), anyio.Event()
        real_migrate = _pg.migrate

        async def migrate(conn: asyncpg.Connection) -> int:
            migrating.set()  # its first statement asks for the lock the admin holds
            return await real_migrate(conn)

        monkeypatch.setattr(_pg, "migrate", migrate)

        async def start() -> None:
            async with PostgresStore(database_url) as store:
                await store.run("a", lambda tx: tx.insert_event("x", {}))
                opened.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(start)
            with anyio.fail_after(20):
                await migrating.wait()
                await anyio.sleep(1.5)  # the behaviour under test: a wait past the lock timeout
                await admin.execute("SELECT pg_advisory_unlock($1)", _pg._MIGRATION_LOCK)
                await opened.wait()
    finally:
        await admin.close()


async def test_a_version_1_database_is_migrated_with_its_due_work(database_url: str) -> None:
    """A database written by schema version 1 (one pending and one expired running intent)
    is upgraded on start; the scan for due actors finds both, the pending one is claimed
    (entering the batch through the current function), and the next event continues the
    ids."""
    from ledger._pg import MIGRATIONS, PgDirectory

    conn = await asyncpg.connect(database_url, server_settings={"search_path": SCHEMA})
    try:
        await conn.execute(f"CREATE SCHEMA {SCHEMA}")
        await conn.execute("CREATE TABLE schema_version (version integer NOT NULL)")
        await conn.execute(MIGRATIONS[0])
        await conn.execute("INSERT INTO schema_version VALUES (1)")
        await conn.execute(
            "INSERT INTO actor_ledgers (actor_id, created_at) VALUES ('a', 0), ('b', 0);"
            "INSERT INTO all_events (actor_id, id, ts, kind, payload, intent_event_id)"
            " VALUES ('a', 1, 0, 'k.requested', 'null', 1), ('b', 1, 0, 'k.requested', 'null', 1);"
            "INSERT INTO all_intents (actor_id, id, trigger_kind, status, due_at, created_at,"
            " lease_until, claim_token) VALUES ('a', 1, 'k', 'pending', 5, 0, NULL, NULL),"
            " ('b', 1, 'k', 'running', 0, 0, 7, 't')"
        )
    finally:
        await conn.close()
    async with PostgresStore(database_url, shards=1) as store:
        due = await store.run_index(
            lambda directory: (
                directory.due_before(100, 10) if isinstance(directory, PgDirectory) else None
            )
        )
        claimed = await store.run(
            "a",
            lambda tx: tx.claim_due(
                limit=5, host_id="h", lease_until=50, tokens=iter(["t2"]), kinds=["k"]
            ),
        )
        event = await store.run("b", lambda tx: tx.insert_event(kind="x", payload=None))
    assert due == [("a", 5), ("b", 7)]  # earliest first
    assert [(row.id, row.claim_token) for row in claimed] == [(1, "t2")]
    assert event.id == 2


async def test_a_newer_schema_is_refused(database_url: str) -> None:
    """A database migrated by a newer version is refused with a clear error, untouched."""
    async with PostgresStore(database_url):
        pass
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f"INSERT INTO {SCHEMA}.schema_version VALUES (99)")
    finally:
        await conn.close()
    with pytest.raises(LedgerError, match="schema version 99"):
        async with PostgresStore(database_url):
            pass


async def test_event_ids_follow_commit_order_across_stores(database_url: str) -> None:
    """Two stores (two hosts) appending to one actor at once: ids are 1..N with no gap, and
    a reader following ``after=`` the last id it saw never misses one (an id is never
    committed after a larger one)."""
    writes = 300
    seen: list[int] = []
    done = anyio.Event()

    def append(tx: LedgerTx) -> int:
        return tx.insert_event("x", {}).id

    def read_after(after: int) -> Any:
        return lambda tx: [e.id for e in tx.events(after=after)]

    async with (
        PostgresStore(database_url) as one,
        PostgresStore(database_url) as two,
        PostgresStore(database_url) as reader,
    ):

        async def follow() -> None:
            last = 0
            while True:
                finished = done.is_set()
                new = await reader.run("shared", read_after(last), write=False)
                seen.extend(new)
                if new:
                    last = new[-1]
                if finished:
                    return
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            async with anyio.create_task_group() as writers:
                for n in range(writes):
                    writers.start_soon((one if n % 2 else two).run, "shared", append)
            done.set()
    assert seen == list(range(1, writes + 1))


async def test_batches_that_only_read_share_the_actor(database_url: str) -> None:
    """While one host's batch that only reads holds an actor, another host's batch that
    only reads it runs at once; one that writes it waits for the first to end."""
    from ledger._bridge import wait_for
    from tests.helpers import wait_for_lock_waiter

    async with (
        PostgresStore(database_url, shards=1) as one,
        PostgresStore(database_url, shards=1) as two,
    ):
        await one.run("a", lambda tx: tx.insert_event("x", {}))
        holding, gate = anyio.Event(), anyio.Event()
        ended: list[str] = []

        def read_and_hold(tx: LedgerTx) -> None:
            tx.events()
            holding.set()
            wait_for(gate.wait())  # the batch stays open, holding its lock on a

        held_ended = anyio.Event()

        def after_hold(_result: object, _error: BaseException | None) -> None:
            ended.append("held")
            held_ended.set()

        one.submit("a", read_and_hold, after_hold, write=False)
        try:
            with anyio.fail_after(10):
                await holding.wait()
                ids = await two.run("a", lambda tx: [e.id for e in tx.events()], write=False)
            assert ids == [1]
            assert ended == []
            wrote = anyio.Event()
            two.submit("a", lambda tx: tx.insert_event("y", {}), lambda _r, _e: wrote.set())
            await wait_for_lock_waiter(database_url)
            assert not wrote.is_set()
        finally:
            gate.set()  # else closing the store would wait for the held batch
        with anyio.fail_after(10):
            # Each store hears of its own batch: which of the two hears first is a race.
            await wrote.wait()
            await held_ended.wait()
        assert ended == ["held"]
        assert [e.kind for e in await one.run("a", lambda tx: tx.events())] == ["x", "y"]


async def test_a_server_restart_is_survived(postgres_server: PostgresServer) -> None:
    """The server restarts (every connection cut) while an attempt runs: the host reconnects,
    listens again, and a cancel sent afterwards by another process's client (a NOTIFY, with
    the cancel-poll fallback off) still stops the attempt; new work completes. Each intent
    ends with exactly one terminal fact."""
    url = postgres_server.create_database()
    gate = Gate()
    spec = define_agent_do(triggers=[make_trigger("test.work", gate.acquire)])
    config = fast_config(poll_interval=30, lease=60)
    async with (
        ActorHost(spec, database_url=url, config=config) as host,
        ActorHost(spec, database_url=url, run_scheduler=False, config=config) as client,
    ):

        async def no_poll(_scheduler: Any) -> None:
            """Only a notification can deliver the cancel."""

        host._poll_cancels = no_poll  # type: ignore[method-assign, assignment]
        agent = client.get("chat")
        running = await agent.enqueue_trigger(trigger_kind="test.work")
        await gate.wait_started(running.id)

        wake = host._wake
        assert isinstance(wake, NotifyWakeup)
        assert wake._handle is not None
        heard_again = anyio.Event()
        handle = wake._handle

        def spy(message: Any) -> None:
            if message.everything:  # sent to itself once listening on a new connection
                heard_again.set()
            handle(message)

        wake._handle = spy
        postgres_server.restart()
        with anyio.fail_after(20):
            await heard_again.wait()
        result = None
        with anyio.fail_after(20):
            while result is None:
                try:
                    result = await agent.cancel_trigger(
                        trigger_kind="test.work", intent_event_id=running.id, reason="stop"
                    )
                except LedgerWriteError:
                    # The client's batch ran on the dropped connection; the store has already
                    # reconnected before answering, so the retry goes to the new one.
                    continue
        assert result.status == "requested"
        with anyio.fail_after(20):
            state = await agent.wait_for_intent(running.id)
        assert state.status == "cancelled"

        fresh = await agent.enqueue_trigger(trigger_kind="test.work")
        gate.open(fresh.id)
        with anyio.fail_after(20):
            assert (await agent.wait_for_intent(fresh.id)).status == "completed"
        facts = await agent.events(kinds=TERMINAL_KINDS)
    assert sorted((f.intent_event_id, f.kind) for f in facts) == [
        (running.id, CANCELLED),
        (fresh.id, DONE),
    ]


async def test_a_long_wakeup_outage_is_logged_without_a_flood(
    database_url: str, monkeypatch: pytest.MonkeyPatch, connections: list[asyncpg.Connection]
) -> None:
    """Nine failed tries to reconnect the wake-ups: warnings at the 1st, 2nd, 4th and 8th,
    debug lines at the others, then one ``wakeup_reconnected`` naming the nine."""
    monkeypatch.setattr(_pgwake, "_RETRY_FIRST_S", 0.0)
    failed = 0

    async def refused_nine_times(url: str, **options: Any) -> asyncpg.Connection:
        nonlocal failed
        if failed < 9:
            failed += 1
            raise LedgerWriteError(url, "cannot connect: refused")
        return await _pg.connect(url, **options)

    monkeypatch.setattr(_pgwake, "connect", refused_nine_times)
    wake = NotifyWakeup(database_url, scheduler=False)
    with structlog.testing.capture_logs() as logs:
        try:
            await wake._reconnect()
        finally:
            await wake.aclose()
    tries = [
        (e["failures"], e["log_level"]) for e in logs if e["event"] == "wakeup_reconnect_failed"
    ]
    assert tries == [(n, "warning" if n in (1, 2, 4, 8) else "debug") for n in range(1, 10)]
    assert [e["failures"] for e in logs if e["event"] == "wakeup_reconnected"] == [9]
    assert all_closed(connections)


async def test_the_longest_idempotency_key_fits_the_index(database_url: str) -> None:
    """A key of the longest length taken (1,024 bytes), made of text that does not compress,
    is stored and found again: the limit sits well inside what PostgreSQL indexes."""
    key = "".join(hashlib.sha256(str(n).encode()).hexdigest() for n in range(16))
    assert len(key.encode()) == 1024
    spec = define_agent_do(triggers=[make_trigger("test.work")])
    async with ActorHost(spec, database_url=database_url, run_scheduler=False) as host:
        agent = host.get("a" * 200)
        first = await agent.enqueue_trigger(trigger_kind="test.work", idempotency_key=key)
        again = await agent.enqueue_trigger(trigger_kind="test.work", idempotency_key=key)
        assert again.id == first.id
        with pytest.raises(PayloadError, match="longer than 1024 bytes"):
            await agent.enqueue_trigger(trigger_kind="test.work", idempotency_key=key + "x")
