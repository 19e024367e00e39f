"""The ledger's value types, as the ledger builds them."""

from __future__ import annotations

import copy
import pickle

import pytest
from pydantic import ValidationError

from ledger import Event
from ledger._models import make_event


@pytest.mark.parametrize("intent_event_id", [None, 7])
def test_make_event_builds_what_model_construct_builds(intent_event_id: int | None) -> None:
    """The ledger's direct constructor gives the same object as pydantic's, in every way a
    user can look at it."""
    payload = {"a": [1, 2.5, None, "x"], "b": {"c": True}}
    fast = make_event(3, 1_700_000_000_000, "k.done", payload, intent_event_id)
    slow = Event.model_construct(
        id=3, ts=1_700_000_000_000, kind="k.done", payload=payload, intent_event_id=intent_event_id
    )
    assert fast == slow
    assert repr(fast) == repr(slow)
    assert fast.model_dump() == slow.model_dump()
    assert fast.model_dump_json() == slow.model_dump_json()
    assert fast.model_fields_set == slow.model_fields_set
    scalar = make_event(3, 4, "k", "text", intent_event_id)
    assert hash(scalar) == hash(
        Event.model_construct(id=3, ts=4, kind="k", payload="text", intent_event_id=intent_event_id)
    )
    assert pickle.loads(pickle.dumps(fast)) == slow
    assert copy.deepcopy(fast) == slow
    assert fast.model_copy(update={"kind": "k.other"}).kind == "k.other"
    assert Event.model_validate(fast.model_dump()) == fast


def test_an_event_from_make_event_is_frozen() -> None:
    event = make_event(1, 2, "k", None, None)
    with pytest.raises(ValidationError):
        event.kind = "other"  # type: ignore[misc]
