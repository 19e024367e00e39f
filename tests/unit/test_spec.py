"""Unit tests for triggers._spec: trigger validation (fails closed), pydantic intents, retries."""

from __future__ import annotations

import functools
import math
import random
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from pydantic import BaseModel

from actors import define_agent_do
from tests.helpers import make_trigger, open_host
from triggers import (
    IntentRejectedError,
    RetryPolicy,
    TriggerContext,
    TriggerDefinitionError,
    Tx,
)

if TYPE_CHECKING:
    from pathlib import Path

    from ledger import JSON

pytestmark = pytest.mark.anyio

REQUIRED = (
    "kind",
    "intent_event_kind",
    "cancellation",
    "parse_intent",
    "acquire",
    "commit",
    "commit_cancelled",
)


def spec(**changes: Any) -> dict[str, Any]:
    """A valid trigger dict of kind ``spec.t`` with ``changes`` applied."""
    result: dict[str, Any] = dict(make_trigger("spec.t"))
    result.update(changes)
    return result


def rejected(*triggers: object) -> TriggerDefinitionError:
    """The error ``define_agent_do`` raises for these triggers."""
    with pytest.raises(TriggerDefinitionError) as info:
        define_agent_do(triggers=list(triggers))
    return info.value


def assert_names(error: TriggerDefinitionError, trigger: str, key: str | None) -> None:
    """The error names the trigger and the key, as attributes and in its message."""
    assert error.trigger == trigger
    assert error.key == key
    assert repr(trigger) in str(error)
    if key is not None:
        assert repr(key) in str(error)


async def async_commit(outcome: JSON, tx: Tx) -> None:
    """An async commit: not allowed."""


async def async_commit_cancelled(intent: JSON, cancellation: object, tx: Tx) -> None:
    """An async commit_cancelled: not allowed."""


async def async_commit_failed(intent: JSON, failure: object, tx: Tx) -> None:
    """An async commit_failed: not allowed."""


class AsyncCallable:
    """A callable object whose ``__call__`` is a coroutine function."""

    async def __call__(self, outcome: JSON, tx: Tx) -> None:
        """Not allowed as a commit."""


# -- a valid spec --------------------------------------------------------------------------


def test_valid_spec_registers() -> None:
    """The baseline spec used below registers, with its optional keys applied."""
    agent_spec = define_agent_do(triggers=[spec(timeout=timedelta(seconds=2))])
    trigger = agent_spec.registry.get("spec.t")
    assert trigger.timeout == 2.0
    assert trigger.retry == RetryPolicy(max_attempts=3, initial_backoff=0, jitter=False)
    assert agent_spec.registry.kinds == ("spec.t", "trigger.abort_controller")


@pytest.mark.parametrize("key", ["kind", "intent_event_kind"])
def test_reserved_prefix_is_refused(key: str) -> None:
    """A user trigger may not take a ``trigger.`` kind or event kind (the framework's own)."""
    with pytest.raises(TriggerDefinitionError) as caught:
        define_agent_do(triggers=[spec(**{key: "trigger.mine"})])
    assert caught.value.key == key
    assert "reserved" in str(caught.value)


# -- missing and unknown keys --------------------------------------------------------------


@pytest.mark.parametrize("key", REQUIRED)
def test_missing_required_key_is_rejected(key: str) -> None:
    """Each required key, when missing, fails registration naming the trigger and the key."""
    broken = spec()
    del broken[key]
    error = rejected(broken)
    assert_names(error, "#0" if key == "kind" else "spec.t", key)
    assert "missing" in str(error)


def test_missing_key_names_position_when_kind_is_missing() -> None:
    """A trigger without a kind is named by its position in the list."""
    broken = spec(kind="other")
    del broken["kind"]
    error = rejected(spec(), broken)
    assert_names(error, "#1", "kind")


def test_unknown_key_is_rejected() -> None:
    """A misspelt key (commitCancelled) fails registration instead of being ignored."""
    error = rejected(spec(commitCancelled=lambda intent, cancellation, tx: None))
    assert_names(error, "spec.t", "commitCancelled")
    assert "unknown key" in str(error)


