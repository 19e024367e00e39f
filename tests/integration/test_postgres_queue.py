"""The PostgreSQL connection's write queue: writes nobody reads travel as text, together.

``PgConnection.defer`` holds back writes whose result is not read and sends them with the
next statement that needs them (or with COMMIT), rendered as ``EXECUTE name(literals)``.
These tests pin what that must never change: every value arrives exactly as given, each
write lands in its own actor's ledger, a rolled-back operation's queued writes never reach
the server, and a write that fails fails the whole batch with nothing written.
"""

from __future__ import annotations

import enum
import random
from typing import TYPE_CHECKING, Any

import pytest

from ledger import LedgerWriteError, PayloadError
from ledger._pg import _arguments, _literal
from ledger.postgres import PostgresStore
from tests.integration.test_postgres_review import (
    _between_neighbours,
    _kinds,
    _one_batch,
    _seed,
)

if TYPE_CHECKING:
    from ledger import LedgerTx

pytestmark = pytest.mark.anyio

TRICKY = [
    "'",
    "''",
    "\\",
    "\\'",
    "'\\",
    "it's",
    "'; DROP TABLE durable_triggers.all_events; --",
    "$$",
    "$tag$ x $tag$",
    "-- comment",
    "/* open",
    "?",
    "$1",
    " RETURNING ",
    "E'\\x41'",
    "\n\r\t\x01\x7f",
    "é, 𝄞, 中文, \u200b",
    "x" * 100_000,
]


class _Number(enum.IntEnum):
    MINUS = -3


class _Word(enum.StrEnum):
    QUOTE = "a'b"


def test_literals_are_exact_sql_constants() -> None:
    assert _literal(None) == "NULL"
    assert _literal(True) == "TRUE"
    assert _literal(False) == "FALSE"
    assert _literal(0) == "0"
    assert _literal(1 << 62) == str(1 << 62)
    # A negative number is parenthesized: "attempts - -1" would read as a comment.
    assert _literal(-1) == "(-1)"
    assert _literal(_Number.MINUS) == "(-3)"
    assert _literal("it's") == "'it''s'"
    assert _literal("\\") == "'\\'"
    assert _literal(_Word.QUOTE) == "'a''b'"
    for refused in ("nul\x00", "lone \ud800", 1.5, b"bytes", [1]):
        with pytest.raises(TypeError):
            _literal(refused)


def test_arguments_render_as_the_literals_do() -> None:
    """``_arguments`` renders common values inline; every value comes out as ``_literal``
    would render it, and a value with no literal is refused the same way."""
    values = [None, True, False, 0, 7, -1, 1 << 62, _Number.MINUS, _Word.QUOTE, *TRICKY]
    assert _arguments(values) == "(" + ", ".join(_literal(value) for value in values) + ")"
    assert _arguments([]) == ""
    for refused in ("nul\x00", "lone \ud800", 1.5, b"bytes", [1]):
        with pytest.raises(TypeError):
            _arguments([1, "a", refused])


async def test_every_string_arrives_exactly_as_given(database_url: str) -> None:
    """Event kinds are written raw as literals (payloads go as JSON text): quotes,
    backslashes, SQL, dollar quotes and any unicode arrive unchanged and do nothing else."""
    rng = random.Random(20261130)
    alphabet = "'\\\"$?-;/*\n\t é𝄞\u2028x"
    randoms = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(60)]
    kinds = TRICKY + randoms
    async with PostgresStore(database_url, shards=1) as store:

        def write_all(tx: LedgerTx) -> list[int]:
            return [tx.insert_event(kind, {"text": kind}).id for kind in kinds]

        ids = await store.run("a", write_all)
        events = await store.run("a", lambda tx: tx.events(), write=False)
        assert [e.id for e in events] == ids
        assert [e.kind for e in events] == kinds
        assert [e.payload for e in events] == [{"text": kind} for kind in kinds]
        # Nothing ran but the inserts: the tables are all there.
        assert await store.exists("a")


async def test_negative_and_large_numbers_arrive_exactly(database_url: str) -> None:
    async with PostgresStore(database_url, shards=1) as store:

        def write(tx: LedgerTx) -> int:
            event, _ = tx.append_intent(
                trigger_kind="k", intent_event_kind="k.requested", payload=None, due_at=5
            )
            tx.reschedule(event.id, -(1 << 53))
            return event.id

        intent_id = await store.run("a", write)
        row = await store.run("a", lambda tx: tx.intent_row(intent_id), write=False)
        assert row is not None
        assert row.due_at == -(1 << 53)


