"""``triggers.testing.TriggerEnvironment``: running a trigger's own functions without a host."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from ledger import PayloadError
from tests.helpers import CANCELLED, DONE, FAILED, ManualClock, make_trigger
from triggers import (
    AbortError,
    Failure,
    FatalError,
    IntentRejectedError,
    TriggerContext,
    TriggerDefinitionError,
    UnknownTriggerError,
)
from triggers.testing import TriggerEnvironment

if TYPE_CHECKING:
    from ledger import JSON
    from triggers import Tx

pytestmark = pytest.mark.anyio

KIND = "test.work"


async def summarize(intent: Any, ctx: TriggerContext) -> Any:
    """Streams one chunk per word, stopping when the signal aborts."""
    words = []
    for word in intent["text"].split():
        ctx.signal.throw_if_aborted()
        await ctx.stream.write(word.upper())
        words.append(word)
        await anyio.lowlevel.checkpoint()
    return {"summary": " ".join(words), "by": ctx.bindings["model"]}


async def test_acquire_then_commit() -> None:
    """``acquire`` runs with a context and returns the outcome; ``commit`` returns its facts,
    recorded with the intent's id after the intent event."""
    env = TriggerEnvironment(make_trigger(KIND, summarize), bindings={"model": "tiny"})
    outcome = await env.acquire({"text": "a b"})
    assert outcome == {"summary": "a b", "by": "tiny"}
    assert env.streamed == ["A", "B"]
    facts = env.commit(outcome)
    assert [(f.kind, f.payload, f.intent_event_id) for f in facts] == [
        (DONE, outcome, env.intent_event_id)
    ]
    assert [e.kind for e in env.events] == [f"{KIND}.requested", DONE]
    assert env.rescheduled_at is None


async def test_cancel_mid_attempt() -> None:
    """A test can wait for streamed progress, cancel, and see the attempt raise AbortError;
    then ``commit_cancelled`` records the reason."""
    env = TriggerEnvironment(make_trigger(KIND, summarize), bindings={"model": "tiny"})

    async def cancel_after_first_word() -> None:
        await env.wait_streamed(1)
        env.cancel("user")

    async with anyio.create_task_group() as tg:
        tg.start_soon(cancel_after_first_word)
        with pytest.raises(AbortError) as caught:
            await env.acquire({"text": "one two three four"})
    assert caught.value.reason == "user"
    assert env.streamed == ["ONE"]
    facts = env.commit_cancelled("user")
    assert [(f.kind, f.payload) for f in facts] == [(CANCELLED, {"reason": "user"})]


async def test_cancel_before_the_attempt_starts_it_aborted() -> None:
    """``cancel`` before ``acquire``: the attempt starts with its signal aborted, as a redrive
    after a cancel does; the next attempt after that gets a fresh signal."""
    env = TriggerEnvironment(make_trigger(KIND, summarize), bindings={"model": "m"}, redrive=True)
    env.cancel("while down")
    with pytest.raises(AbortError):
        await env.acquire({"text": "x"})
    assert env.context is not None
    assert env.context.redrive
    assert env.streamed == []
    assert await env.acquire({"text": "y"}) == {"summary": "y", "by": "m"}


async def test_context_reads_seeded_events_clock_and_attempt() -> None:
    """``ctx.events()`` reads what the test seeded, ``ctx.now()`` follows the given clock, and
    ``attempt`` is reported."""
    clock = ManualClock()
    seen: dict[str, Any] = {}

    async def acquire(intent: Any, ctx: TriggerContext) -> Any:
        seen["events"] = [(e.kind, e.payload) for e in await ctx.events(kinds=["note"])]
        seen["now"] = ctx.now()
        seen["attempt"] = ctx.attempt
        seen["actor"] = ctx.actor_id
        return None

    env = TriggerEnvironment(make_trigger(KIND, acquire), clock=clock, attempt=3, actor_id="c:1")
    env.record_event("note", {"n": 1})
    env.record_event("other", None)
    clock.advance(5_000)
    await env.acquire()
    assert seen["events"] == [("note", {"n": 1})]
    assert seen["now"].timestamp() * 1000 == clock.now
    assert (seen["attempt"], seen["actor"]) == (3, "c:1")