def test_duplicate_kinds_are_rejected() -> None:
    """Two triggers of one kind fail registration naming the kind."""
    error = rejected(spec(), spec(intent_event_kind="spec.t.other"))
    assert_names(error, "spec.t", "kind")
    assert "duplicate" in str(error)


def test_a_shared_intent_event_kind_is_rejected() -> None:
    """Two triggers whose intents would be recorded as events of one kind fail registration,
    naming the second trigger and both kinds (they were accepted: a reader of the ledger could
    not tell their intents apart)."""
    error = rejected(spec(), spec(kind="spec.u", intent_event_kind="spec.t.requested"))
    assert_names(error, "spec.u", "intent_event_kind")
    assert "'spec.t.requested' is already trigger 'spec.t''s" in str(error)


@pytest.mark.parametrize("value", ["cooperative", "ignored"])
def test_cancellation_modes_are_accepted(value: str) -> None:
    """Both cancellation modes register."""
    trigger = define_agent_do(triggers=[spec(cancellation=value)]).registry.get("spec.t")
    assert trigger.cancellation == value


@pytest.mark.parametrize("value", ["Cooperative", "none", "", None, True, 0])
def test_unknown_cancellation_mode_is_rejected(value: object) -> None:
    """A cancellation value other than cooperative/ignored fails registration."""
    error = rejected(spec(cancellation=value))
    assert_names(error, "spec.t", "cancellation")


def test_missing_cancellation_is_rejected() -> None:
    """cancellation has no default: leaving it out fails registration."""
    broken = spec()
    del broken["cancellation"]
    assert_names(rejected(broken), "spec.t", "cancellation")


# -- synchronous commit functions ----------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "fn"),
    [
        ("commit", async_commit),
        ("commit_cancelled", async_commit_cancelled),
        ("commit_failed", async_commit_failed),
    ],
)
def test_async_commit_functions_are_rejected(key: str, fn: object) -> None:
    """An ``async def`` commit, commit_cancelled or commit_failed fails registration."""
    error = rejected(spec(**{key: fn}))
    assert_names(error, "spec.t", key)
    assert "synchronous" in str(error)


def test_callable_object_with_async_call_is_rejected() -> None:
    """A callable object whose __call__ is ``async def`` is refused as a commit."""
    assert_names(rejected(spec(commit=AsyncCallable())), "spec.t", "commit")


@pytest.mark.parametrize("key", ["commit", "commit_cancelled", "commit_failed"])
def test_non_callable_commit_functions_are_rejected(key: str) -> None:
    """A commit function that is not callable fails registration."""
    assert_names(rejected(spec(**{key: "not a function"})), "spec.t", key)


@pytest.mark.parametrize("key", ["acquire", "parse_intent"])
@pytest.mark.parametrize("value", [None, 42, "module.function"])
def test_non_callable_acquire_and_parse_intent_are_rejected(key: str, value: object) -> None:
    """acquire and parse_intent must be callables (parse_intent may be a pydantic model)."""
    assert_names(rejected(spec(**{key: value})), "spec.t", key)


# -- optional keys -------------------------------------------------------------------------


@pytest.mark.parametrize("value", [3, {"max_attempts": 3}, None, "RetryPolicy()"])
def test_retry_must_be_a_retry_policy(value: object) -> None:
    """retry accepts only a RetryPolicy."""
    assert_names(rejected(spec(retry=value)), "spec.t", "retry")


@pytest.mark.parametrize(
    "value",
    [0, -1, 0.0, -0.5, math.nan, math.inf, timedelta(0), timedelta(seconds=-1), "5", [5]],
)
def test_bad_timeouts_are_rejected(value: object) -> None:
    """timeout must be a positive, finite number of seconds (or a positive timedelta)."""
    assert_names(rejected(spec(timeout=value)), "spec.t", "timeout")


def test_bool_timeout_is_rejected() -> None:
    """timeout=True is a wrong type, not a one-second deadline."""
    assert_names(rejected(spec(timeout=True)), "spec.t", "timeout")


