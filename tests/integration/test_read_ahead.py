"""Schedule rows read ahead with an actor's lock (``Store.run(reads=)``) are never stale.

On PostgreSQL a batch locks its actors and reads the rows its operations name in one round
trip, before any of them runs. An operation earlier in the same batch may write that row:
the later read must see the write, as it would on SQLite, where nothing is read ahead.
Each case below writes an intent one way, then reads it with the hint, in one batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import pytest

from ledger import IntentStatus
from tests.helpers import open_store, wait_for_lock_waiter

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from ledger import LedgerTx, Store

pytestmark = [pytest.mark.anyio, pytest.mark.contract]

KIND = "k"
NOW = 1_000_000
LATER = NOW + 60_000


def _pending(due_at: int = 0, key: str | None = None) -> Callable[[LedgerTx], int]:
    def op(tx: LedgerTx) -> int:
        event, _ = tx.append_intent(
            trigger_kind=KIND,
            intent_event_kind="k.requested",
            payload=None,
            due_at=due_at,
            idempotency_key=key,
        )
        return event.id

    return op


def _claim(tx: LedgerTx) -> None:
    [row] = tx.claim_due(limit=1, host_id="h", lease_until=LATER, tokens=["t1"], kinds=[KIND])
    assert row.claim_token == "t1"


def _running(tx: LedgerTx) -> int:
    intent_id = _pending()(tx)
    _claim(tx)
    return intent_id


def _finished_with_key(tx: LedgerTx) -> int:
    intent_id = _pending(key="key")(tx)
    _claim(tx)
    tx.finish(intent_id, IntentStatus.COMPLETED, [intent_id])
    return intent_id


def _reclaim(tx: LedgerTx, intent_id: int) -> None:
    [row] = tx.intent_rows(status="running")  # not through intent_row: the entry stays
    assert row.id == intent_id
    tx.reclaim(row, token="t2", host_id="h2", lease_until=LATER + 1)


def _reuse_key(tx: LedgerTx, intent_id: int) -> None:
    _, created = tx.append_intent(
        trigger_kind=KIND,
        intent_event_kind="k.requested",
        payload=None,
        due_at=0,
        idempotency_key="key",
        key_retention_ms=0,
    )
    assert created


# name: (set-up returning the intent id, a write of that intent)
CASES: dict[str, tuple[Callable[[LedgerTx], int], Callable[[LedgerTx, int], Any]]] = {
    "request_cancel": (
        _pending(),
        lambda tx, i: tx.request_cancel(i, reason="stop", requested_by="test"),
    ),
    "release": (
        _running,
        lambda tx, i: tx.release(i, "t1", due_at=LATER, count_attempt=True, redrive=False),
    ),
    "reschedule": (_running, lambda tx, i: tx.reschedule(i, LATER)),
    "wake": (_pending(due_at=LATER), lambda tx, i: tx.wake(i, 5)),
    "finish": (_running, lambda tx, i: tx.finish(i, IntentStatus.FAILED, [i])),
    "reclaim": (_running, _reclaim),
    "claim_due": (_pending(), lambda tx, i: _claim(tx)),
    "renew_leases": (_running, lambda tx, i: tx.renew_leases("h", LATER + 5, ["t1"])),
    "idempotency key reused": (_finished_with_key, _reuse_key),
}


async def _one_batch(
    store: Store, ops: list[tuple[Callable[[LedgerTx], Any], int | tuple[int, ...] | None]]
) -> list[Any]:
    """Queue ``ops`` of actor ``a`` (each with its ``reads`` hint) with no await in between,
    so a one-shard store runs them in one batch; their results, in order."""
    results: dict[int, tuple[Any, BaseException | None]] = {}
    finished = anyio.Event()

    def after(index: int) -> Callable[[Any, BaseException | None], None]:
        def done(result: Any, error: BaseException | None) -> None:
            results[index] = (result, error)
            if len(results) == len(ops):
                finished.set()

        return done

    for index, (fn, reads) in enumerate(ops):
        store.submit("a", fn, after(index), reads=reads)
    with anyio.fail_after(20):
        await finished.wait()
    for _, error in results.values():
        if error is not None:
            raise error
    return [results[index][0] for index in range(len(ops))]


def _row(intent_id: int) -> Callable[[LedgerTx], Any]:
    return lambda tx: tx.intent_row(intent_id)


@pytest.mark.parametrize("case", list(CASES))
async def test_a_row_read_ahead_shows_the_writes_made_before_it_in_the_batch(
    case: str, tmp_path: Path
) -> None:
    set_up, write = CASES[case]
    async with open_store(tmp_path, shards=1, clock=lambda: NOW) as store:
        intent_id = await store.run("a", set_up)
        before = await store.run("a", _row(intent_id))
        _, read = await _one_batch(
            store, [(lambda tx: write(tx, intent_id), None), (_row(intent_id), intent_id)]
        )
        after = await store.run("a", _row(intent_id))
    assert after != before, "the case must change the row"
    assert read == after


@pytest.mark.parametrize("case", list(CASES))
async def test_a_row_read_ahead_and_used_before_a_write_is_the_row_before_it(
    case: str, tmp_path: Path
) -> None:
    set_up, write = CASES[case]
    async with open_store(tmp_path, shards=1, clock=lambda: NOW) as store:
        intent_id = await store.run("a", set_up)
        before = await store.run("a", _row(intent_id))
        read, _, again = await _one_batch(
            store,
            [
                (_row(intent_id), intent_id),
                (lambda tx: write(tx, intent_id), None),
                (_row(intent_id), intent_id),
            ],
        )
        after = await store.run("a", _row(intent_id))
    assert read == before
    assert again == after != before


async def test_a_hint_for_a_missing_intent_reads_none(tmp_path: Path) -> None:
    async with open_store(tmp_path, shards=1, clock=lambda: NOW) as store:
        intent_id = await store.run("a", _pending())
        rows = await _one_batch(
            store, [(_row(intent_id + 1), intent_id + 1), (_row(0), 0), (_row(-4), -4)]
        )
    assert rows == [None, None, None]


async def test_a_hint_for_another_intent_does_not_answer_for_it(tmp_path: Path) -> None:
    async with open_store(tmp_path, shards=1, clock=lambda: NOW) as store:
        one = await store.run("a", _running)
        two = await store.run("a", _pending(due_at=LATER))
        first, second = await _one_batch(store, [(_row(one), two), (_row(two), one)])
    assert first is not None
    assert (first.id, first.status) == (one, "running")
    assert second is not None
    assert (second.id, second.status) == (two, "pending")


async def test_a_hint_may_name_several_intents(tmp_path: Path, backend: str) -> None:
    """``reads=`` as a tuple: on PostgreSQL every row named is read ahead with the lock, and
    a row written later in the batch is read again, current."""
    async with open_store(tmp_path, shards=1, clock=lambda: NOW) as store:
        one = await store.run("a", _running)
        two = await store.run("a", _pending(due_at=LATER))
        before = [await store.run("a", _row(one)), await store.run("a", _row(two))]
        ahead: list[set[int]] = []

        def read_both(tx: LedgerTx) -> list[Any]:
            ahead.append(set(tx._file.rows))  # what is read ahead, before any read
            return [tx.intent_row(one), tx.intent_row(two)]

        first, _, again = await _one_batch(
            store,
            [
                (read_both, (one, two)),
                (lambda tx: tx.request_cancel(two, reason="stop", requested_by=None), None),
                (read_both, (one, two)),
            ],
        )
        after = [await store.run("a", _row(one)), await store.run("a", _row(two))]
    assert first == before
    assert again == after != before
    assert [row.cancel_reason for row in again] == [None, "stop"]
    if backend == "postgres":
        assert ahead[0] == {one, two}


async def test_rows_read_after_a_lock_wait_are_current_under_repeatable_read(
    backend: str,
) -> None:
    """A database whose default isolation is REPEATABLE READ: a batch still sees, in the
    rows it reads ahead, what the batch it waited for committed (batches begin READ
    COMMITTED)."""
    if backend != "postgres":
        pytest.skip("isolation levels and lock waits between stores are PostgreSQL's")
    import asyncpg

    from tests import helpers

    database_url = helpers.DATABASE_URL
    assert database_url is not None
    from ledger._bridge import wait_for
    from ledger.postgres import PostgresStore

    conn = await asyncpg.connect(database_url)
    try:
        name = await conn.fetchval("SELECT current_database()")
        await conn.execute(
            f"ALTER DATABASE {name} SET default_transaction_isolation = 'repeatable read'"
        )
    finally:
        await conn.close()
    async with (
        PostgresStore(database_url, shards=1, clock=lambda: NOW) as one,
        PostgresStore(database_url, shards=1, clock=lambda: NOW) as two,
    ):
        intent_id = await one.run("a", _pending())
        holding, gate = anyio.Event(), anyio.Event()

        def cancel_and_hold(tx: LedgerTx) -> None:
            tx.request_cancel(intent_id, reason="stop", requested_by=None)
            holding.set()
            wait_for(gate.wait())  # the batch stays open: a's row stays locked

        done: dict[str, Any] = {}
        both = anyio.Event()

        def record(name: str) -> Callable[[Any, BaseException | None], None]:
            def after(result: Any, error: BaseException | None) -> None:
                done[name] = (result, error)
                if len(done) == 2:
                    both.set()

            return after

        one.submit("a", cancel_and_hold, record("one"))
        with anyio.fail_after(10):
            await holding.wait()
        two.submit("a", _row(intent_id), record("two"), reads=intent_id)
        await wait_for_lock_waiter(database_url)
        gate.set()
        with anyio.fail_after(10):
            await both.wait()
    assert done["one"][1] is None
    row, error = done["two"]
    assert error is None
    assert row.cancel_reason == "stop"
