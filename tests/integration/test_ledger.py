"""The SQLite ledger on real files: format, ordering, atomicity, corruption, hibernation,
the due-time index and idempotency keys."""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import threading
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import anyio
import pytest
import structlog.testing

from actors import ActorHost, define_agent_do
from ledger import (
    Event,
    IntentState,
    LedgerBusyError,
    LedgerCorruptError,
    LedgerError,
    LedgerStore,
    LedgerTx,
    Projection,
    Store,
    datetime_to_ms,
    ledger_relpath,
    ms_to_datetime,
)
from ledger import _file as ledger_file
from ledger._index import IndexDB
from ledger._schema import FORMAT, SCHEMA_VERSION
from tests.helpers import DONE, Gate, fast_config, make_trigger, open_host, open_store
from triggers import RetryPolicy, TriggerContext

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.anyio

START_MS = 1_700_000_000_000


class FakeClock:
    """An injectable clock: epoch milliseconds that move only when told."""

    def __init__(self, now: int = START_MS) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


class TickingClock:
    """A clock that moves one millisecond per reading (tells batches apart)."""

    def __init__(self, now: int = START_MS) -> None:
        self.now = now

    def __call__(self) -> int:
        self.now += 1
        return self.now


def ledger_path(data_dir: Path, actor_id: str) -> Path:
    return data_dir / ledger_relpath(actor_id)


def raw(path: Path) -> sqlite3.Connection:
    """A plain sqlite3 connection, as an operator inspecting the file would open it."""
    return sqlite3.connect(path, isolation_level=None)


async def run_one(host: ActorHost, actor_id: str, payload: Any = None) -> Event:
    """Enqueue one test.work intent and wait until it completes."""
    agent = host.get(actor_id)
    intent = await agent.enqueue_trigger(trigger_kind="test.work", payload=payload)
    with anyio.fail_after(10):
        state = await agent.wait_for_intent(intent.id)
    assert state.status == "completed"
    return intent


def insert(kind: str, payload: Any = None) -> Any:
    def op(tx: LedgerTx) -> Event:
        return tx.insert_event(kind, payload)

    return op


def read_all(tx: LedgerTx) -> list[Event]:
    return tx.events()


# -- the file format -------------------------------------------------------------------------


async def test_file_is_wal_versioned_and_names_its_actor(tmp_path: Path) -> None:
    """A ledger file is in WAL mode, has the schema version and names its actor in meta."""
    async with open_host(tmp_path, make_trigger()) as host:
        await run_one(host, "chat:1")
        path = ledger_path(host.data_dir, "chat:1")
        conn = raw(path)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            assert meta == {"format": FORMAT, "actor_id": "chat:1"}
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            conn.close()


@pytest.mark.contract
async def test_events_order_ts_and_payloads(tmp_path: Path) -> None:
    """Ids grow in commit order, ts is the injected clock, payloads round-trip, and intent
    ids link an intent's events."""
    clock = FakeClock()
    payload = {
        "text": "héllo \U0001f600 \u202e\n",
        "n": [0, -1, 2**53, 2**70, 1.5, -0.0, 1e300],
        "flags": [True, False, None],
        "nested": {"a": {"b": [[], {}]}, "": "empty key"},
    }
    async with open_host(tmp_path, make_trigger(), clock=clock) as host:
        agent = host.get("a")
        first = await agent.enqueue_trigger(trigger_kind="test.work", payload=payload)
        assert first.ts == START_MS
        assert first.intent_event_id == first.id
        with anyio.fail_after(10):
            await agent.wait_for_intent(first.id)
        clock.advance(1234)
        second = await agent.enqueue_trigger(trigger_kind="test.work", payload="plain")
        with anyio.fail_after(10):
            await agent.wait_for_intent(second.id)
        events = await agent.events()
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    assert [e.kind for e in events] == ["test.work.requested", DONE] * 2
    assert events[0].payload == payload
    assert events[0].ts == START_MS
    assert events[2].ts == START_MS + 1234
    assert events[1].intent_event_id == events[0].id == first.id
    assert events[3].intent_event_id == events[2].id == second.id
    assert events[1].payload == payload  # the default acquire returns its intent


async def test_a_written_event_holds_what_was_stored_not_the_callers_object(
    tmp_path: Path,
) -> None:
    """The event a write returns, and the event a projection folds at write time, carry the
    stored JSON as a read gives it back: tuples are lists, and changing the caller's dict
    afterwards changes neither the event nor the ledger."""
    seen: list[Any] = []

    def fold(state: int, event: Event) -> int:
        if event.kind == "test.work.requested":
            seen.append(event.payload)
        return state + 1

    spec = define_agent_do(triggers=[make_trigger()], projections=[Projection("n", 0, fold)])
    payload: dict[str, Any] = {"pair": (1, 2), "items": ["a"]}
    async with open_host(tmp_path, spec=spec, run_scheduler=False) as host:
        agent = host.get("a")
        event = await agent.enqueue_trigger(trigger_kind="test.work", payload=payload)
        payload["items"].append("changed later")
        stored = {"pair": [1, 2], "items": ["a"]}
        assert event.payload == stored
        assert seen == [stored]
        assert (await agent.events())[0].payload == stored
        seen.clear()
        await agent.rebuild_projection("n")
        assert seen == [stored], "a rebuild folds the same values"
        plain = await agent.enqueue_trigger(trigger_kind="test.work", payload="text")
        assert plain.payload == "text"
        flat: dict[str, Any] = {"n": 1, "s": "x", "f": 1.5, "b": True, "none": None}
        copied = await agent.enqueue_trigger(trigger_kind="test.work", payload=flat)
        flat["n"] = 2
        assert copied.payload == {"n": 1, "s": "x", "f": 1.5, "b": True, "none": None}