@pytest.mark.parametrize("value", [0.05, 3, timedelta(milliseconds=250)])
def test_good_timeouts_are_seconds(value: object) -> None:
    """A positive number or timedelta becomes a float number of seconds."""
    trigger = define_agent_do(triggers=[spec(timeout=value)]).registry.get("spec.t")
    expected = value.total_seconds() if isinstance(value, timedelta) else value
    assert trigger.timeout == expected
    assert isinstance(trigger.timeout, float)


@pytest.mark.parametrize("value", ["trigger.requested", "trigger.", "trigger.x.y"])
def test_reserved_intent_event_kind_is_rejected(value: str) -> None:
    """intent_event_kind may not use the framework's reserved ``trigger.`` prefix."""
    error = rejected(spec(intent_event_kind=value))
    assert_names(error, "spec.t", "intent_event_kind")
    assert "reserved" in str(error)


@pytest.mark.parametrize("value", ["", None, 7, "spec.t\x00requested"])
def test_bad_intent_event_kind_is_rejected(value: object) -> None:
    """intent_event_kind must be a non-empty str."""
    assert_names(rejected(spec(intent_event_kind=value)), "spec.t", "intent_event_kind")


@pytest.mark.parametrize("value", ["", 7, "spec\x00t"])
def test_bad_kind_is_rejected(value: object) -> None:
    """kind must be a non-empty str without NUL (no ledger could store it)."""
    assert rejected(spec(kind=value)).key == "kind"


def _two(a: object, b: object) -> None: ...


def _one(a: object) -> None: ...


def _three(a: object, b: object, c: object) -> None: ...


async def _async_one(intent: object) -> None: ...


async def _async_three(intent: object, ctx: object, extra: object) -> None: ...


@pytest.mark.parametrize(
    ("key", "fn"),
    [
        ("parse_intent", _two),
        ("acquire", _async_one),
        ("acquire", _async_three),
        ("commit", _one),
        ("commit", _three),
        ("commit_cancelled", _two),
        ("commit_failed", _two),
    ],
)
def test_callables_that_cannot_take_their_arguments_are_rejected(key: str, fn: object) -> None:
    """Each callable must accept the positional arguments it is called with; the message
    shows how it is called and the signature it has."""
    error = rejected(spec(**{key: fn}))
    assert_names(error, "spec.t", key)
    assert "is called as" in str(error)
    assert "signature" in str(error)


def test_callables_with_defaults_or_varargs_are_accepted() -> None:
    """Extra parameters with defaults, ``*args`` and callables whose signature Python cannot
    tell (builtins such as ``dict``) are all accepted."""

    async def acquire(intent: object, ctx: object, retries: int = 3) -> None: ...

    def commit(*args: object) -> None: ...

    define_agent_do(triggers=[spec(acquire=acquire, commit=commit, parse_intent=dict)])


def test_a_decorated_callable_is_checked_by_the_wrappers_signature_too() -> None:
    """A ``functools.wraps`` decorator that supplies an argument itself reports the inner
    signature (three arguments) but is called with two: it is accepted."""

    def with_db(fn: Any) -> Any:
        @functools.wraps(fn)
        async def wrapper(intent: object, ctx: object) -> Any:
            return await fn(intent, ctx, "db")

        return wrapper

    @with_db
    async def acquire(intent: object, ctx: object, db: str) -> None: ...

    define_agent_do(triggers=[spec(acquire=acquire)])


@pytest.mark.parametrize("value", [spec(), "spec.t"])
def test_triggers_must_be_a_list_not_one_trigger(value: object) -> None:
    """One trigger dict (or a str) given as ``triggers`` is refused as such, not read key by
    key as a list of non-dicts."""
    error = rejected_as_is(value)
    assert error.key == "triggers"
    assert "triggers=[...]" in str(error)


def rejected_as_is(triggers: object) -> TriggerDefinitionError:
    with pytest.raises(TriggerDefinitionError) as info:
        define_agent_do(triggers=triggers)  # type: ignore[arg-type]
    return info.value


@pytest.mark.parametrize("value", [["kind", "x"], "spec.t", 42, None, ("a", "b")])
def test_non_dict_spec_is_rejected(value: object) -> None:
    """A trigger that is not a dict fails registration naming its position."""
    error = rejected(spec(), value)
    assert_names(error, "#1", None)
    assert "dict" in str(error)


