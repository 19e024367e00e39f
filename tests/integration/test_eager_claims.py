"""An enqueue that claims its own due intent at once (an eager claim) lets older due work
go first, also when earlier operations of the same batch changed what is due."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import pytest

from ledger import dump_json
from tests.helpers import make_trigger, open_store
from triggers._engine import EagerClaim, Enqueued, enqueue_op
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


def enqueue(n: int, *, eager: bool, due_at: int | None = None) -> Callable[[LedgerTx], Enqueued]:
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
    results: list[Any] = [None] * len(ops)
    done = anyio.Event()
    left = len(ops)

    def after(i: int) -> Callable[[Any, BaseException | None], None]:
        def record(result: Any, error: BaseException | None) -> None:
            nonlocal left
            results[i] = error if error is not None else result
            left -= 1
            if not left:
                done.set()

        return record

    for i, op in enumerate(ops):
        store.submit(ACTOR, op, after(i))
    with anyio.fail_after(10):
        await done.wait()
    return results


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