async def test_a_projection_that_changes_its_state_in_place_changes_no_other_actors(
    tmp_path: Path,
) -> None:
    """Each actor's fold starts from its own copy of ``initial``: an ``apply`` that appends
    to its state in place leaves ``initial``, and every other actor, as they were."""
    initial: dict[str, list[int]] = {"seen": []}

    def fold(state: dict[str, list[int]], event: Event) -> dict[str, list[int]]:
        state["seen"].append(event.id)
        return state

    spec = define_agent_do(
        triggers=[make_trigger()], projections=[Projection("seen", initial, fold)]
    )
    async with open_host(tmp_path, spec=spec, run_scheduler=False) as host:
        await host.get("a").enqueue_trigger(trigger_kind="test.work")
        await host.get("b").enqueue_trigger(trigger_kind="test.work")
        assert await host.get("a").projection("seen") == {"seen": [1]}
        assert await host.get("b").projection("seen") == {"seen": [1]}
        assert await host.get("nobody").projection("seen") == {"seen": []}
    assert initial == {"seen": []}


@pytest.mark.contract
async def test_an_after_callback_that_raises_does_not_stop_the_store(tmp_path: Path) -> None:
    """An ``after`` callback of ``submit`` that raises is logged; the other callbacks of its
    batch are still called and the store goes on serving (its pump does not die)."""
    called: list[int] = []

    def after(event: Event | None, error: BaseException | None) -> None:
        assert event is not None
        called.append(event.id)
        if event.id == 1:
            raise RuntimeError("a bug in a callback")

    with structlog.testing.capture_logs() as logs:
        async with open_store(tmp_path) as store:
            store.submit("a", insert("k"), after)
            store.submit("a", insert("k"), after)
            event = await store.run("a", insert("k"))
            assert event.id == 3
            assert called == [1, 2]
            assert (await store.run("a", insert("k"))).id == 4
    failed = [e for e in logs if e["event"] == "after_callback_failed"]
    assert [(e["actor"], e["log_level"]) for e in failed] == [("a", "error")]


@pytest.mark.contract
async def test_ids_increase_in_commit_order_under_concurrency(tmp_path: Path) -> None:
    """Concurrent writers get distinct ids; every round's ids exceed all earlier ones."""
    async with open_store(tmp_path) as store:
        seen_max = 0
        for round_ in range(5):
            ids: list[int] = []

            async def write(i: int, ids: list[int] = ids, round_: int = round_) -> None:
                event = await store.run("a", insert("k", {"r": round_, "i": i}))
                ids.append(event.id)

            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(write, i)
            assert len(set(ids)) == 20
            assert min(ids) > seen_max
            seen_max = max(ids)
        events = await store.run("a", read_all, write=False)
    assert [e.id for e in events] == list(range(1, 101))


# -- atomicity -------------------------------------------------------------------------------


class Boom(Exception):
    pass


@pytest.mark.contract
async def test_failing_op_writes_nothing(tmp_path: Path) -> None:
    """An operation that inserts events and then raises leaves no trace."""

    def op(tx: LedgerTx) -> None:
        tx.insert_event("doomed", {"n": 1})
        tx.insert_event("doomed", {"n": 2})
        raise Boom

    async with open_store(tmp_path) as store:
        with pytest.raises(Boom):
            await store.run("a", op)
        assert await store.run("a", read_all, write=False) == []
        event = await store.run("a", insert("kept"))
        assert event.id == 1


@pytest.mark.contract
async def test_failing_op_in_a_batch_rolls_back_alone(tmp_path: Path) -> None:
    """In one batch transaction, only the failing operation's writes are missing."""
    clock = TickingClock()
    outcomes: dict[int, Any] = {}
    batch_times: dict[int, int] = {}

    def make_op(i: int) -> Any:
        def op(tx: LedgerTx) -> int:
            batch_times[i] = tx.now_ms
            tx.insert_event("w", {"i": i, "part": 1})
            tx.insert_event("w", {"i": i, "part": 2})
            if i == 2:
                raise Boom(i)
            return i

        return op

    async def submit(store: Store, i: int) -> None:
        try:
            outcomes[i] = await store.run("a", make_op(i))
        except Boom as exc:
            outcomes[i] = exc

    async with open_store(tmp_path, clock=clock) as store:
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(submit, store, i)
        events = await store.run("a", read_all, write=False)
    # One clock reading per batch: all five shared one transaction.
    assert len(set(batch_times.values())) == 1
    assert isinstance(outcomes[2], Boom)
    assert {i: outcomes[i] for i in (0, 1, 3, 4)} == {0: 0, 1: 1, 3: 3, 4: 4}
    assert [e.payload["i"] for e in events] == [0, 0, 1, 1, 3, 3, 4, 4]
    assert [e.id for e in events] == list(range(1, 9))


@pytest.mark.contract
async def test_failing_op_on_another_actor_does_not_touch_this_one(tmp_path: Path) -> None:
    """A failing operation on one actor does not roll back another actor in the batch."""

    def fail(tx: LedgerTx) -> None:
        tx.insert_event("doomed", None)
        raise Boom

    async def attempt_fail(store: Store) -> None:
        with pytest.raises(Boom):
            await store.run("b", fail)

    async with open_store(tmp_path) as store:
        async with anyio.create_task_group() as tg:
            tg.start_soon(attempt_fail, store)
            tg.start_soon(store.run, "a", insert("kept"))
        assert [e.kind for e in await store.run("a", read_all, write=False)] == ["kept"]
        assert await store.run("b", read_all, write=False) == []


# -- corruption and foreign files ------------------------------------------------------------


async def assert_corrupt(host: ActorHost, actor_id: str, match: str | None = None) -> None:
    """Every kind of operation on the actor raises LedgerCorruptError naming its file."""
    agent = host.get(actor_id)
    path = ledger_path(host.data_dir, actor_id)
    calls = [
        agent.events(),
        agent.enqueue_trigger(trigger_kind="test.work", payload=None),
        agent.intents(),
        agent.cancel_trigger(trigger_kind="test.work", intent_event_id=1),
    ]
    for call in calls:
        with anyio.fail_after(10), pytest.raises(LedgerCorruptError, match=match) as info:
            await call
        assert info.value.path == path
        assert str(path) in str(info.value)