def test_error_is_a_type_error() -> None:
    """TriggerDefinitionError is a TypeError, so generic handlers still see a bad spec."""
    assert isinstance(rejected(spec(retry=1)), TypeError)


# -- pydantic intents ----------------------------------------------------------------------


class Job(BaseModel):
    """A typed intent."""

    name: str
    size: int = 1


async def sized(intent: Job, ctx: TriggerContext) -> JSON:
    """Return the typed intent's fields (proves acquire got a Job)."""
    assert isinstance(intent, Job)
    return {"name": intent.name, "size": intent.size}


def test_pydantic_model_parses_payloads() -> None:
    """A pydantic model class as parse_intent turns payloads into model instances."""
    trigger = define_agent_do(triggers=[spec(parse_intent=Job)]).registry.get("spec.t")
    assert trigger.parse({"name": "a", "size": "3"}) == Job(name="a", size=3)


def test_pydantic_model_rejects_with_field_messages() -> None:
    """A bad payload raises IntentRejectedError naming each offending field."""
    trigger = define_agent_do(triggers=[spec(parse_intent=Job)]).registry.get("spec.t")
    with pytest.raises(IntentRejectedError) as info:
        trigger.parse({"size": "big"})
    error = info.value
    assert error.kind == "spec.t"
    assert any(message.startswith("name:") for message in error.errors)
    assert any(message.startswith("size:") for message in error.errors)
    assert "spec.t" in str(error)


def _strip_url(payload: Any) -> str:
    return str(payload["url"].strip())


def _first(payload: Any) -> Any:
    return payload[0]


@pytest.mark.parametrize(
    ("parse_intent", "payload", "message"),
    [
        (_strip_url, {"url": 5}, "AttributeError: 'int' object has no attribute 'strip'"),
        (_first, [], "IndexError: list index out of range"),
    ],
)
def test_any_error_of_a_hand_written_parser_rejects_the_payload(
    parse_intent: Any, payload: Any, message: str
) -> None:
    """A parser that fails on a payload of the wrong shape with ``AttributeError`` or
    ``IndexError`` (not only ``ValueError``, ``TypeError`` and ``KeyError``) rejects it:
    ``IntentRejectedError`` naming the error, its cause kept (the error came out bare)."""
    trigger = define_agent_do(triggers=[spec(parse_intent=parse_intent)]).registry.get("spec.t")
    with pytest.raises(IntentRejectedError) as info:
        trigger.parse(payload)
    assert info.value.errors == (message,)
    assert info.value.__cause__ is not None


async def test_rejected_payload_writes_nothing(tmp_path: Path) -> None:
    """enqueue_trigger with a payload the model refuses raises and leaves the ledger empty."""
    trigger: Any = spec(parse_intent=Job, acquire=sized)
    async with open_host(tmp_path, trigger, run_scheduler=False) as host:
        agent = host.get("a")
        for payload in ({"size": 2}, {"name": ["x"]}, None, "name"):
            with pytest.raises(IntentRejectedError) as info:
                await agent.enqueue_trigger(trigger_kind="spec.t", payload=payload)
            assert info.value.errors
        assert await agent.events() == []
        assert await agent.intents() == []


async def test_acquire_receives_the_model(tmp_path: Path) -> None:
    """A valid payload is recorded as sent, and acquire receives the parsed model."""
    trigger: Any = spec(parse_intent=Job, acquire=sized)
    async with open_host(tmp_path, trigger) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind="spec.t", payload={"name": "n"})
        assert intent.payload == {"name": "n"}
        state = await agent.wait_for_intent(intent.id)
        assert state.status == "completed"
        done = await agent.events(kinds=["test.done"])
        assert [event.payload for event in done] == [{"name": "n", "size": 1}]