async def test_queued_writes_land_in_their_own_actors_ledger(database_url: str) -> None:
    """Writes of several actors wait in one queue and are sent together; each is sent under
    its own actor. Here b's operation sends the queue (its UPDATE needs a row count), then
    fails and rolls back to its savepoint: that must leave the views on b, not on a (a
    savepoint taken after the switch back to b would be rolled back to a)."""
    async with PostgresStore(database_url, shards=1) as store:
        await _seed(store, "a", "b")

        def b_fails_after_a_flush(tx: LedgerTx) -> None:
            tx.insert_event("b.undone", {})
            tx.request_cancel(12345, reason=None, requested_by=None)  # sends the queue
            raise ValueError("b changes its mind")

        results = await _one_batch(
            store,
            [
                ("a", lambda tx: tx.insert_event("a.one", {}).id),
                ("b", b_fails_after_a_flush),
                ("b", lambda tx: tx.insert_event("b.two", {}).id),
            ],
        )
        assert results[0] == (2, None)
        assert isinstance(results[1][1], ValueError)
        assert results[2] == (2, None)
        assert await _kinds(store, "a") == [(1, "seed"), (2, "a.one")]
        assert await _kinds(store, "b") == [(1, "seed"), (2, "b.two")]


async def test_a_rolled_back_operation_sends_none_of_its_writes(database_url: str) -> None:
    """Same actor, one batch: the middle operation's queued writes are dropped with its
    savepoint; the ids of the next operation follow on from what is really there."""
    async with PostgresStore(database_url, shards=1) as store:
        await _seed(store, "a")

        def fails(tx: LedgerTx) -> None:
            tx.insert_event("undone.1", {})
            tx.insert_event("undone.2", {})
            raise ValueError("no")

        def nested(tx: LedgerTx) -> int:
            tx.insert_event("outer.1", {})
            try:
                with tx.savepoint():
                    tx.insert_event("inner", {})
                    raise KeyError("inner only")
            except KeyError:
                pass
            return tx.insert_event("outer.2", {}).id

        results = await _one_batch(
            store,
            [
                ("a", lambda tx: tx.insert_event("one", {}).id),
                ("a", fails),
                ("a", nested),
            ],
        )
        assert results[0] == (2, None)
        assert isinstance(results[1][1], ValueError)
        assert results[2] == (4, None)
        assert await _kinds(store, "a") == [(1, "seed"), (2, "one"), (3, "outer.1"), (4, "outer.2")]


async def test_a_failed_queued_write_fails_the_whole_batch(database_url: str) -> None:
    """A queued write is only checked by the server when the queue is sent, after other
    operations have run: the batch cannot be cut apart then, so every operation fails,
    nothing is written, and the store goes on working."""
    async with PostgresStore(database_url, shards=1) as store:
        await _seed(store, "a", "b")

        def duplicate_id(tx: LedgerTx) -> Any:
            tx._file.next_id = 1  # the seed's id: a conflict
            return tx.insert_event("clash", {}).id

        results = await _one_batch(
            store,
            [
                ("a", lambda tx: tx.insert_event("a.one", {}).id),
                ("b", duplicate_id),
            ],
        )
        assert all(isinstance(error, LedgerWriteError) for _, error in results), results
        assert await _kinds(store, "a") == [(1, "seed")]
        assert await _kinds(store, "b") == [(1, "seed")]
        assert await store.run("a", lambda tx: tx.insert_event("a.two", {}).id) == 2


async def test_a_read_with_a_nul_fails_only_its_operation(database_url: str) -> None:
    """PostgreSQL refuses NUL in text and would abort the transaction before the reading
    operation's savepoint is sent; the connection refuses it first, so only that
    operation fails."""
    async with PostgresStore(database_url, shards=1) as store:
        results = await _between_neighbours(store, lambda tx: tx.events(kinds=["bad\x00kind"]))
        assert isinstance(results[1][1], PayloadError)
        assert results[0] == (2, None)
        assert results[2] == (2, None)