async def test_garbage_file_is_corrupt_and_others_keep_working(tmp_path: Path) -> None:
    """Garbage over a ledger raises LedgerCorruptError for that actor only; the file is kept."""
    async with open_host(tmp_path, make_trigger()) as host:
        await run_one(host, "bad")
        await run_one(host, "good")
    path = ledger_path(tmp_path.resolve(), "bad")
    garbage = os.urandom(8192)
    path.write_bytes(garbage)
    async with open_host(tmp_path, make_trigger()) as host:
        await assert_corrupt(host, "bad")
        await run_one(host, "good")
        await run_one(host, "new")
        assert len(await host.get("good").events()) == 4
    assert path.read_bytes() == garbage


async def test_corruption_of_a_hibernated_ledger_while_the_host_runs(tmp_path: Path) -> None:
    """A ledger corrupted while hibernated fails alone; the running host serves the others."""
    async with open_host(tmp_path, make_trigger(), max_open_ledgers=1) as host:
        await run_one(host, "bad")
        await run_one(host, "good")  # evicts "bad" (one open ledger at most)
        ledger_path(host.data_dir, "bad").write_bytes(b"not a database " * 512)
        await assert_corrupt(host, "bad")
        await run_one(host, "good")
        await run_one(host, "other")


async def test_corrupt_actor_with_due_work_does_not_stall_the_scheduler(tmp_path: Path) -> None:
    """A corrupt actor that the index says is due does not stop other actors' work."""
    async with open_host(tmp_path, make_trigger(), run_scheduler=False) as client:
        await client.get("bad").enqueue_trigger(trigger_kind="test.work", payload=None)
    ledger_path(tmp_path.resolve(), "bad").write_bytes(b"\xff" * 4096)
    async with open_host(tmp_path, make_trigger()) as host:
        for i in range(3):
            await run_one(host, f"good-{i}")
        await assert_corrupt(host, "bad")


async def test_claims_of_a_corrupt_actor_back_off_and_warn_once(tmp_path: Path) -> None:
    """A corrupt actor with due work is not claimed at every poll, nor warned about at each:
    one ``claim_failed`` warning, then looks ever further apart; once the file is good again
    its work runs and ``claim_recovered`` is logged."""
    async with open_host(tmp_path, make_trigger(), run_scheduler=False) as client:
        intent = await client.get("bad").enqueue_trigger(trigger_kind="test.work")
    path = ledger_path(tmp_path.resolve(), "bad")
    good = path.read_bytes()
    path.write_bytes(b"\xff" * 4096)
    polls = 0
    enough = anyio.Event()
    config = fast_config(poll_interval=0.02)
    with structlog.testing.capture_logs() as logs:
        async with open_host(tmp_path, make_trigger(), config=config) as host:
            scheduler = host.scheduler
            assert scheduler is not None
            poll = scheduler._poll

            async def counted(now: int) -> None:
                nonlocal polls
                await poll(now)
                polls += 1
                if polls == 60:
                    enough.set()

            scheduler._poll = counted  # type: ignore[method-assign]
            with anyio.fail_after(30):
                await enough.wait()
            failures = [e for e in logs if e["event"].startswith("claim_failed")]
            assert [e["event"] for e in failures[:1]] == ["claim_failed"]
            assert [e["log_level"] for e in failures[1:]] == ["debug"] * (len(failures) - 1)
            # One look per poll would be 60; doubling waits from 20 ms make about 7.
            assert 2 <= len(failures) <= 15, len(failures)

            path.write_bytes(good)
            with anyio.fail_after(20):
                state = await host.get("bad").wait_for_intent(intent.id)
            assert state.status == "completed"
    assert [e["event"] for e in logs].count("claim_recovered") == 1
    assert [e["event"] for e in logs].count("claim_failed") == 1


async def test_foreign_sqlite_database_is_refused(tmp_path: Path) -> None:
    """A valid SQLite file of another program at a ledger path is refused, not written."""
    path = ledger_path(tmp_path.resolve(), "foreign")
    path.parent.mkdir(parents=True)
    conn = raw(path)
    conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO customers (name) VALUES ('ada')")
    conn.close()
    async with open_host(tmp_path, make_trigger()) as host:
        await assert_corrupt(host, "foreign", match="not a ledger")
        await run_one(host, "good")
    conn = raw(path)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema")}
        assert tables == {"customers"}
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
    finally:
        conn.close()


async def test_foreign_database_with_a_user_version_is_refused(tmp_path: Path) -> None:
    """A foreign SQLite file whose user_version equals ours is refused (no ledger meta)."""
    path = ledger_path(tmp_path.resolve(), "foreign")
    path.parent.mkdir(parents=True)
    conn = raw(path)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    conn.execute("INSERT INTO meta VALUES ('format', 'something-else')")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    conn.close()
    async with open_host(tmp_path, make_trigger()) as host:
        await assert_corrupt(host, "foreign")
        await run_one(host, "good")


async def test_another_actors_ledger_is_refused(tmp_path: Path) -> None:
    """Actor a's ledger copied to actor b's path is refused as belonging to a."""
    async with open_host(tmp_path, make_trigger()) as host:
        await run_one(host, "a")
    source = ledger_path(tmp_path.resolve(), "a")
    target = ledger_path(tmp_path.resolve(), "b")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    async with open_host(tmp_path, make_trigger()) as host:
        await assert_corrupt(host, "b", match="belongs to actor 'a'")
        assert len(await host.get("a").events()) == 2
        await run_one(host, "a")


