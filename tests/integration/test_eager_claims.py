"""An enqueue that claims its own due intent at once (an eager claim) lets older due work
go first, also when earlier operations of the same batch changed what is due; a full claim
says whether due work is left, also when another host committed it while the claim waited
for the actor's lock."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from ledger import dump_json
from ledger._bridge import wait_for
from tests import helpers
from tests.helpers import make_trigger, open_store, wait_for_lock_waiter
from triggers._engine import ClaimResult, EagerClaim, Enqueued, claim_op, enqueue_op
from triggers._slots import Slots, Taken
from triggers._spec import TriggerRegistry

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from ledger import LedgerTx, Store

pytestmark = [pytest.mark.anyio, pytest.mark.contract]

REGISTRY = TriggerRegistry([make_trigger("test.work")])
TRIGGER = REGISTRY.get("test.work")
EAGER = EagerClaim("host-a", 60_000, REGISTRY.kinds)
ACTOR = "eager"


def enqueue(
    n: int, *, eager: bool = False, due_at: int | None = None
) -> Callable[[LedgerTx], Enqueued]:
    payload = {"n": n}
    return enqueue_op(
        TRIGGER, payload, dump_json(payload), due_at, None, 0, EAGER if eager else None
    )


def failing(op: Callable[[LedgerTx], Any]) -> Callable[[LedgerTx], Any]:
    """``op``, then an error: its writes are rolled back."""

    def run(tx: LedgerTx) -> Any:
        op(tx)
        raise RuntimeError("rolled back")

    return run


async def one_batch(store: Store, ops: list[Callable[[LedgerTx], Any]]) -> list[Any]:
    """Run ``ops`` on one actor, queued together so that they share one batch; each gives
    its result or its error."""
    pending = [Pending(store, op) for op in ops]  # no await in between: one batch
    with anyio.fail_after(10):
        for each in pending:
            await each.done.wait()
    return [each.value for each in pending]


def nested_enqueue(n: int) -> Callable[[LedgerTx], None]:
    """An operation that records a due intent in a nested savepoint, then rolls it back."""

    def op(tx: LedgerTx) -> None:
        try:
            with tx.savepoint():
                enqueue(n)(tx)
                raise RuntimeError("inner")
        except RuntimeError:
            pass

    return op


def claimed(result: Any) -> bool:
    assert isinstance(result, Enqueued), result
    return result.claimed is not None


async def test_an_older_due_intent_goes_first(tmp_path: Path) -> None:
    async with open_store(tmp_path) as store:
        [older] = await one_batch(store, [enqueue(1, eager=False)])
        [newer] = await one_batch(store, [enqueue(2, eager=True)])
        assert not claimed(older)
        assert not claimed(newer)


async def test_eager_claims_follow_the_writes_earlier_in_their_batch(tmp_path: Path) -> None:
    """Within one batch: eager claims go on while nothing else is due; a due intent left
    pending stops them; a future one or a rolled-back one does not."""
    async with open_store(tmp_path) as store:
        results = await one_batch(
            store,
            [
                enqueue(1, eager=True),
                enqueue(2, eager=True),
                enqueue(3, eager=False, due_at=2**52),  # far in the future: not due
                failing(enqueue(4, eager=False)),  # due, but rolled back
                enqueue(5, eager=True),
                enqueue(6, eager=False),  # due and left pending
                enqueue(7, eager=True),
            ],
        )
        assert isinstance(results[3], RuntimeError)
        outcome = [claimed(r) for i, r in enumerate(results) if i != 3]
        assert outcome == [True, True, False, True, False, False]


NOW = 1_000_000


def clock() -> int:
    return NOW


def claim(limit: int) -> Callable[[LedgerTx], ClaimResult]:
    return claim_op(
        REGISTRY,
        limit=limit,
        host_id="host-a",
        lease_ms=60_000,
        dead_owners=(),
        own_tokens=set(),
        max_redrives=5,
        slots=Slots(100),
        taken=Taken(),
    )


class Pending:
    """One queued operation: ``done`` is set once it has run; ``value`` is its result or
    its error."""

    def __init__(self, store: Store, op: Callable[[LedgerTx], Any]) -> None:
        self.done = anyio.Event()
        self.value: Any = None
        store.submit(ACTOR, op, self._after)

    def _after(self, result: Any, error: BaseException | None) -> None:
        self.value = error if error is not None else result
        self.done.set()


async def test_a_full_claim_says_more_when_due_work_came_in_while_it_waited_for_the_lock(
    tmp_path: Path, backend: str
) -> None:
    """Another host commits two due intents while this claim (of one) waits for the actor's
    lock; the claim takes one and must say that more is due."""
    if backend != "postgres":
        pytest.skip("the lock's knowledge of what is due exists on PostgreSQL only")
    url = helpers.DATABASE_URL
    assert url is not None
    async with (
        open_store(tmp_path, shards=1, clock=clock) as host_a,
        open_store(tmp_path, shards=1, clock=clock) as host_b,
    ):
        await host_a.run(ACTOR, lambda tx: None)  # the actor exists, nothing is due

        # Host B records two due intents and keeps its transaction (and the lock) open.
        holding, gate = anyio.Event(), anyio.Event()

        def hold(tx: LedgerTx) -> None:
            enqueue(1)(tx)
            enqueue(2)(tx)
            holding.set()
            wait_for(gate.wait())  # the batch stays open, the actor's row stays locked

        b_op = Pending(host_b, hold)
        with anyio.fail_after(10):
            await holding.wait()

        # Host A's claim (batch of one) locks the actor: it waits for B.
        a_op = Pending(host_a, claim(1))
        await wait_for_lock_waiter(url)
        gate.set()
        with anyio.fail_after(10):
            await b_op.done.wait()
            await a_op.done.wait()
        b_result, a_result = b_op.value, a_op.value
        assert b_result is None, b_result
        assert isinstance(a_result, ClaimResult), a_result
        # The claim saw B's intents (its claim read is a later statement) and took one ...
        assert len(a_result.claimed) == 1

        # ... and one due intent is left pending, as a fresh transaction confirms.
        def still_due(tx: LedgerTx) -> bool:
            return tx.has_due_pending(REGISTRY.kinds)

        assert await host_a.run(ACTOR, still_due)
        # A full batch with due work left must say so, though the lock's snapshot predates
        # B's commit (else the scheduler would rely on B's wake-up or the next poll).
        assert a_result.more, "claim_op reported more=False while a due intent was pending"


async def test_rolled_back_operations_leave_no_stale_knowledge(tmp_path: Path) -> None:
    """An eager enqueue rolled back after its claim, and a nested savepoint that appended and
    rolled back, leave what the batch knows to be due right."""

    def eager_then_fail(tx: LedgerTx) -> None:
        enqueue(10, eager=True)(tx)
        raise RuntimeError("rolled back")

    async with open_store(tmp_path, clock=clock) as store:
        await store.run(ACTOR, lambda tx: None)
        # Queued with no await in between: one batch, one lock, one flag.
        ops = [
            Pending(store, eager_then_fail),
            Pending(store, nested_enqueue(11)),
            Pending(store, enqueue(12)),  # due, left pending
            Pending(store, enqueue(13, eager=True)),  # must not overtake 12
            Pending(store, claim(1)),
        ]
        with anyio.fail_after(10):
            for op in ops:
                await op.done.wait()
        assert isinstance(ops[0].value, RuntimeError)
        assert ops[3].value.claimed is None
        result = ops[4].value
        assert len(result.claimed) == 1
        assert result.more  # 13 is still due


async def test_a_rolled_back_savepoint_leaves_eager_claims_going(tmp_path: Path) -> None:
    """A nested savepoint that made an intent due and rolled back leaves nothing due: the
    eager claim after it in the same batch goes ahead (on PostgreSQL the batch puts back
    what it knew before the savepoint; SQLite reads)."""
    async with open_store(tmp_path, clock=clock) as store:
        await store.run(ACTOR, lambda tx: None)
        ops = [Pending(store, nested_enqueue(21)), Pending(store, enqueue(22, eager=True))]
        with anyio.fail_after(10):
            for op in ops:
                await op.done.wait()
        assert ops[0].value is None
        assert claimed(ops[1].value)


async def test_an_eagerly_claimed_intent_is_written_as_the_claim_reports_it(
    tmp_path: Path,
) -> None:
    """The row an eager claim reports (built without a read) is the row in the ledger, and
    it is the row a claim of a pending intent leaves, but for the token."""
    async with open_store(tmp_path, clock=clock) as store:
        [eager] = await one_batch(store, [enqueue(1, eager=True)])
        [later] = await one_batch(store, [enqueue(2)])
        [scheduled] = await one_batch(store, [claim(1)])
        eager_row = eager.claimed.row
        assert await store.run(ACTOR, lambda tx: tx.intent_row(eager_row.id)) == eager_row
        [claimed_later] = scheduled.claimed
        later_row = await store.run(ACTOR, lambda tx: tx.intent_row(later.event.id))
        assert later_row == claimed_later.row
        assert later_row is not None
        assert later_row.status == "running"
        assert replace(later_row, id=eager_row.id, claim_token=eager_row.claim_token) == eager_row


async def test_due_work_of_kinds_the_host_does_not_run_leaves_eager_claims_going(
    backend: str,
) -> None:
    """The lock looks for due work of the host's kinds only: a due intent of a kind run
    elsewhere does not send this host's new intents to the scheduler."""
    if backend != "postgres":
        pytest.skip("the lock's knowledge of what is due exists on PostgreSQL only")
    from ledger.postgres import PostgresStore

    other = TriggerRegistry([make_trigger("test.elsewhere")]).get("test.elsewhere")
    payload = {"n": 40}
    elsewhere = enqueue_op(other, payload, dump_json(payload), None, None, 0, None)
    url = helpers.DATABASE_URL
    assert url is not None
    for due_kinds, claims in ((REGISTRY.kinds, True), (None, False)):
        async with PostgresStore(url, shards=1, clock=clock, due_kinds=due_kinds) as store:
            actor = f"kinds-{claims}"
            await store.run(actor, elsewhere)
            result = await store.run(actor, enqueue(41, eager=True))
            assert claimed(result) is claims, due_kinds
