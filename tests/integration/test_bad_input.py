"""Bad input and misuse get clear errors, raised before anything is written: wrong types for
times, kinds and names, a host used outside ``async with``, settings of the wrong type, an
``acquire`` that is not async."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from actors import ActorHost, HostClosedError, define_agent_do
from ledger import JSON, IntentState, LedgerClosedError, PayloadError, Projection
from tests.helpers import DONE, FAILED, fast_config, make_trigger, open_host
from triggers import (
    AbortError,
    DistributedAbortController,
    RetryPolicy,
    SchedulerConfig,
    TriggerContext,
    Tx,
)

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.anyio

KIND = "test.work"
LATER = datetime(2100, 1, 1, tzinfo=UTC)


# -- times, kinds, names ------------------------------------------------------------------


@pytest.mark.parametrize(
    "at", ["2026-01-01T00:00Z", 5, 1.5, timedelta(minutes=5), date(2100, 1, 1)]
)
async def test_an_at_that_is_not_a_datetime_is_refused(tmp_path: Path, at: object) -> None:
    """``at`` must be an aware datetime: anything else is a TypeError naming ``at``, and no
    actor or intent is created."""
    async with open_host(tmp_path, make_trigger()) as host:
        agent = host.get("a")
        with pytest.raises(TypeError, match="at must be a timezone-aware datetime"):
            await agent.enqueue_trigger(trigger_kind=KIND, at=at)  # type: ignore[arg-type]
        assert await host.actors() == []


async def test_a_naive_at_is_still_a_value_error(tmp_path: Path) -> None:
    async with open_host(tmp_path, make_trigger()) as host:
        with pytest.raises(ValueError, match="at must be timezone-aware"):
            await host.get("a").enqueue_trigger(trigger_kind=KIND, at=datetime(2100, 1, 1))


async def test_tx_enqueue_and_reschedule_refuse_a_bad_at(tmp_path: Path) -> None:
    """Inside a commit, a bad ``at`` fails that commit (its facts roll back) with the same
    TypeError: the intent ends failed with the error recorded, and no follow-up exists."""
    seen: list[str] = []

    def commit(outcome: JSON, tx: Tx) -> None:
        tx.insert_event(kind="test.fact", payload=None)
        try:
            tx.reschedule("tomorrow")  # type: ignore[arg-type]
        except TypeError as exc:
            seen.append(str(exc))
        tx.enqueue(trigger_kind=KIND, payload={"next": True}, at=5)  # type: ignore[arg-type]

    async with open_host(tmp_path, make_trigger(KIND, commit=commit)) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND, payload={"next": False})
        state = await agent.wait_for_intent(intent.id)
        assert state.status == "failed"
        assert seen == ["at must be a timezone-aware datetime (for example datetime.now(UTC) +"
                        " timedelta(minutes=5)), not str"]  # fmt: skip
        assert len(await agent.intents()) == 1, "the follow-up was not enqueued"
        assert await agent.events(kinds=["test.fact"]) == []
        failure = (await agent.events(kinds=[FAILED]))[0].payload
        assert failure["error_type"] == "TypeError"
        assert "at must be a timezone-aware datetime" in failure["message"]


@pytest.mark.parametrize(
    ("kinds", "match"),
    [("test.fact", r"not a single str: kinds=\['test.fact'\]"), (b"test.fact", "not bytes")],
)
async def test_a_single_kind_string_is_refused(tmp_path: Path, kinds: Any, match: str) -> None:
    """``kinds="x"`` would read as the one-letter kinds x: it is refused with a hint, where a
    list of one kind finds the events."""
    async with open_host(tmp_path, make_trigger()) as host:
        agent = host.get("a")
        await agent.enqueue_trigger(trigger_kind=KIND, at=LATER)
        with pytest.raises(TypeError, match=match):
            await agent.events(kinds=kinds)
        found = await agent.events(kinds=["test.work.requested"])
        assert [event.kind for event in found] == ["test.work.requested"]


async def test_a_single_kind_string_is_refused_to_an_attempt_too(tmp_path: Path) -> None:
    """``ctx.events(kinds="x")`` inside ``acquire`` is refused the same way."""
    errors: list[str] = []

    async def acquire(intent: JSON, ctx: TriggerContext) -> JSON:
        try:
            await ctx.events(kinds="test.work.requested")
        except TypeError as exc:
            errors.append(str(exc))
        return [event.kind for event in await ctx.events(kinds=["test.work.requested"])]

    async with open_host(tmp_path, make_trigger(KIND, acquire)) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND)
        assert (await agent.wait_for_intent(intent.id)).status == "completed"
    assert len(errors) == 1
    assert "not a single str" in errors[0]


async def test_an_attempts_read_arguments_are_checked(tmp_path: Path) -> None:
    """``ctx.events`` checks ``after``, ``limit`` and ``intent_event_id`` as
    ``agent.events`` does; an id no event can have finds nothing."""
    answers: list[str] = []
    bad: list[dict[str, Any]] = [
        {"after": "1"},
        {"after": -1},
        {"after": True},
        {"limit": 2.5},
        {"limit": 1 << 63},
        {"intent_event_id": "1"},
    ]

    async def acquire(intent: JSON, ctx: TriggerContext) -> JSON:
        for arguments in bad:
            try:
                await ctx.events(**arguments)
            except (TypeError, ValueError) as exc:
                answers.append(f"{type(exc).__name__}: {exc}")
        return len(await ctx.events(intent_event_id=1 << 64))

    async with open_host(tmp_path, make_trigger(KIND, acquire)) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND)
        assert (await agent.wait_for_intent(intent.id)).status == "completed"
        assert [e.payload for e in await agent.events(kinds=[DONE])] == [0]
    assert answers == [
        "TypeError: after must be an int, not str",
        "ValueError: after must be between 0 and 2**63 - 1, not -1",
        "TypeError: after must be an int, not bool",
        "TypeError: limit must be an int, not float",
        f"ValueError: limit must be between 0 and 2**63 - 1, not {1 << 63}",
        "TypeError: intent_event_id must be an int, not str",
    ]


@pytest.mark.parametrize("requested_by", [5, b"me", ["me"]])
async def test_a_requested_by_that_is_not_a_str_is_refused(
    tmp_path: Path, requested_by: object
) -> None:
    async with open_host(tmp_path, make_trigger()) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND, at=LATER)
        with pytest.raises(TypeError, match="requested_by must be a str or None"):
            await agent.cancel_trigger(
                trigger_kind=KIND,
                intent_event_id=intent.id,
                requested_by=requested_by,  # type: ignore[arg-type]
            )
        assert (await agent.intent(intent.id)).status == "pending"


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"after": 5}, TypeError),
        ({"limit": "10"}, TypeError),
        ({"limit": True}, TypeError),
        ({"limit": -1}, ValueError),
    ],
)
async def test_actors_paging_arguments_are_checked(
    tmp_path: Path, options: dict[str, Any], error: type[Exception]
) -> None:
    async with open_host(tmp_path, make_trigger()) as host:
        await host.get("a").enqueue_trigger(trigger_kind=KIND, at=LATER)
        with pytest.raises(error, match=r"after|limit"):
            await host.actors(**options)
        assert await host.actors(limit=0) == []
        assert await host.actors(after="a") == []
        assert await host.actors() == ["a"]


# -- a host used outside ``async with`` ---------------------------------------------------


async def _assert_every_call_says_not_running(host: ActorHost) -> None:
    """Each public call of an agent and of the host raises ``HostClosedError`` (which is
    also the store's ``LedgerClosedError``)."""
    agent = host.get("a")
    calls: dict[str, Any] = {
        "enqueue_trigger": lambda: agent.enqueue_trigger(trigger_kind=KIND),
        "cancel_trigger": lambda: agent.cancel_trigger(trigger_kind=KIND, intent_event_id=1),
        "events": lambda: agent.events(),
        "intent": lambda: agent.intent(1),
        "intents": lambda: agent.intents(),
        "wait_for_intent": lambda: agent.wait_for_intent(1),
        "projection": lambda: agent.projection("count"),
        "rebuild_projection": lambda: agent.rebuild_projection("count"),
        "actors": lambda: host.actors(),
    }
    for name, call in calls.items():
        with pytest.raises(HostClosedError, match="not running") as caught:
            await call()
        assert isinstance(caught.value, LedgerClosedError), name


COUNT = Projection("count", 0, lambda state, event: state + 1)


async def test_calls_on_a_host_not_entered_say_so(tmp_path: Path) -> None:
    host = ActorHost(
        define_agent_do(triggers=[make_trigger()], projections=[COUNT]), data_dir=tmp_path
    )
    await _assert_every_call_says_not_running(host)
    with pytest.raises(HostClosedError):
        host.process_id  # noqa: B018
    assert not (tmp_path / "index.db").exists(), "nothing was created"


async def test_calls_on_a_stopped_host_say_so_and_it_cannot_be_entered_again(
    tmp_path: Path,
) -> None:
    spec = define_agent_do(triggers=[make_trigger()], projections=[COUNT])
    host = ActorHost(spec, data_dir=tmp_path, config=fast_config())
    async with host:
        process_id = host.process_id
    await _assert_every_call_says_not_running(host)
    assert host.process_id == process_id, "the id of the run it had"
    with pytest.raises(RuntimeError, match="entered only once"):
        async with host:
            pass
    async with ActorHost(spec, data_dir=tmp_path) as fresh:
        assert await fresh.actors() == []


# -- settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"max_open_ledgers": 0}, ValueError, "max_open_ledgers must be at least 1"),
        ({"max_open_ledgers": 1.5}, TypeError, "max_open_ledgers must be an int"),
        ({"shards": 0}, ValueError, "shards must be at least 1"),
        ({"shards": "2"}, TypeError, "shards must be an int"),
        ({"lock_timeout": -1}, ValueError, "lock_timeout"),
        ({"lock_timeout": "10"}, TypeError, "lock_timeout"),
        ({"idempotency_retention": "1d"}, TypeError, "idempotency_retention"),
        ({"idempotency_retention": -5}, ValueError, "idempotency_retention"),
        ({"idempotency_retention": timedelta(seconds=-1)}, ValueError, "idempotency_retention"),
        ({"idempotency_retention": float("nan")}, ValueError, "idempotency_retention"),
        ({"idempotency_retention": 1e12}, ValueError, "at most a century"),
        ({"config": {"max_concurrency": 4}}, TypeError, "config must be a SchedulerConfig"),
    ],
)
def test_bad_host_settings_are_refused(
    tmp_path: Path, options: dict[str, Any], error: type[Exception], match: str
) -> None:
    spec = define_agent_do(triggers=[make_trigger()])
    with pytest.raises(error, match=match):
        ActorHost(spec, data_dir=tmp_path / "data", **options)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("retention", [3600, 3600.0, timedelta(hours=1)])
