"""Bad input through the public API, fuzzed with hypothesis, on both backends: each gets a
clear error and changes nothing. And injection strings, stored verbatim.

One host per test; the examples run through a blocking portal into its event loop, so
hypothesis drives plain functions.
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

import anyio
import anyio.from_thread
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger import IntentNotFoundError, LedgerError, PayloadError
from tests.helpers import DONE, make_trigger, open_host
from triggers import CancelStatus, UnknownTriggerError

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from actors import ActorHost

pytestmark = [pytest.mark.contract, pytest.mark.reliability]

KIND = "test.work"
LATER = datetime(2100, 1, 1).astimezone()
FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@contextmanager
def running_host(tmp_path: Path) -> Iterator[tuple[anyio.from_thread.BlockingPortal, ActorHost]]:
    """A host (no scheduler: nothing runs, so the ledgers only change by the calls) in a
    portal's event loop."""
    with anyio.from_thread.start_blocking_portal() as portal:
        manager = open_host(tmp_path, make_trigger(KIND), run_scheduler=False)
        with portal.wrap_async_context_manager(manager) as host:
            yield portal, host


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


BAD_PAYLOADS = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, [1.0, math.nan], {"x": math.inf}]),
    st.integers(min_value=(1 << 20) + 1, max_value=(1 << 20) + 4096).map(lambda n: "x" * n),
    st.integers(min_value=2_000, max_value=5_000).map(lambda depth: ("nested", depth)),
    st.sampled_from([object(), b"bytes", {1, 2}, 1j, datetime(2020, 1, 1), {"k": object()}]),
    st.sampled_from([{1: "int key"}, {(1, 2): "tuple key"}]),
)


def test_unstorable_payloads_are_refused_and_write_nothing(tmp_path: Path) -> None:
    """NaN, infinities, more than 1 MiB of JSON, nesting thousands deep and values JSON
    cannot hold: ``PayloadError`` (a ``ValueError``) or ``TypeError``, and no ledger is
    created, nor anything added to an existing one."""
    with running_host(tmp_path) as (portal, host):
        existing = host.get("existing")
        portal.call(lambda: existing.enqueue_trigger(trigger_kind=KIND, payload=1, at=LATER))
        before = portal.call(existing.events)

        @FUZZ
        @given(payload=BAD_PAYLOADS, fresh=st.booleans())
        def check(payload: Any, fresh: bool) -> None:
            if isinstance(payload, tuple) and payload[:1] == ("nested",):
                payload = nested(payload[1])  # built here: hypothesis cannot print it
            agent = host.get("fresh" if fresh else "existing")
            with pytest.raises((PayloadError, TypeError, ValueError)) as caught:
                portal.call(
                    lambda: agent.enqueue_trigger(trigger_kind=KIND, payload=payload, at=LATER)
                )
            assert str(caught.value)
            assert portal.call(host.actors) == ["existing"]
            assert portal.call(existing.events) == before

        check()


NAMES = st.one_of(
    st.sampled_from(["../../etc/passwd", "a/../../b", "/abs/path", "..", ".", "a\\b", "~root"]),
    st.text(min_size=1, max_size=40).filter(lambda s: "\x00" not in s),
    st.integers(min_value=9_000, max_value=10_240).map(lambda n: "é" * n),
)


def test_any_actor_name_works_and_stays_its_own(tmp_path: Path) -> None:
    """Names with path separators, ``..``, unicode or 10 KB length are ordinary actors: the
    work is recorded under exactly that name (on SQLite, in a file inside the data
    directory); a name with NUL is a ValueError that creates nothing."""
    with running_host(tmp_path) as (portal, host):

        @FUZZ
        @given(name=NAMES)
        def check(name: str) -> None:
            agent = host.get(name)
            event = portal.call(
                lambda: agent.enqueue_trigger(trigger_kind=KIND, payload=name[:50], at=LATER)
            )
            (state,) = [s for s in portal.call(agent.intents) if s.intent_event_id == event.id]
            assert state.status == "pending"
            assert name in portal.call(lambda: host.actors(limit=1_000_000))

        check()
        for bad in ("with\x00nul", ""):
            with pytest.raises(ValueError, match="actor"):
                host.get(bad)
        files = [p for p in tmp_path.rglob("*") if p.is_file()]
        assert all(p.resolve().is_relative_to(tmp_path.resolve()) for p in files)


def test_unknown_kinds_and_wrong_ids_change_nothing(tmp_path: Path) -> None:
    """A trigger kind that does not exist is ``UnknownTriggerError``; an id of the wrong type
    is ``TypeError``; an int no event can have (negative, beyond 64 bits) is "not found".
    None of them writes anything."""
    with running_host(tmp_path) as (portal, host):
        agent = host.get("a")
        portal.call(lambda: agent.enqueue_trigger(trigger_kind=KIND, payload=1, at=LATER))
        before = portal.call(agent.events)

        @FUZZ
        @given(
            kind=st.text(max_size=30).filter(lambda k: k != KIND),
            wrong=st.one_of(
                st.text(max_size=5), st.floats(), st.none(), st.booleans(), st.just([1])
            ),
            far=st.one_of(st.integers(max_value=-1), st.integers(min_value=1 << 63)),
        )
        def check(kind: str, wrong: Any, far: int) -> None:
            with pytest.raises(UnknownTriggerError):
                portal.call(lambda: agent.enqueue_trigger(trigger_kind=kind, payload=1))
            with pytest.raises(UnknownTriggerError):
                portal.call(lambda: agent.cancel_trigger(trigger_kind=kind, intent_event_id=1))
            with pytest.raises(TypeError):
                portal.call(lambda: agent.cancel_trigger(trigger_kind=KIND, intent_event_id=wrong))
            with pytest.raises(TypeError):
                portal.call(agent.intent, wrong)
            result = portal.call(
                lambda: agent.cancel_trigger(trigger_kind=KIND, intent_event_id=far)
            )
            assert result.status is CancelStatus.NOT_FOUND
            with pytest.raises(IntentNotFoundError):
                portal.call(agent.intent, far)
            assert portal.call(lambda: agent.events(intent_event_id=far)) == []
            with pytest.raises((TypeError, ValueError)):
                portal.call(lambda: agent.events(after=far))
            assert portal.call(agent.events) == before

        check()