async def test_rejected_payload_records_nothing() -> None:
    """A payload ``parse_intent`` refuses raises IntentRejectedError and records nothing."""

    def positive(payload: JSON) -> JSON:
        if not (isinstance(payload, int) and payload > 0):
            raise ValueError("must be a positive int")
        return payload

    env = TriggerEnvironment(make_trigger(KIND, parse_intent=positive))
    with pytest.raises(IntentRejectedError, match="positive"):
        await env.acquire(-1)
    assert env.events == []
    assert env.intent_event_id is None


async def test_commit_that_raises_is_rolled_back() -> None:
    """A commit that raises propagates its error and leaves none of its writes."""

    def commit(outcome: JSON, tx: Tx) -> None:
        tx.insert_event(kind=DONE, payload=outcome)
        raise ValueError("bad outcome")

    env = TriggerEnvironment(make_trigger(KIND, commit=commit))
    await env.acquire("x")
    before = env.events
    with pytest.raises(ValueError, match="bad outcome"):
        env.commit("x")
    assert env.events == before


async def test_commit_before_acquire_is_refused() -> None:
    """The commit methods need an intent: before ``acquire`` they raise RuntimeError."""
    env = TriggerEnvironment(make_trigger(KIND))
    with pytest.raises(RuntimeError, match="acquire"):
        env.commit(None)
    with pytest.raises(RuntimeError, match="acquire"):
        env.commit_cancelled()
    with pytest.raises(RuntimeError, match="acquire"):
        env.commit_failed(RuntimeError("x"))


async def test_commit_failed_from_an_exception() -> None:
    """``commit_failed`` turns an exception into the Failure the host would pass; a trigger
    without ``commit_failed`` writes nothing of its own."""
    env = TriggerEnvironment(make_trigger(KIND), attempt=2)
    await env.acquire()
    facts = env.commit_failed(RuntimeError("provider down"))
    assert [(f.kind, f.payload) for f in facts] == [
        (FAILED, {"error_type": "RuntimeError", "message": "provider down", "attempts": 2})
    ]
    failure = Failure(error_type="X", message="y", attempts=1)
    assert [f.payload for f in env.commit_failed(failure)] == [failure.model_dump()]

    bare = make_trigger(KIND)
    del bare["commit_failed"]
    env = TriggerEnvironment(bare)
    await env.acquire()
    assert env.commit_failed(RuntimeError("x")) == []


async def test_commit_can_enqueue_registered_triggers_and_reschedule() -> None:
    """``tx.enqueue`` reaches the triggers given with ``triggers=`` (an unknown kind raises),
    and ``tx.reschedule`` is reported as ``rescheduled_at``."""
    clock = ManualClock()

    def commit(outcome: JSON, tx: Tx) -> None:
        tx.enqueue(trigger_kind="test.next", payload={"after": outcome})
        tx.reschedule(tx.now + timedelta(minutes=5))

    env = TriggerEnvironment(
        make_trigger(KIND, commit=commit), triggers=[make_trigger("test.next")], clock=clock
    )
    await env.acquire("first")
    facts = env.commit("first")
    assert [(f.kind, f.payload) for f in facts] == []
    assert [(e.kind, e.payload) for e in env.events][-1] == (
        "test.next.requested", {"after": "first"},
    )  # fmt: skip
    assert env.rescheduled_at is not None
    assert env.rescheduled_at.timestamp() * 1000 == clock.now + 300_000

    lonely = TriggerEnvironment(make_trigger(KIND, commit=commit))
    await lonely.acquire("x")
    with pytest.raises(UnknownTriggerError):
        lonely.commit("x")