def test_idempotency_retention_takes_seconds_or_a_timedelta(tmp_path: Path, retention: Any) -> None:
    spec = define_agent_do(triggers=[make_trigger()])
    host = ActorHost(spec, data_dir=tmp_path, idempotency_retention=retention)
    assert host.key_retention_ms == 3_600_000


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"max_concurrency": "5"}, TypeError),
        ({"max_concurrency": 2.5}, TypeError),
        ({"max_concurrency": 0}, ValueError),
        ({"claim_batch": None}, TypeError),
        ({"max_redrives": -1}, ValueError),
        ({"lease": "30"}, TypeError),
        ({"poll_interval": 0}, ValueError),
        ({"shutdown_grace": float("inf")}, ValueError),
    ],
)
def test_bad_scheduler_settings_are_refused(options: dict[str, Any], error: type) -> None:
    name = next(iter(options))
    with pytest.raises(error, match=f"SchedulerConfig.{name}"):
        SchedulerConfig(**options)


# -- definitions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("", 0, lambda s, e: s), TypeError),
        ((5, 0, lambda s, e: s), TypeError),
        (("p", 0, None), TypeError),
        (("p", {1, 2}, lambda s, e: s), PayloadError),
        (("p", float("nan"), lambda s, e: s), PayloadError),
    ],
)
def test_bad_projections_are_refused_when_defined(args: tuple[Any, ...], error: type) -> None:
    with pytest.raises(error, match="Projection"):
        Projection(*args)