def test_nul_in_keys_and_reasons_is_refused_alike_on_every_backend(tmp_path: Path) -> None:
    """Text a PostgreSQL column cannot hold (NUL) is refused the same way on SQLite, before
    anything is written: ``PayloadError``."""
    with running_host(tmp_path) as (portal, host):
        agent = host.get("a")
        intent = portal.call(lambda: agent.enqueue_trigger(trigger_kind=KIND, at=LATER))
        before = portal.call(agent.events)
        with pytest.raises(PayloadError, match="idempotency_key"):
            portal.call(
                lambda: agent.enqueue_trigger(trigger_kind=KIND, idempotency_key="k\x00", at=LATER)
            )
        with pytest.raises(PayloadError, match="reason"):
            portal.call(
                lambda: agent.cancel_trigger(
                    trigger_kind=KIND, intent_event_id=intent.id, reason="r\x00"
                )
            )
        assert portal.call(agent.events) == before
        assert portal.call(agent.intent, intent.id).status == "pending"


SURROGATE = "\udc80"
"""A lone surrogate: what ``os.fsdecode`` makes of an undecodable byte in a file name. No
backend can store it."""


def test_lone_surrogates_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    """Text that is not valid Unicode (a lone surrogate) in a payload (a value or a key), an
    idempotency key, a cancel reason or a kind to read is refused alike on every backend:
    ``PayloadError``, nothing written, no ledger created. (SQLite raised a bare
    ``UnicodeEncodeError`` after creating the actor's ledger; PostgreSQL a
    ``LedgerWriteError``.)"""
    with running_host(tmp_path) as (portal, host):
        fresh = host.get("fresh")
        for payload in ({"text": SURROGATE}, {SURROGATE: 1}, [f"a{SURROGATE}b"]):
            with pytest.raises(PayloadError, match="lone surrogate"):
                portal.call(
                    functools.partial(fresh.enqueue_trigger, trigger_kind=KIND, payload=payload)
                )
        assert portal.call(host.actors) == []

        agent = host.get("a")
        intent = portal.call(lambda: agent.enqueue_trigger(trigger_kind=KIND, at=LATER))
        before = portal.call(agent.events)
        with pytest.raises(PayloadError, match="idempotency_key must be valid Unicode"):
            portal.call(lambda: agent.enqueue_trigger(trigger_kind=KIND, idempotency_key=SURROGATE))
        with pytest.raises(PayloadError, match="cancel reason must be valid Unicode"):
            portal.call(
                lambda: agent.cancel_trigger(
                    trigger_kind=KIND, intent_event_id=intent.id, reason=SURROGATE
                )
            )
        with pytest.raises(PayloadError, match="lone surrogate"):
            portal.call(lambda: agent.events(kinds=[SURROGATE]))
        assert portal.call(agent.events) == before
        assert portal.call(agent.intent, intent.id).status == "pending"


INJECTIONS = [
    "'; DROP TABLE events; --",
    "a' OR '1'='1",
    '"); DELETE FROM intents; --',
    "x'); DROP TABLE all_events; SELECT ('",
    "$1; SELECT pg_sleep(10); --",
    "?); DROP TABLE projections; --",
    "\\'; TRUNCATE all_intents; --",
    "Robert'); DROP TABLE actor_ledgers;--",
]


@pytest.mark.anyio
@pytest.mark.parametrize("text", INJECTIONS)
async def test_injection_strings_are_stored_verbatim(tmp_path: Path, text: str) -> None:
    """An injection string as actor name, payload, idempotency key and cancel reason is data:
    stored and read back verbatim, and every table still answers afterwards."""
    async with open_host(tmp_path, make_trigger(KIND)) as host:
        agent = host.get(text)
        done = await agent.enqueue_trigger(trigger_kind=KIND, payload={text: text})
        with anyio.fail_after(20):
            assert (await agent.wait_for_intent(done.id)).status == "completed"
        later = await agent.enqueue_trigger(
            trigger_kind=KIND, payload=text, idempotency_key=text, at=LATER
        )
        again = await agent.enqueue_trigger(
            trigger_kind=KIND, payload="other", idempotency_key=text, at=LATER
        )
        assert again.id == later.id
        result = await agent.cancel_trigger(
            trigger_kind=KIND, intent_event_id=later.id, reason=text, requested_by=text
        )
        assert result.status is CancelStatus.CANCELLED
        state = await agent.intent(later.id)
        assert (state.cancel_reason, state.cancel_requested_by) == (text, text)
        assert state.idempotency_key == text
        events = await agent.events()
        assert events[0].payload == {text: text}
        assert [e.kind for e in events if e.kind == DONE] == [DONE]
        assert await host.actors() == [text]
        other = host.get("bystander")
        await other.enqueue_trigger(trigger_kind=KIND, payload=1, at=LATER)
        assert len(await other.events()) == 1


def test_storage_errors_are_ledger_errors(tmp_path: Path) -> None:
    """Sanity: the errors above are the documented ones (PayloadError is a LedgerError and a
    ValueError), so callers can catch either."""
    assert issubclass(PayloadError, LedgerError)
    assert issubclass(PayloadError, ValueError)