def test_a_sent_queue_leaves_the_views_on_the_current_actor() -> None:
    """Each queued write is sent under its own actor, and the text ends by switching back
    to the actor the next statement expects."""
    from ledger._pg import PgConnection

    conn = PgConnection(None, "test")  # never sends here
    conn.actor = "b"
    conn._queue = [("EXECUTE w('a')", "a", True), ("SAVEPOINT op", "b", False)]
    assert conn._script() == [
        "SET LOCAL dt.actor = 'a'",
        "EXECUTE w('a')",
        "SET LOCAL dt.actor = 'b'",
        "SAVEPOINT op",
    ]
    conn._queue = [("EXECUTE w('x''y')", "x'y", True)]
    assert conn._script() == [
        "SET LOCAL dt.actor = 'x''y'",
        "EXECUTE w('x''y')",
        "SET LOCAL dt.actor = 'b'",
    ]
    assert conn._script(savepoints=False)[-1] == "SET LOCAL dt.actor = 'b'"


class _Undo(Exception):
    pass


def _nested_rollbacks(tx: LedgerTx) -> int:
    try:
        with tx.savepoint():
            tx.insert_event("outer", {})
            try:
                with tx.savepoint():
                    tx.events()  # a read of an actor with queued writes: both savepoints go
                    raise _Undo
            except _Undo:
                pass
            raise _Undo  # must undo "outer" too
    except _Undo:
        pass
    return tx.insert_event("after", {}).id


async def test_rolling_back_an_outer_savepoint_undoes_its_writes(database_url: str) -> None:
    """Nested savepoints share a name. The inner one, sent and rolled back, is released by
    a queued command; rolling back the outer one must not stop at the inner one, which the
    server still has until that command is sent."""
    async with PostgresStore(database_url, shards=1) as store:
        await _seed(store, "a")
        assert await store.run("a", _nested_rollbacks) == 2
        assert await _kinds(store, "a") == [(1, "seed"), (2, "after")]


async def test_a_lone_surrogate_fails_only_its_operation(database_url: str) -> None:
    """JSON keeps a lone surrogate, which UTF-8 cannot carry: the write goes with
    parameters and asyncpg refuses it alone, instead of breaking the queued text (and the
    connection, and every operation of the batch) when it is sent."""
    async with PostgresStore(database_url, shards=1) as store:
        await _seed(store, "a", "b")
        results = await _one_batch(
            store,
            [
                ("a", lambda tx: tx.insert_event("a.ok", {}).id),
                ("b", lambda tx: tx.insert_event("b.bad", {"s": "x\ud800"}).id),
            ],
        )
        assert results[1][1] is not None
        assert results[0] == (2, None), results[0]
        assert await _kinds(store, "a") == [(1, "seed"), (2, "a.ok")]
        assert await _kinds(store, "b") == [(1, "seed")]


class _FailingSend:
    """Stands in for the asyncpg connection for one send of the queue, which fails on the
    client side as a broken driver would: nothing reaches the server, the transaction is
    intact, and the queued writes are gone."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)

    async def execute(self, query: str, *args: Any) -> str:
        if not args and "EXECUTE dt_w" in query:
            raise RuntimeError("the driver failed before sending")
        result: str = await self.raw.execute(query, *args)
        return result


async def test_a_failed_send_of_the_queue_never_commits_without_it(database_url: str) -> None:
    """a's write waits in the queue; b's read sends it, and the send fails on the client
    side. b fails; a must not be told its event committed while it was lost."""
    async with PostgresStore(database_url, shards=1) as store:
        await _seed(store, "a", "b")

        def b_sends_the_queue(tx: LedgerTx) -> None:
            conn: Any = tx._file.conn
            raw = conn.raw
            tx.insert_event("b.one", {})
            conn.raw = _FailingSend(raw)
            try:
                tx.events()  # b has queued writes: the queue goes first, and fails
            finally:
                conn.raw = raw

        results = await _one_batch(
            store,
            [
                ("a", lambda tx: tx.insert_event("a.one", {}).id),
                ("b", b_sends_the_queue),
            ],
        )
        assert results[1][1] is not None
        a_events = await _kinds(store, "a")
        if results[0][1] is None:
            assert (2, "a.one") in a_events, (results[0], a_events)
        else:
            assert a_events == [(1, "seed")]
        assert await _kinds(store, "b") == [(1, "seed")]