def test_projections_may_be_any_iterable_but_not_one_projection() -> None:
    spec = define_agent_do(triggers=[make_trigger()], projections=(p for p in [COUNT]))
    assert spec.projections == (COUNT,)
    with pytest.raises(TypeError, match=r"projections=\[...\]"):
        define_agent_do(triggers=[make_trigger()], projections=COUNT)  # type: ignore[arg-type]


async def test_an_acquire_that_is_not_async_fails_at_once(tmp_path: Path) -> None:
    """A plain ``def acquire`` returning a value (not an awaitable) fails the intent on its
    first attempt, without retries, saying what to change."""
    calls: list[int] = []

    def acquire(intent: JSON, ctx: TriggerContext) -> JSON:
        calls.append(1)
        return {"done": True}

    state, failure = await _run_to_its_end(tmp_path, make_trigger(KIND, acquire))
    assert state.status == "failed"
    assert state.attempts == 1
    assert calls == [1]
    assert failure["error_type"] == "FatalError"
    assert "returned dict, not an awaitable: define it with async def" in failure["message"]


async def test_an_unknown_status_names_the_valid_ones(tmp_path: Path) -> None:
    async with open_host(tmp_path, make_trigger()) as host:
        agent = host.get("a")
        await agent.enqueue_trigger(trigger_kind=KIND, at=LATER)
        with pytest.raises(ValueError, match="status must be one of 'pending', 'running',"):
            await agent.intents(status="done")
        assert len(await agent.intents(status="pending")) == 1