async def test_a_model_instance_is_a_payload(tmp_path: Path) -> None:
    """The intent model itself may be the payload, given to ``enqueue_trigger``, ``call`` or
    a commit's ``tx.enqueue``: it is stored as its JSON form (it was refused as not JSON)."""

    def commit(outcome: Any, tx: Tx) -> None:
        if outcome["name"] == "first":
            tx.enqueue(trigger_kind="spec.t", payload=Job(name="from commit", size=3))
        tx.insert_event(kind="test.done", payload=outcome)

    trigger: Any = spec(parse_intent=Job, acquire=sized, commit=commit)
    async with open_host(tmp_path, trigger) as host:
        agent = host.get("a")
        intent = await agent.enqueue_trigger(trigger_kind="spec.t", payload=Job(name="first"))
        assert intent.payload == {"name": "first", "size": 1}
        assert await agent.call(trigger_kind="spec.t", payload=Job(name="called", size=2))
        with anyio.fail_after(10):
            await agent.wait_for_intent(intent.id)  # its commit enqueued the third
            for state in await agent.intents():
                await agent.wait_for_intent(state.intent_event_id)
        done = await agent.events(kinds=["test.done"])
        assert sorted(event.payload["name"] for event in done) == ["called", "first", "from commit"]


# -- RetryPolicy ---------------------------------------------------------------------------


def test_retry_policy_defaults() -> None:
    """The default policy: 3 attempts, 1 s initial backoff, x2, capped at 60 s, jitter."""
    policy = RetryPolicy()
    assert (policy.max_attempts, policy.initial_backoff, policy.backoff_factor) == (3, 1.0, 2.0)
    assert (policy.max_backoff, policy.jitter) == (60.0, True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"max_attempts": -1},
        {"max_attempts": 1.5},
        {"max_attempts": "3"},
        {"initial_backoff": -1},
        {"initial_backoff": math.nan},
        {"initial_backoff": math.inf},
        {"initial_backoff": "1"},
        {"backoff_factor": 0.5},
        {"backoff_factor": math.nan},
        {"max_backoff": -0.1},
        {"max_backoff": math.inf},
    ],
)
def test_retry_policy_rejects_bad_values(kwargs: dict[str, Any]) -> None:
    """RetryPolicy refuses out-of-range or non-numeric settings."""
    with pytest.raises(ValueError, match="RetryPolicy"):
        RetryPolicy(**kwargs)


def test_backoff_without_jitter_doubles_and_caps() -> None:
    """Without jitter the backoff is initial * factor^(n-1), capped at max_backoff."""
    policy = RetryPolicy(initial_backoff=1, backoff_factor=2, max_backoff=10, jitter=False)
    assert [policy.backoff(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert policy.backoff(0) == 1


def test_backoff_with_factor_one_is_constant() -> None:
    """A factor of 1 gives a constant backoff."""
    policy = RetryPolicy(initial_backoff=0.5, backoff_factor=1, jitter=False)
    assert {policy.backoff(n) for n in range(1, 20)} == {0.5}


def test_zero_initial_backoff_is_zero_even_with_jitter() -> None:
    """initial_backoff=0 means retry at once, jitter or not."""
    assert RetryPolicy(initial_backoff=0).backoff(5) == 0
    assert RetryPolicy(initial_backoff=0, jitter=False).backoff(5) == 0


def test_backoff_stays_capped_after_very_many_attempts() -> None:
    """A policy with many attempts keeps returning the cap instead of overflowing."""
    policy = RetryPolicy(max_attempts=100_000, max_backoff=30, jitter=False)
    assert policy.backoff(1100) == 30
    assert policy.backoff(99_999) == 30


def test_backoff_with_jitter_stays_within_half_and_full() -> None:
    """With jitter each backoff is drawn from [b/2, b] of the unjittered value b."""
    policy = RetryPolicy(initial_backoff=1, backoff_factor=2, max_backoff=10, jitter=True)
    plain = RetryPolicy(initial_backoff=1, backoff_factor=2, max_backoff=10, jitter=False)
    rng = random.Random(1234)
    for attempt in range(1, 8):
        base = plain.backoff(attempt)
        draws = [policy.backoff(attempt, rng) for _ in range(200)]
        assert all(base / 2 <= value <= base for value in draws)
        assert len(set(draws)) > 1  # it really varies
