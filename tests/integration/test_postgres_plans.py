"""PostgreSQL plans the ledger's statements on the indexes meant for them, whatever the
statistics say.

Intents are pending or running only for a moment, so the statistics that autovacuum's
ANALYZE takes usually find none: the partial indexes over pending and running intents
then look empty to the planner. Under a backlog they are not, and a plan that scans one
of them whole (to look an id up, or to find one actor's due work) costs milliseconds per
statement. Each statement the engine sends is planned here after such an ANALYZE, with
its parameters and without (generic plans), and its plan is checked.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest

from ledger import IntentStatus, LedgerTx
from ledger._pg import PgDirectory, _translate
from ledger._tx import _CLAIM
from ledger.postgres import PostgresStore

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import asyncpg

pytestmark = pytest.mark.anyio

ACTOR = "planned"
PK = "all_intents_pkey"
GLOBAL = ("all_intents_due", "all_intents_leases")


class _Recorded:
    rowcount = 1

    def fetchone(self) -> Any:
        return (None,)

    def fetchall(self) -> list[Any]:
        return []

    def __iter__(self) -> Any:
        return iter(())


class _Recorder:
    """A ledger handle that records the statements sent to it and answers nothing."""

    actor_id = ACTOR
    next_id: int | None = 1
    no_due_pending: bool | None = None

    def __init__(self) -> None:
        self.statements: list[tuple[str, Sequence[Any]]] = []
        self.rows: dict[int, tuple[Any, ...]] = {}

    @property
    def conn(self) -> _Recorder:
        return self

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> _Recorded:
        if not sql.startswith(("SAVEPOINT", "RELEASE", "ROLLBACK")):
            self.statements.append((sql, parameters))
        return _Recorded()

    def write(self, sql: str, parameters: Sequence[Any], /) -> None:
        self.statements.append((sql, parameters))

    def integrity_check(self) -> list[str]:
        return ["ok"]


def _sent(call: Callable[[LedgerTx], object]) -> list[tuple[str, Sequence[Any]]]:
    handle = _Recorder()
    call(LedgerTx(handle, 5_000, ()))  # type: ignore[arg-type]
    return handle.statements


BY_ID: dict[str, Callable[[LedgerTx], object]] = {
    "claim": lambda tx: tx._file.write(_CLAIM, ("t", "h", 9, 1, 7)),  # claim_due's, per row
    "holds_claim": lambda tx: tx.holds_claim(7, "t"),
    "release": lambda tx: tx.release(7, "t", due_at=9, count_attempt=True, redrive=False),
    "wake": lambda tx: tx.wake(7, 9),
    "finish": lambda tx: tx.finish(7, IntentStatus.COMPLETED, [8]),
    "request_cancel": lambda tx: tx.request_cancel(7, reason="r", requested_by=None),
}  # fmt: skip

PER_ACTOR: dict[str, Callable[[LedgerTx], object]] = {
    "claim_due": lambda tx: tx.claim_due(
        limit=8, host_id="h", lease_until=9, tokens=iter(["t"]), kinds=["k"]
    ),
    "has_due_pending": lambda tx: tx.has_due_pending(["k"]),
    "next_pending_due": lambda tx: tx.next_pending_due(["k"]),
    "lost_claims": lambda tx: tx.lost_claims(["dead"]),
    "renew_leases": lambda tx: tx.renew_leases("h", 9, ["t"]),
    "next_due": lambda tx: tx.next_due(),  # the SQLite store's, valid here too
}


async def _plans(conn: asyncpg.Connection, sql: str, parameters: Sequence[Any]) -> list[str]:
    """The index names in the custom and the generic plan of ``sql``."""
    found = []
    for mode in ("force_custom_plan", "force_generic_plan"):
        await conn.execute(f"SET plan_cache_mode = {mode}")
        plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {_translate(sql)}", *parameters)
        found.append(json.dumps(json.loads(plan)))
    return found


def _indexes(plan: str) -> set[str]:
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "Index Name" in node:
                names.add(node["Index Name"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(plan))
    return names


@pytest.fixture
async def analyzed(database_url: str) -> Any:
    """A connection to a database whose only intents are settled, just analyzed: the
    statistics say no intent is pending or running."""
    import asyncpg

    async with PostgresStore(database_url, shards=1) as store:
        for actor in (ACTOR, "other"):

            def settle_many(tx: LedgerTx) -> None:
                for _ in range(300):
                    event, _ = tx.append_intent(
                        trigger_kind="k", intent_event_kind="k.requested", payload=None,
                        due_at=0,
                    )  # fmt: skip
                    tx.finish(event.id, IntentStatus.COMPLETED, [event.id])

            await store.run(actor, settle_many)
    conn = await asyncpg.connect(database_url, server_settings={"search_path": "durable_triggers"})
    try:
        await conn.execute("ANALYZE")
        await conn.execute(f"SET dt.actor = '{ACTOR}'")
        yield conn
    finally:
        await conn.close()


@pytest.mark.parametrize("name", list(BY_ID))
async def test_a_row_found_by_id_is_looked_up_by_its_key(
    name: str, analyzed: asyncpg.Connection
) -> None:
    for sql, parameters in _sent(BY_ID[name]):
        if "intents" not in sql.split(" WHERE ")[0]:
            continue  # an event insert
        for plan in await _plans(analyzed, sql, parameters):
            assert _indexes(plan) <= {PK}, (sql, plan)


@pytest.mark.parametrize("name", list(PER_ACTOR))
async def test_one_actors_scan_does_not_scan_every_actors_due_work(
    name: str, analyzed: asyncpg.Connection
) -> None:
    statements = _sent(PER_ACTOR[name])
    assert statements
    for sql, parameters in statements:
        for plan in await _plans(analyzed, sql, parameters):
            assert not _indexes(plan) & set(GLOBAL), (sql, plan)


async def test_the_scan_for_due_actors_uses_the_due_indexes(
    analyzed: asyncpg.Connection,
) -> None:
    recorder = _Recorder()
    PgDirectory(recorder, "test").due_before(9, 10)  # type: ignore[arg-type]
    [(sql, parameters)] = recorder.statements
    for plan in await _plans(analyzed, sql, parameters):
        assert set(GLOBAL) <= _indexes(plan), plan


def _scans(plan: Any) -> list[dict[str, Any]]:
    """Every node of ``plan`` that reads a table (scans of any kind)."""
    found: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "Relation Name" in node:
                found.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(plan)
    return found


async def test_entering_a_batch_looks_at_the_actors_own_rows(
    analyzed: asyncpg.Connection,
) -> None:
    """The statements inside ``enter_batch`` (shown by ``auto_explain``) read events and
    intents only by the actor's own keys, a lookup per actor or row: each writer's last id
    in the events' primary key, its due check in its own pending intents (never every
    actor's due work, not even through a hashed subplan), each read-ahead row by its key."""
    notices: list[str] = []
    analyzed.add_log_listener(lambda _conn, message: notices.append(message.message))
    await analyzed.execute(
        "LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0;"
        " SET auto_explain.log_nested_statements = on; SET auto_explain.log_level = notice;"
        " SET auto_explain.log_format = json"
    )
    for mode in ("force_custom_plan", "force_generic_plan"):  # (the function sets its own)
        await analyzed.execute(f"SET plan_cache_mode = {mode}")
        notices.clear()
        async with analyzed.transaction():
            await analyzed.fetch(
                "SELECT * FROM enter_batch($1, $2, $3, $4, $5, $6, $7)",
                ["other", ACTOR], [True, True], [False, False], 10_000, [ACTOR], [7], ["k"],
            )  # fmt: skip
        scans = []
        for notice in notices:
            plan = json.loads(notice[notice.index("{") :])
            scans += [(plan["Query Text"], scan) for scan in _scans(plan["Plan"])]
        ledger_scans = [
            (text, scan)
            for text, scan in scans
            if scan["Relation Name"] in ("all_events", "all_intents")
        ]
        indexes = {scan.get("Index Name") for _, scan in ledger_scans}
        assert {"all_events_pkey", "all_intents_pending", PK} <= indexes, scans
        assert not indexes & set(GLOBAL), scans
        for text, scan in ledger_scans:
            assert scan["Node Type"] in ("Index Scan", "Index Only Scan"), (text, scan)
            assert "actor_id = " in scan["Index Cond"], (text, scan)
            if "r.n" in text:  # the read-ahead
                assert scan["Index Name"] == PK, (text, scan)
                assert "id = " in scan["Index Cond"].replace("actor_id = ", ""), (text, scan)