# -- idempotency keys ---------------------------------------------------------------------


async def test_the_frameworks_idempotency_keys_are_reserved(tmp_path: Path) -> None:
    """A user key starting with ``trigger.`` is refused (it could take the place of the
    actor's abort controller, whose abort would then write nothing); the controller made
    afterwards works."""
    async with open_host(tmp_path, make_trigger()) as host:
        agent = host.get("a")
        for key in ("trigger.abort_controller", "trigger.anything"):
            with pytest.raises(ValueError, match="reserved"):
                await agent.enqueue_trigger(trigger_kind=KIND, at=LATER, idempotency_key=key)
            with pytest.raises(ValueError, match="reserved"):
                agent.call(trigger_kind=KIND, at=LATER, idempotency_key=key)
        assert await host.actors() == []
        controller = await DistributedAbortController.create("a", host=host)
        await controller.abort("stop")
        assert controller.signal.aborted
        [state] = await agent.intents()
        assert (state.trigger_kind, state.status) == ("trigger.abort_controller", "cancelled")


async def test_a_key_held_by_another_kind_is_an_error(tmp_path: Path) -> None:
    """Keys are per actor: enqueueing kind B with the key of a live intent of kind A raises
    (returning A's intent would pass it off as B's), and writes nothing."""
    first, second = make_trigger("test.a"), make_trigger("test.b")
    async with open_host(tmp_path, first, second) as host:
        agent = host.get("a")
        held = await agent.enqueue_trigger(trigger_kind="test.a", at=LATER, idempotency_key="k")
        with pytest.raises(ValueError, match=r"held by intent 1 of trigger 'test\.a'"):
            await agent.enqueue_trigger(trigger_kind="test.b", at=LATER, idempotency_key="k")
        again = await agent.enqueue_trigger(trigger_kind="test.a", at=LATER, idempotency_key="k")
        assert again.id == held.id
        assert [e.id for e in await agent.events()] == [held.id]


async def test_a_commit_cannot_use_a_reserved_key(tmp_path: Path) -> None:
    def commit(outcome: JSON, tx: Tx) -> None:
        tx.enqueue(trigger_kind=KIND, at=LATER, idempotency_key="trigger.abort_controller")

    async with open_host(tmp_path, make_trigger(KIND, commit=commit)) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind=KIND)
        assert (await agent.wait_for_intent(intent.id)).status == "failed"
        failure = (await agent.events(kinds=[FAILED]))[0].payload
        assert "reserved" in failure["message"]
        assert len(await agent.intents()) == 1