async def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    """A ledger written by a newer library version is refused and left untouched."""
    async with open_host(tmp_path, make_trigger()) as host:
        await run_one(host, "future")
    path = ledger_path(tmp_path.resolve(), "future")
    conn = raw(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    async with open_host(tmp_path, make_trigger()) as host:
        await assert_corrupt(host, "future", match="newer")
        await run_one(host, "present")
    conn = raw(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 2
    finally:
        conn.close()


async def test_ledger_being_created_elsewhere_is_busy_not_corrupt(tmp_path: Path) -> None:
    """A fresh ledger whose creation lock another process holds is reported busy (or waited
    for), never as corrupt; once the lock is gone the actor opens normally."""
    path = ledger_path(tmp_path.resolve(), "a")
    path.parent.mkdir(parents=True)
    other = raw(path)  # another process, in the middle of creating the same ledger
    other.execute("PRAGMA journal_mode = WAL")
    other.execute("BEGIN IMMEDIATE")
    try:
        async with LedgerStore(tmp_path, lock_timeout=0.3) as store:
            with anyio.fail_after(10), pytest.raises(LedgerBusyError):
                await store.run("a", insert("x"))
            other.execute("ROLLBACK")
            event = await store.run("a", insert("x"))
            assert event.id == 1
    finally:
        other.close()


async def test_a_batch_never_waits_for_a_ledger_locked_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An actor whose ledger another process holds locked is put off at once, and the rest of
    the batch commits: a batch never sits on the locks it has taken while it waits for one
    more (two hosts' batches would stall each other, actor after actor)."""
    monkeypatch.setattr(ledger_file, "_BUSY_MS", 600_000)  # any wait would hang the batch
    async with LedgerStore(tmp_path) as store:
        for actor_id in ("held", "free"):
            await store.run(actor_id, insert("created"))
        other = raw(ledger_path(tmp_path.resolve(), "held"))
        done = {"held": anyio.Event(), "free": anyio.Event()}
        kinds: dict[str, str | BaseException | None] = {}

        def after(actor_id: str) -> Any:
            def record(event: Event | None, error: BaseException | None) -> None:
                kinds[actor_id] = error if event is None else event.kind
                done[actor_id].set()

            return record

        other.execute("BEGIN IMMEDIATE")
        try:
            store.submit("held", insert("late"), after("held"))  # one batch, locked first
            store.submit("free", insert("soon"), after("free"))
            with anyio.fail_after(30):
                await done["free"].wait()
            assert kinds == {"free": "soon"}, "the locked actor waits for a later batch"
        finally:
            other.execute("ROLLBACK")
            other.close()
        with anyio.fail_after(30):
            await done["held"].wait()
        assert kinds == {"free": "soon", "held": "late"}


async def test_an_actor_locked_elsewhere_is_held_back_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once an actor was found locked by another process, its queued operations wait out a
    short hold before they are tried again, while the operations of other actors go on at
    once: the shard neither retries the locked actor in every batch nor pauses for it."""
    from ledger import _store

    monkeypatch.setattr(_store, "_HOLD", 3600.0)  # held for the whole test, unless released
    async with LedgerStore(tmp_path) as store:
        for actor_id in ("held", "free"):
            await store.run(actor_id, insert("created"))
        other = raw(ledger_path(tmp_path.resolve(), "held"))
        tries = 0
        tried = threading.Event()

        def write() -> bool:
            nonlocal tries
            tries += 1  # asked right before each try to begin the actor's transaction
            tried.set()
            return True

        done = anyio.Event()
        kinds: list[str | BaseException | None] = []

        def after(event: Event | None, error: BaseException | None) -> None:
            kinds.append(error if event is None else event.kind)
            done.set()

        shard = store._shards[hash("held") % len(store._shards)]
        other.execute("BEGIN IMMEDIATE")
        try:
            store.submit("held", insert("late"), after, write=write)
            with anyio.fail_after(30):
                await anyio.to_thread.run_sync(tried.wait)
            for n in range(3):  # later batches run while the actor is held...
                with anyio.fail_after(30):
                    event = await store.run("free", insert(f"soon{n}"))
                assert event.kind == f"soon{n}"
                assert "held" in shard.held
            assert tries == 1, "...without trying the held actor again"
            assert kinds == []
        finally:
            other.execute("ROLLBACK")
            other.close()
        shard.held["held"] = 0.0  # the hold is over
        shard.wake.set()
        with anyio.fail_after(30):
            await done.wait()
        assert (kinds, tries) == (["late"], 2)


async def test_a_batch_opens_its_ledgers_before_it_locks_any(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening a ledger may wait for another process that is creating it; meanwhile the batch
    holds no lock of its other actors, so other processes may write to them."""
    monkeypatch.setattr(ledger_file, "_BUSY_MS", 600_000)
    opening = threading.Event()
    real_open = ledger_file.LedgerFile.open

    def open_file(actor_id: str, *args: Any, **kwargs: Any) -> ledger_file.LedgerFile:
        if actor_id == "fresh":
            opening.set()
        return real_open(actor_id, *args, **kwargs)

    monkeypatch.setattr(ledger_file.LedgerFile, "open", open_file)
    async with LedgerStore(tmp_path) as store:
        await store.run("free", insert("created"))
        fresh = ledger_path(tmp_path.resolve(), "fresh")
        fresh.parent.mkdir(parents=True, exist_ok=True)
        creator = raw(fresh)  # another process, in the middle of creating "fresh"
        creator.execute("PRAGMA journal_mode = WAL")
        creator.execute("BEGIN IMMEDIATE")
        kinds: dict[str, Any] = {}
        done = anyio.Event()

        def after(actor_id: str) -> Any:
            def record(event: Event | None, error: BaseException | None) -> None:
                kinds[actor_id] = error if event is None else event.kind
                if len(kinds) == 2:
                    done.set()

            return record

        try:
            store.submit("free", insert("soon"), after("free"))  # one batch, "free" first
            store.submit("fresh", insert("new"), after("fresh"))
            assert await anyio.to_thread.run_sync(opening.wait, 30)
            writer = raw(ledger_path(tmp_path.resolve(), "free"))
            try:
                writer.execute("PRAGMA busy_timeout = 0")
                writer.execute("BEGIN IMMEDIATE")  # "database is locked" if the batch held it
                writer.execute("ROLLBACK")
            finally:
                writer.close()
        finally:
            creator.execute("ROLLBACK")
            creator.close()
        with anyio.fail_after(30):
            await done.wait()
        assert kinds == {"free": "soon", "fresh": "new"}


@pytest.mark.contract
async def test_an_operation_asked_whether_it_writes_runs_alone_or_beside_a_writer(
    tmp_path: Path,
) -> None:
    """An operation whose ``write`` function answers False runs and returns what it read,
    alone or in one batch with a writer of the same actor (whose write commits); each
    question is asked once per batch."""
    async with open_store(tmp_path) as store:
        await store.run("a", insert("created"))
        asks: list[str] = []
        answers: dict[str, Any] = {}
        done = anyio.Event()

        def no(name: str) -> Any:
            def ask() -> bool:
                asks.append(name)
                return False

            return ask

        def after(name: str, expected: int) -> Any:
            def record(result: Any, error: BaseException | None) -> None:
                answers[name] = error if error is not None else result
                if len(answers) == expected:
                    done.set()

            return record

        store.submit("a", read_all, after("reader", 2), write=no("reader"))  # one batch
        store.submit("a", insert("beside"), after("writer", 2))
        with anyio.fail_after(30):
            await done.wait()
        assert [event.kind for event in answers["reader"]] == ["created"]
        assert answers["writer"].kind == "beside"
        done = anyio.Event()
        store.submit("a", read_all, after("alone", 3), write=no("alone"))
        with anyio.fail_after(30):
            await done.wait()
        assert [event.kind for event in answers["alone"]] == ["created", "beside"]
        assert asks == ["reader", "alone"]


async def test_an_operation_asked_whether_it_writes_takes_no_lock_it_does_not_need(
    tmp_path: Path,
) -> None:
    """``write`` given as a function is asked on the worker thread right before the
    transaction begins. Answered False, the operation runs while another process holds the
    ledger's write lock; answered True, it is put off to a later batch, asked again there, and
    runs once the lock is gone."""
    async with LedgerStore(tmp_path) as store:
        await store.run("a", insert("created"))
        other = raw(ledger_path(tmp_path.resolve(), "a"))
        answers: dict[str, Any] = {}
        done = {"reader": anyio.Event(), "writer": anyio.Event()}
        asked_twice = threading.Event()
        asks: list[bool] = []

        def after(name: str) -> Any:
            def record(result: Any, error: BaseException | None) -> None:
                answers[name] = error if error is not None else result
                done[name].set()

            return record

        def writes() -> bool:
            asks.append(True)
            if len(asks) == 2:
                asked_twice.set()
            return True

        other.execute("BEGIN IMMEDIATE")
        try:
            store.submit("a", read_all, after("reader"), write=lambda: False)
            with anyio.fail_after(30):
                await done["reader"].wait()
            assert [event.kind for event in answers["reader"]] == ["created"]
            store.submit("a", insert("late"), after("writer"), write=writes)
            assert await anyio.to_thread.run_sync(asked_twice.wait, 30)
            assert "writer" not in answers, "put off while the lock is held"
        finally:
            other.execute("ROLLBACK")
            other.close()
        with anyio.fail_after(30):
            await done["writer"].wait()
        assert answers["writer"].kind == "late"
        assert len(asks) >= 2


# -- schema versions and reopening -----------------------------------------------------------


async def test_reopening_and_two_stores_on_one_file(tmp_path: Path) -> None:
    """Reopening a ledger does not re-run migrations; two stores share one file safely."""
    async with LedgerStore(tmp_path) as first:
        await first.run("a", insert("one"))
    async with LedgerStore(tmp_path) as first, LedgerStore(tmp_path) as second:
        await first.run("a", insert("two"))
        await second.run("a", insert("three"))
        for store in (first, second):
            events = await store.run("a", read_all, write=False)
            assert [e.kind for e in events] == ["one", "two", "three"]
    conn = raw(ledger_path(tmp_path.resolve(), "a"))
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("SELECT count(*) FROM meta").fetchone()[0] == 2
    finally:
        conn.close()


async def test_two_stores_create_the_same_fresh_ledgers(tmp_path: Path) -> None:
    """Two stores racing to create the same new ledgers both succeed, with one schema."""
    names = [f"actor-{i}" for i in range(20)]
    async with LedgerStore(tmp_path) as first, LedgerStore(tmp_path) as second:
        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(first.run, name, insert("from-first"))
                tg.start_soon(second.run, name, insert("from-second"))
        for name in names:
            events = await first.run(name, read_all, write=False)
            assert sorted(e.kind for e in events) == ["from-first", "from-second"]


async def test_empty_file_is_initialised(tmp_path: Path) -> None:
    """A zero-byte file at the ledger path (an interrupted create) becomes a ledger."""
    path = ledger_path(tmp_path.resolve(), "a")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    async with LedgerStore(tmp_path) as store:
        assert (await store.run("a", insert("x"))).id == 1


# -- durability option -----------------------------------------------------------------------


async def test_synchronous_full_works(tmp_path: Path) -> None:
    """synchronous="FULL" serves work like the default and the data survives a reopen."""
    spec = define_agent_do(triggers=[make_trigger()])
    async with ActorHost(spec, data_dir=tmp_path, synchronous="FULL", config=fast_config()) as h:
        await run_one(h, "a", {"x": 1})
    async with open_host(tmp_path, make_trigger(), run_scheduler=False) as host:
        assert len(await host.get("a").events()) == 2


@pytest.mark.parametrize("value", ["OFF", "EXTRA", "full", "", None, 2])
def test_invalid_synchronous_is_refused(tmp_path: Path, value: Any) -> None:
    """Any synchronous value but NORMAL or FULL raises ValueError."""
    spec = define_agent_do(triggers=[make_trigger()])
    with pytest.raises(ValueError, match="synchronous"):
        ActorHost(spec, data_dir=tmp_path, synchronous=value)
    with pytest.raises(ValueError, match="synchronous"):
        LedgerStore(tmp_path, synchronous=value)


# -- hibernation -----------------------------------------------------------------------------


def count_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The actor of every ledger file opened from now on, in order."""
    from ledger._file import LedgerFile

    opens: list[str] = []
    real_open = LedgerFile.open.__func__  # type: ignore[attr-defined]

    def counting_open(cls: type[LedgerFile], actor_id: str, *args: Any, **kw: Any) -> Any:
        opens.append(actor_id)
        return real_open(cls, actor_id, *args, **kw)

    monkeypatch.setattr(LedgerFile, "open", classmethod(counting_open))
    return opens


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_hibernation_bounds_open_files(tmp_path: Path) -> None:
    """With max_open_ledgers=4, serving 50 actors keeps open files bounded; reopened actors
    still have their events."""
    names = [f"tenant-{i}" for i in range(50)]
    async with open_host(tmp_path, make_trigger(), max_open_ledgers=4) as host:
        await run_one(host, "warm-up")
        baseline = open_fds()
        bound = baseline + 4 * 3 + 8
        peak = 0
        for name in names:
            await run_one(host, name, {"name": name})
            peak = max(peak, open_fds())
        assert peak < bound, (baseline, peak)
        # Reopen each hibernated actor: its events are all there.
        for name in names:
            events = await host.get(name).events()
            assert [e.kind for e in events] == ["test.work.requested", DONE]
            assert events[0].payload == {"name": name}
            peak = max(peak, open_fds())
        assert peak < bound, (baseline, peak)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_hibernation_after_a_wide_batch(tmp_path: Path) -> None:
    """After concurrent work on 50 actors settles, open files fall back within the bound."""
    names = [f"tenant-{i}" for i in range(50)]
    async with open_host(tmp_path, make_trigger(), max_open_ledgers=4) as host:
        await run_one(host, "warm-up")
        baseline = open_fds()
        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(run_one, host, name, {"name": name})
        await run_one(host, "last")  # one more operation after the wide batches
        assert open_fds() < baseline + 4 * 3 + 8
        for name in names:
            assert len(await host.get(name).events()) == 2


async def test_idle_actors_hibernate_before_a_running_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a ledger must close, an actor whose work is all settled goes before one whose
    claimed attempt is still running, even if the settled one was used more recently: the
    running one then settles without reopening its file."""
    opens = count_opens(monkeypatch)
    gate = Gate()
    hold = make_trigger("test.hold", gate.acquire)
    async with open_host(tmp_path, make_trigger(), hold, max_open_ledgers=3) as host:
        busy = await host.get("busy").enqueue_trigger(trigger_kind="test.hold", payload=None)
        await gate.wait_started(busy.id)
        for i in range(6):
            await run_one(host, f"idle-{i}")
        gate.open(busy.id)
        assert (await host.get("busy").wait_for_intent(busy.id)).status == "completed"
    assert opens.count("busy") == 1, opens


async def test_of_idle_actors_the_least_recently_used_hibernates_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading an idle actor keeps it open longer than an idle actor nobody used since."""
    opens = count_opens(monkeypatch)
    async with open_host(tmp_path, make_trigger(), max_open_ledgers=2) as host:
        await run_one(host, "first")
        await run_one(host, "second")
        await host.get("first").events()  # now "second" is the idle one used least recently
        await run_one(host, "third")  # one of the two must close
        await host.get("first").events()
    assert opens.count("first") == 1, opens
    assert opens.count("second") == 1, opens


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_a_wide_batch_stays_within_max_open(tmp_path: Path) -> None:
    """Even while one batch touches 50 actors, no more than max_open ledgers are open at
    once (measured inside the operations, on the worker thread, mid-batch)."""
    seen: list[int] = []

    def op(tx: LedgerTx) -> None:
        tx.insert_event("k", None)
        seen.append(open_fds())

    async with LedgerStore(tmp_path, max_open=4) as store:
        await store.run("warm-up", op)
        baseline = open_fds()
        seen.clear()
        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(store.run, f"tenant-{i}", op)
        assert len(seen) == 50
        assert max(seen) < baseline + 4 * 3 + 8, (baseline, max(seen))
        for i in range(50):
            assert len(await store.run(f"tenant-{i}", read_all, write=False)) == 1


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_running_out_of_file_descriptors_is_not_corruption(tmp_path: Path) -> None:
    """When the OS refuses to open more files, operations fail with a LedgerError that is
    not LedgerCorruptError (whose advice is to restore or move the file), and succeed once
    descriptors are available again."""
    import resource

    errors: list[BaseException] = []

    async def write(store: LedgerStore, actor_id: str) -> None:
        try:
            await store.run(actor_id, insert("k"))
        except Exception as exc:
            errors.append(exc)

    async with LedgerStore(tmp_path) as store:
        await store.run("warm-up", insert("k"))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_fds() + 10, hard))
        try:
            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(write, store, f"tenant-{i}")
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert errors, "the limit did not bite; the test proves nothing"
        assert [e for e in errors if isinstance(e, LedgerCorruptError)] == []
        assert all(isinstance(e, LedgerError) for e in errors), errors
        for i in range(20):
            await store.run(f"tenant-{i}", insert("k"))


# -- the due-time index ----------------------------------------------------------------------


def index_dues(data_dir: Path) -> dict[str, int | None]:
    conn = raw(data_dir / "index.db")
    try:
        return dict(conn.execute("SELECT actor_id, due FROM actors").fetchall())
    finally:
        conn.close()


async def true_next_due(host: ActorHost, actor_id: str) -> int | None:
    return await host.store.run(actor_id, lambda tx: tx.next_due(), write=False)


async def assert_index_not_late(host: ActorHost, actors: list[str]) -> None:
    """index.db's due is never later than an actor's real next due time."""
    # The index is read first: background work between the reads only raises the truth.
    dues = index_dues(host.data_dir)
    for actor_id in actors:
        truth = await true_next_due(host, actor_id)
        if truth is None:
            continue
        due = dues.get(actor_id)
        assert due is not None, f"{actor_id}: index has no due, ledger is due at {truth}"
        assert due <= truth, f"{actor_id}: index due {due} is later than {truth}"


def due_ms(state: IntentState) -> int:
    return datetime_to_ms(state.due_at)


class Flaky:
    """An acquire that fails its first attempt, then waits on a gate."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    async def acquire(self, intent: Any, ctx: TriggerContext) -> Any:
        if ctx.attempt == 1:
            raise RuntimeError("first attempt fails")
        return await self.gate.acquire(intent, ctx)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_index_due_is_never_later_than_the_ledger(tmp_path: Path, seed: int) -> None:
    """After random enqueues (now and future), retries, cancels and completions on several
    actors, index.db's due is always <= each actor's true next due."""
    rng = random.Random(seed)
    clock = FakeClock()
    gate = Gate()
    flaky = Flaky(gate)
    triggers = [
        make_trigger("test.work", gate.acquire),
        make_trigger(
            "test.flaky",
            flaky.acquire,
            retry=RetryPolicy(max_attempts=3, initial_backoff=30, jitter=False),
        ),
    ]
    actors = ["a", "b", "c", "d"]
    live: list[tuple[str, str, int]] = []  # (actor, kind, intent id)
    # A long lease: no renewals during the test, so the ledgers move only when we act.
    config = fast_config(lease=3600.0, poll_interval=0.05)
    async with open_host(tmp_path, *triggers, clock=clock, config=config) as host:

        async def quiesce() -> None:
            """Wait until no intent can still lower its actor's due time on its own: each is
            ended, pending in the future, or parked in the gate."""
            with anyio.fail_after(20):
                for actor_id, _kind, intent_id in live:
                    agent = host.get(actor_id)
                    while True:
                        version = host.store.version(actor_id)
                        state = await agent.intent(intent_id)
                        started = gate.started.get(intent_id)
                        if (
                            state.status.terminal
                            or (state.status == "pending" and due_ms(state) > clock.now)
                            or (state.status == "running" and started and started.is_set())
                        ):
                            break
                        with anyio.move_on_after(0.05):
                            await host.store.wait_changed(actor_id, version)

        for _step in range(30):
            actor_id = rng.choice(actors)
            agent = host.get(actor_id)
            action = rng.choice(["now", "future", "flaky", "cancel", "complete", "time"])
            if action in ("now", "future", "flaky"):
                at = None
                if action == "future":
                    at = ms_to_datetime(clock.now + rng.randint(1, 120) * 1000)
                kind = "test.flaky" if action == "flaky" else "test.work"
                intent = await agent.enqueue_trigger(trigger_kind=kind, payload=None, at=at)
                live.append((actor_id, kind, intent.id))
            elif action == "cancel" and live:
                a, kind, intent_id = rng.choice(live)
                await host.get(a).cancel_trigger(trigger_kind=kind, intent_event_id=intent_id)
            elif action == "complete" and live:
                a, _kind, intent_id = rng.choice(live)
                gate.open(intent_id)
            elif action == "time":
                clock.advance(rng.randint(1, 60) * 1000)
            await quiesce()
            await assert_index_not_late(host, actors)
        # Let everything finish: release every gate, make all work due.
        clock.advance(10**7)
        for _a, _k, intent_id in live:
            gate.open(intent_id)
        with anyio.fail_after(30):
            for a, _k, intent_id in live:
                await host.get(a).wait_for_intent(intent_id)
        await assert_index_not_late(host, actors)


@pytest.mark.parametrize("shards", [1, 2])
async def test_an_index_read_applies_the_put_off_due_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shards: int
) -> None:
    """A busy shard puts off raising an actor's due time; a read of the index (the
    scheduler's poll) applies those raises first, every shard's, so it does not report an
    actor whose work has already ended as due."""
    from ledger import _store

    monkeypatch.setattr(_store, "_RAISE_DELAY", 3600.0)  # the shards never idle long enough
    # One actor per shard (the store spreads actors over shards by hash).
    names = [
        next(f"a{i}" for i in range(100) if hash(f"a{i}") % shards == n) for n in range(shards)
    ]
    far = START_MS * 2
    async with open_host(tmp_path, make_trigger(), run_scheduler=False, shards=shards) as client:
        for name in names:
            agent = client.get(name)
            intent = await agent.enqueue_trigger(trigger_kind="test.work", payload=None)
            cancel = await agent.cancel_trigger(trigger_kind="test.work", intent_event_id=intent.id)
            assert cancel.status == "cancelled"
            assert await true_next_due(client, name) is None
            assert index_dues(tmp_path)[name] is not None  # the raise was put off
        rows = await client.store.run_index(lambda index: index.due_before(far, 10))
        assert rows == []


async def test_index_due_survives_racing_hosts(tmp_path: Path) -> None:
    """A client enqueueing future work while a scheduler host completes other work on the
    same actors never leaves index.db's due later than the truth."""
    actors = [f"actor-{i}" for i in range(4)]
    future = ms_to_datetime(START_MS * 2)  # far ahead of the real clock
    async with (
        open_host(tmp_path, make_trigger()) as host,
        open_host(tmp_path, make_trigger(), run_scheduler=False) as client,
    ):
        now_ids: list[tuple[str, int]] = []

        async def burst(actor_id: str) -> None:
            for i in range(15):
                agent = (host if i % 2 else client).get(actor_id)
                if i % 3 == 0:
                    await agent.enqueue_trigger(trigger_kind="test.work", at=future)
                else:
                    intent = await agent.enqueue_trigger(trigger_kind="test.work")
                    now_ids.append((actor_id, intent.id))

        async with anyio.create_task_group() as tg:
            for actor_id in actors:
                tg.start_soon(burst, actor_id)
        with anyio.fail_after(20):
            for actor_id, intent_id in now_ids:
                await host.get(actor_id).wait_for_intent(intent_id)
        dues = index_dues(host.data_dir)
        for actor_id in actors:
            truth = await true_next_due(host, actor_id)
            due = dues[actor_id]
            assert truth == datetime_to_ms(future)
            assert due is not None
            assert due <= truth


# -- idempotency keys ------------------------------------------------------------------------


@pytest.mark.contract
async def test_idempotency_key_returns_the_live_intent(tmp_path: Path) -> None:
    """A second enqueue with the same key returns the live intent instead of a new one."""
    gate = Gate()
    async with open_host(tmp_path, make_trigger("test.work", gate.acquire)) as host:
        agent = host.get("a")
        first = await agent.enqueue_trigger(
            trigger_kind="test.work", payload=1, idempotency_key="k"
        )
        await gate.wait_started(first.id)
        again = await agent.enqueue_trigger(
            trigger_kind="test.work", payload=2, idempotency_key="k"
        )
        assert again == first
        other = await agent.enqueue_trigger(
            trigger_kind="test.work", payload=3, idempotency_key="o"
        )
        assert other.id != first.id
        assert len(await agent.intents()) == 2
        gate.open(first.id)
        gate.open(other.id)
        with anyio.fail_after(10):
            await agent.wait_for_intent(first.id)
            await agent.wait_for_intent(other.id)
        # Ended, but within the retention (default one day): still the same intent.
        after = await agent.enqueue_trigger(
            trigger_kind="test.work", payload=4, idempotency_key="k"
        )
        assert after == first
        assert len(await agent.intents()) == 2
        assert (await agent.intent(first.id)).idempotency_key == "k"


@pytest.mark.contract
async def test_idempotency_retention_follows_the_clock(tmp_path: Path) -> None:
    """After the retention has passed on the host clock, the key makes a new intent."""
    clock = FakeClock()
    retention = timedelta(seconds=10)
    async with open_host(
        tmp_path, make_trigger(), clock=clock, idempotency_retention=retention
    ) as host:
        agent = host.get("a")
        first = await agent.enqueue_trigger(trigger_kind="test.work", idempotency_key="k")
        with anyio.fail_after(10):
            await agent.wait_for_intent(first.id)
        clock.advance(9_999)
        same = await agent.enqueue_trigger(trigger_kind="test.work", idempotency_key="k")
        assert same.id == first.id
        clock.advance(1)
        fresh = await agent.enqueue_trigger(trigger_kind="test.work", idempotency_key="k")
        assert fresh.id != first.id
        with anyio.fail_after(10):
            await agent.wait_for_intent(fresh.id)
        assert len(await agent.intents()) == 2
        # The old intent's facts are untouched.
        assert [e.kind for e in await agent.events(intent_event_id=first.id)] == [
            "test.work.requested",
            DONE,
        ]


@pytest.mark.contract
async def test_zero_retention_reuses_the_key_after_the_end(tmp_path: Path) -> None:
    """With idempotency_retention=0 an enqueue after the intent ended creates a new one."""
    async with open_host(tmp_path, make_trigger(), idempotency_retention=timedelta(0)) as host:
        agent = host.get("a")
        first = await agent.enqueue_trigger(trigger_kind="test.work", idempotency_key="k")
        with anyio.fail_after(10):
            await agent.wait_for_intent(first.id)
        second = await agent.enqueue_trigger(trigger_kind="test.work", idempotency_key="k")
        assert second.id != first.id
        with anyio.fail_after(10):
            await agent.wait_for_intent(second.id)
        third = await agent.enqueue_trigger(trigger_kind="test.work", idempotency_key="k")
        assert third.id not in (first.id, second.id)


@pytest.mark.contract
async def test_zero_retention_still_dedupes_live_intents(tmp_path: Path) -> None:
    """Even with zero retention, a live intent keeps its key."""
    async with open_host(
        tmp_path, make_trigger(), run_scheduler=False, idempotency_retention=timedelta(0)
    ) as host:
        agent = host.get("a")
        first = await agent.enqueue_trigger(trigger_kind="test.work", idempotency_key="k")
        again = await agent.enqueue_trigger(trigger_kind="test.work", idempotency_key="k")
        assert again.id == first.id


@pytest.mark.contract
async def test_concurrent_enqueues_with_one_key_make_one_intent(tmp_path: Path) -> None:
    """Concurrent enqueues with one key from two hosts on one data_dir yield one intent."""
    async with (
        open_host(tmp_path, make_trigger(), run_scheduler=False) as one,
        open_host(tmp_path, make_trigger(), run_scheduler=False) as two,
    ):
        ids: list[int] = []

        async def enqueue(host: ActorHost) -> None:
            event = await host.get("a").enqueue_trigger(
                trigger_kind="test.work", idempotency_key="job-1"
            )
            ids.append(event.id)

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(enqueue, one if i % 2 else two)
        assert len(set(ids)) == 1
        assert len(await one.get("a").intents()) == 1


def test_many_openers_of_a_new_index_all_succeed(tmp_path: Path) -> None:
    """Connections opening a brand-new index.db at the same moment (as processes starting on a
    new data directory do) all succeed: the race to set it up is waited out, not reported as a
    corrupt file."""

    def open_index(path: Path, barrier: threading.Barrier, errors: list[BaseException]) -> None:
        barrier.wait()
        try:
            IndexDB(path).close()
        except BaseException as exc:
            errors.append(exc)

    for round_ in range(20):
        path = tmp_path / f"d{round_}" / "index.db"
        barrier = threading.Barrier(6)
        errors: list[BaseException] = []
        threads = [
            threading.Thread(target=open_index, args=(path, barrier, errors)) for _ in range(6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert errors == []
