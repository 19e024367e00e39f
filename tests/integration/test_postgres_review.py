"""Review regressions for the PostgreSQL backend (lazy savepoints, batches, retries).

Each test states the semantics the SQLite backend already has (``Store.run``: each operation
runs in its own savepoint; if it raises, *its* writes are rolled back and the error is raised
to its caller, nothing else changes) and exercises them on PostgreSQL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import pytest

from actors import ActorHost, define_agent_do
from ledger import LedgerError, LedgerWriteError
from ledger.postgres import PostgresStore
from tests.helpers import fast_config, make_trigger

if TYPE_CHECKING:
    from collections.abc import Callable

    from ledger import LedgerTx

pytestmark = pytest.mark.anyio

BAD_KEY = "key\x00with-nul"
"""An idempotency key PostgreSQL's text type refuses. When these tests were written, the SELECT
that looks the key up (a *read*, so no savepoint had been sent yet) failed on the server and
aborted the transaction; ``check_text`` now refuses it before anything is sent. They still pin
that a refused operation fails alone and leaves its neighbours' writes intact. A read that
fails on the server itself now fails its whole batch (``docs/postgres.md``, "What differs");
``test_postgres_queue.py`` covers that side."""


def _enqueue_with_bad_key(tx: LedgerTx) -> Any:
    return tx.append_intent(
        trigger_kind="k", intent_event_kind="k.requested", payload=None, due_at=0,
        idempotency_key=BAD_KEY,
    )  # fmt: skip


async def _one_batch(
    store: PostgresStore, ops: list[tuple[str, Callable[[LedgerTx], Any]]]
) -> list[tuple[Any, BaseException | None]]:
    """Queue ``ops`` with no await in between (so one pump batch, one transaction, on a
    one-shard store) and return ``(result, error)`` of each, in order."""
    results: list[tuple[Any, BaseException | None] | None] = [None] * len(ops)
    finished = anyio.Event()

    def after(index: int) -> Callable[[Any, BaseException | None], None]:
        def done(result: Any, error: BaseException | None) -> None:
            results[index] = (result, error)
            if all(r is not None for r in results):
                finished.set()

        return done

    for index, (actor_id, fn) in enumerate(ops):
        store.submit(actor_id, fn, after(index))
    with anyio.fail_after(20):
        await finished.wait()
    return [r for r in results if r is not None]


async def _seed(store: PostgresStore, *actors: str) -> None:
    """Give each actor a ledger holding one event (id 1), each in its own transaction."""
    for actor in actors:
        await store.run(actor, lambda tx: tx.insert_event("seed", {}))


async def _between_neighbours(
    store: PostgresStore, fn: Callable[[LedgerTx], Any]
) -> list[tuple[Any, BaseException | None]]:
    """Seed a, b and c, then run in one batch: a writes ``a.ok``, b runs ``fn``, c writes
    ``c.ok``. Returns the three ``(result, error)``."""
    await _seed(store, "a", "b", "c")
    return await _one_batch(
        store,
        [
            ("a", lambda tx: tx.insert_event("a.ok", {}).id),
            ("b", fn),
            ("c", lambda tx: tx.insert_event("c.ok", {}).id),
        ],
    )


def _kinds(store: PostgresStore, actor_id: str) -> Any:
    return store.run(actor_id, lambda tx: [(e.id, e.kind) for e in tx.events()], write=False)


async def test_a_failed_read_fails_only_its_own_operation(database_url: str) -> None:
    """An operation whose read fails on the server (before any write, so its lazy savepoint
    was never sent) must fail alone. Today the transaction stays aborted: the next actor's
    lock fails and every operation of every actor in the batch fails."""
    async with PostgresStore(database_url, shards=1) as store:
        results = await _between_neighbours(store, _enqueue_with_bad_key)
        assert isinstance(results[1][1], LedgerError)
        assert results[0] == (2, None), results[0]
        assert results[2] == (2, None), results[2]
        assert await _kinds(store, "a") == [(1, "seed"), (2, "a.ok")]
        assert await _kinds(store, "c") == [(1, "seed"), (2, "c.ok")]


async def test_a_failed_read_does_not_undo_an_earlier_successful_operation(
    database_url: str,
) -> None:
    """Same actor, one batch: op1 writes (its SAVEPOINT is sent, RELEASE is dropped), op2's
    read fails (its SAVEPOINT never sent, so its ROLLBACK TO is dropped and the transaction
    stays aborted), op3 starts with an UPDATE: flushing ``SAVEPOINT op`` fails, and its
    ``ROLLBACK TO op`` is really sent -- to *op1's* savepoint. op1's event is silently
    undone although op1 was answered with its id, and that id is handed out again."""
    async with PostgresStore(database_url, shards=1) as store:
        await _seed(store, "a")
        results = await _one_batch(
            store,
            [
                ("a", lambda tx: tx.insert_event("one", {}).id),
                ("a", _enqueue_with_bad_key),
                ("a", lambda tx: tx.request_cancel(1, reason="r", requested_by=None)),
                ("a", lambda tx: tx.insert_event("four", {}).id),
            ],
        )
        one, four = results[0], results[3]
        assert isinstance(results[1][1], LedgerError)
        events = await _kinds(store, "a")
        if one[1] is None:  # op1 was told it committed: its event must be there
            assert (one[0], "one") in events, (one, events)
        if four[1] is None:
            assert (four[0], "four") in events, (four, events)
        assert len({e[0] for e in events}) == len(events)


async def test_an_operation_never_writes_another_actors_ledger(database_url: str) -> None:
    """Actor a's op writes; actor b's first op fails on a read, its second starts with an
    UPDATE whose failed savepoint flush sends ``ROLLBACK TO op`` -- rolling back to *a's*
    savepoint, which also undoes ``set_config('dt.actor', 'b')`` and b's row lock. b's third
    op then runs with ``dt.actor = 'a'``: its event lands in a's ledger."""
    async with PostgresStore(database_url, shards=1) as store:
        await _seed(store, "a", "b")
        await _one_batch(
            store,
            [
                ("a", lambda tx: tx.insert_event("a.one", {}).id),
                ("b", _enqueue_with_bad_key),
                ("b", lambda tx: tx.request_cancel(1, reason="r", requested_by=None)),
                ("b", lambda tx: tx.insert_event("b.three", {}).id),
            ],
        )
        a_kinds = [kind for _, kind in await _kinds(store, "a")]
        b_kinds = [kind for _, kind in await _kinds(store, "b")]
        assert "b.three" not in a_kinds, a_kinds
        assert "a.one" not in b_kinds, b_kinds