# -- failures that are awkward to record --------------------------------------------------


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text")


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (ValueError("bad \ud800 name"), "bad \\ud800 name"),
        (Unprintable(), "<Unprintable whose text could not be read>"),
    ],
)
async def test_a_failure_whose_text_cannot_be_stored_is_recorded_escaped(
    tmp_path: Path, error: Exception, message: str
) -> None:
    """An error whose message holds a lone surrogate (an undecodable file name, say) or
    whose ``__str__`` raises still fails the intent with its failure fact; the host neither
    loses the attempt nor hangs on its way out."""

    async def acquire(intent: JSON, ctx: TriggerContext) -> JSON:
        raise error

    trigger = make_trigger(KIND, acquire, retry=RetryPolicy(max_attempts=1))
    state, failure = await _run_to_its_end(tmp_path, trigger)
    assert state.status == "failed"
    assert failure["message"] == message


async def _run_to_its_end(tmp_path: Path, trigger: Any) -> tuple[IntentState, Any]:
    """Run one intent of ``trigger`` to its end (bounded, the host's exit included); its
    terminal state and the payload of its first failure fact."""
    with anyio.fail_after(30):
        async with open_host(tmp_path, trigger) as host:
            agent = host.get("a")
            intent = await agent.enqueue_trigger(trigger_kind=KIND)
            state = await agent.wait_for_intent(intent.id)
            failure = (await agent.events(kinds=[FAILED]))[0].payload
    return state, failure


async def test_a_self_cancel_whose_reason_cannot_be_stored_is_recorded_escaped(
    tmp_path: Path,
) -> None:
    async def acquire(intent: JSON, ctx: TriggerContext) -> JSON:
        raise AbortError("stop \udcff")

    with anyio.fail_after(30):
        async with open_host(tmp_path, make_trigger(KIND, acquire)) as host:
            agent = host.get("a")
            intent = await agent.enqueue_trigger(trigger_kind=KIND)
            state = await agent.wait_for_intent(intent.id)
    assert (state.status, state.cancel_reason) == ("cancelled", "stop \\udcff")


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"initial_backoff": 1e17}, ValueError),
        ({"max_backoff": 1e17}, ValueError),
        ({"jitter": "no"}, TypeError),
    ],
)
def test_retry_policies_out_of_bounds_are_refused(options: dict[str, Any], error: type) -> None:
    with pytest.raises(error, match="RetryPolicy"):
        RetryPolicy(**options)


async def test_an_idempotency_key_is_at_most_1024_bytes(tmp_path: Path) -> None:
    """A key of 1,024 bytes of UTF-8 is taken; one byte more is refused with PayloadError,
    at enqueue (nothing written) and in a commit (the intent fails), on both backends
    alike (PostgreSQL would refuse a long key only at COMMIT, failing its whole batch)."""
    longest, too_long = "é" * 512, "é" * 512 + "x"

    def commit(outcome: JSON, tx: Tx) -> None:
        tx.enqueue(trigger_kind=KIND, at=LATER, idempotency_key=too_long)

    async with open_host(
        tmp_path, make_trigger(KIND), make_trigger("test.b", commit=commit)
    ) as host:
        agent = host.get("a")
        with pytest.raises(PayloadError, match="longer than 1024 bytes"):
            await agent.enqueue_trigger(trigger_kind=KIND, at=LATER, idempotency_key=too_long)
        assert await host.actors() == []
        taken = await agent.enqueue_trigger(trigger_kind=KIND, at=LATER, idempotency_key=longest)
        again = await agent.enqueue_trigger(trigger_kind=KIND, at=LATER, idempotency_key=longest)
        assert again.id == taken.id
        intent = await agent.enqueue_trigger(trigger_kind="test.b")
        assert (await agent.wait_for_intent(intent.id)).status == "failed"
        failure = (await agent.events(kinds=[FAILED]))[0].payload
        assert "longer than 1024 bytes" in failure["message"]
        assert len(await agent.intents()) == 2