async def test_commit_enqueue_honours_idempotency_keys() -> None:
    """``tx.enqueue(idempotency_key=)`` answers the intent already holding the key, as on a
    host: one intent for two enqueues with a key; the key held by another trigger's intent
    raises ValueError and the commit writes nothing; a rolled-back intent frees its key."""
    plan: list[tuple[str, str]] = []

    def commit(outcome: JSON, tx: Tx) -> None:
        for kind, key in plan:
            tx.enqueue(trigger_kind=kind, payload=outcome, idempotency_key=key)

    env = TriggerEnvironment(
        make_trigger(KIND, commit=commit),
        triggers=[make_trigger("test.next"), make_trigger("test.other")],
    )
    await env.acquire("a")
    plan[:] = [("test.next", "k"), ("test.next", "k")]
    env.commit("a")
    env.commit("b")
    requested = [e for e in env.events if e.kind == "test.next.requested"]
    assert [e.payload for e in requested] == ["a"]

    plan[:] = [("test.other", "fresh"), ("test.other", "k")]
    before = list(env.events)
    with pytest.raises(ValueError, match="held by intent"):
        env.commit("c")
    assert env.events == before
    plan[:] = [("test.next", "fresh")]
    env.commit("d")
    assert [e.payload for e in env.events if e.kind == "test.next.requested"] == ["a", "d"]


async def test_reserved_kinds_are_refused_in_commits() -> None:
    """A commit may not write ``trigger.`` facts, here as on a host."""

    def commit(outcome: JSON, tx: Tx) -> None:
        tx.insert_event(kind="trigger.fake", payload=None)

    env = TriggerEnvironment(make_trigger(KIND, commit=commit))
    await env.acquire()
    with pytest.raises(ValueError, match="reserved"):
        env.commit(None)


def test_bad_trigger_spec_is_refused() -> None:
    """The trigger is validated as a registration is: an async commit is refused."""

    async def commit(outcome: JSON, tx: Tx) -> None:
        return None

    with pytest.raises(TriggerDefinitionError, match="commit"):
        TriggerEnvironment(make_trigger(KIND, commit=commit))


async def test_cancel_between_attempts_reaches_the_next_one() -> None:
    """A cancel issued after an attempt ended applies to the next attempt (it starts aborted);
    the one after that gets a fresh signal again."""
    env = TriggerEnvironment(make_trigger(KIND, summarize), bindings={"model": "m"})
    assert await env.acquire({"text": "a"}) == {"summary": "a", "by": "m"}
    env.cancel("between")
    with pytest.raises(AbortError, match="between"):
        await env.acquire({"text": "b"})
    assert await env.acquire({"text": "c"}) == {"summary": "c", "by": "m"}


async def test_ignored_trigger_is_not_cancelled() -> None:
    """``cancel`` leaves a trigger with ``cancellation: "ignored"`` running, as a host does."""
    env = TriggerEnvironment(
        make_trigger(KIND, summarize, cancellation="ignored"), bindings={"model": "m"}
    )
    env.cancel("stop")
    assert not env.signal.aborted
    assert await env.acquire({"text": "x"}) == {"summary": "x", "by": "m"}


async def test_acquire_sees_the_stored_json_form() -> None:
    """``acquire`` gets the payload as a host gives it: parsed from its stored JSON."""
    seen: list[Any] = []

    async def acquire(intent: Any, ctx: TriggerContext) -> Any:
        seen.append(intent)

    env = TriggerEnvironment(make_trigger(KIND, acquire))
    await env.acquire({"1": (1, 2)})
    assert seen == [{"1": [1, 2]}]
    # Keys JSON would quietly turn into strings are refused, as a host refuses them.
    with pytest.raises(PayloadError, match="keys must be str"):
        await env.acquire({1: "x"})


async def test_an_acquire_that_is_not_async_raises_fatal_error_as_on_a_host() -> None:
    def acquire(intent: JSON, ctx: TriggerContext) -> JSON:
        return {"done": True}

    env = TriggerEnvironment(make_trigger(KIND, acquire))
    with pytest.raises(FatalError, match="not an awaitable: define it with async def"):
        await env.acquire({"n": 1})