async def test_a_client_side_read_error_fails_only_its_operation(database_url: str) -> None:
    """asyncpg refuses an out-of-range bigint before sending anything: the transaction is
    fine, but ``PgConnection`` marks it aborted (the savepoint was never sent, so nothing
    clears the flag) and ``commit()`` then fails every operation of the batch."""
    async with PostgresStore(database_url, shards=1) as store:
        await _seed(store, "a", "b")
        results = await _one_batch(
            store,
            [
                ("a", lambda tx: tx.insert_event("a.ok", {}).id),
                ("b", lambda tx: tx.intent_row(1 << 70)),
            ],
        )
        assert results[1][1] is not None
        assert results[0] == (2, None), results[0]


async def test_concurrent_enqueues_are_not_failed_by_a_neighbours_bad_key(
    database_url: str,
) -> None:
    """Through the public API: three actors enqueue at once (one batch on a one-shard
    host); the one with an idempotency key PostgreSQL refuses must fail alone."""
    spec = define_agent_do(triggers=[make_trigger("test.work")])
    async with ActorHost(
        spec, database_url=database_url, run_scheduler=False, shards=1, config=fast_config()
    ) as client:
        outcomes: dict[str, BaseException | None] = {}

        async def enqueue(name: str, key: str | None) -> None:
            try:
                await client.get(name).enqueue_trigger(
                    trigger_kind="test.work", idempotency_key=key
                )
            except LedgerError as exc:
                outcomes[name] = exc
            else:
                outcomes[name] = None

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(enqueue, "a", None)
                tg.start_soon(enqueue, "b", BAD_KEY)
                tg.start_soon(enqueue, "c", None)
        assert isinstance(outcomes["b"], LedgerError)
        assert outcomes["a"] is None, outcomes["a"]
        assert outcomes["c"] is None, outcomes["c"]


async def test_a_batch_that_lost_its_connection_runs_its_operations_once(
    database_url: str,
) -> None:
    """The connection drops mid-batch, before COMMIT. Operations may keep state of their own
    (the scheduler's claim takes attempt slots, ``Slots.take``, and gives ``Taken.count`` back
    when the claim fails), so the batch is not run again: each operation ran once and failed
    with ``LedgerWriteError``, nothing was written, and giving back what the claim recorded
    frees every slot."""
    from triggers._engine import claim_op
    from triggers._slots import Slots, Taken

    spec = define_agent_do(triggers=[make_trigger("test.work")])
    async with PostgresStore(database_url, shards=1) as store:
        await store.run(
            "a",
            lambda tx: tx.append_intent(
                trigger_kind="test.work", intent_event_kind="test.work.requested",
                payload=None, due_at=0,
            ),
        )  # fmt: skip
        await _seed(store, "b")
        slots, taken = Slots(4), Taken()
        claim = claim_op(
            spec.registry, limit=4, host_id="h1", lease_ms=60_000, dead_owners=(),
            own_tokens=set(), max_redrives=3, slots=slots, taken=taken,
        )  # fmt: skip
        dropped = False

        def drop_connection_once(tx: LedgerTx) -> None:
            nonlocal dropped
            if not dropped:
                dropped = True
                tx._file.conn.raw.terminate()  # type: ignore[attr-defined]

        results = await _one_batch(store, [("a", claim), ("b", drop_connection_once)])
        assert dropped
        assert isinstance(results[0][1], LedgerWriteError), results[0]
        assert "nothing was written" in str(results[0][1])
        assert taken.count == 1  # the claim ran once
        slots.give(taken.count)  # what the scheduler does when a claim fails
        assert slots.free == slots.total
        rows = await store.run("a", lambda tx: tx.intent_rows(), write=False)
        assert [row.status for row in rows] == ["pending"]
