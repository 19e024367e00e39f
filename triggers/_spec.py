"""The trigger contract: the spec dict, its retry policy, and its validation."""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, Literal, NotRequired, TypedDict, TypeVar

from pydantic import BaseModel, ValidationError

from ledger import JSON, LONGEST_MS, PayloadError, check_text

from ._errors import (
    FatalError,
    IntentRejectedError,
    TriggerDefinitionError,
    UnknownTriggerError,
)

if TYPE_CHECKING:
    from ._context import TriggerContext
    from ._results import Cancellation, Failure
    from ._tx import Tx

IntentT = TypeVar("IntentT")
OutcomeT = TypeVar("OutcomeT")

CancellationMode = Literal["cooperative", "ignored"]
RESERVED_PREFIX = "trigger."


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How failed attempts are retried: exponential backoff with optional full jitter.

    Args:
        max_attempts: attempts in all, the first included (1 means never retry).
        initial_backoff: seconds before the first retry.
        backoff_factor: multiplier per further retry.
        max_backoff: cap on one backoff, seconds.
        jitter: draw each backoff uniformly from [backoff / 2, backoff].
    """

    max_attempts: int = 3
    initial_backoff: float = 1.0
    backoff_factor: float = 2.0
    max_backoff: float = 60.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_attempts, bool)
            or not isinstance(self.max_attempts, int)
            or self.max_attempts < 1
        ):
            raise ValueError("RetryPolicy.max_attempts must be an int >= 1")
        for name in ("initial_backoff", "backoff_factor", "max_backoff"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"RetryPolicy.{name} must be a finite number >= 0")
            if name != "backoff_factor" and value * 1000 > LONGEST_MS:
                raise ValueError(f"RetryPolicy.{name} is at most a century (seconds)")
        if self.backoff_factor < 1:
            raise ValueError("RetryPolicy.backoff_factor must be >= 1")
        if not isinstance(self.jitter, bool):
            raise TypeError(f"RetryPolicy.jitter must be a bool, not {self.jitter!r}")

    def backoff(self, failed_attempts: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``failed_attempts``-th failed attempt."""
        base = self.initial_backoff
        for _ in range(max(0, failed_attempts - 1)):
            if base >= self.max_backoff or base <= 0:
                break
            base *= self.backoff_factor
        base = min(base, self.max_backoff)
        if self.jitter and base > 0:
            return (rng or random).uniform(base / 2, base)
        return base


DEFAULT_RETRY = RetryPolicy()


class DurableTrigger(TypedDict, Generic[IntentT, OutcomeT]):
    """A trigger: how to do one kind of durable work.

    ``acquire`` does the side-effecting work with ``ctx.signal``; ``commit``,
    ``commit_cancelled`` and ``commit_failed`` are synchronous and write the terminal facts in
    the transaction that ends the intent.
    """

    kind: str
    intent_event_kind: str
    cancellation: CancellationMode
    parse_intent: type[BaseModel] | Callable[[JSON], IntentT]
    acquire: Callable[[IntentT, TriggerContext], Awaitable[OutcomeT]]
    commit: Callable[[OutcomeT, Tx], None]
    commit_cancelled: Callable[[IntentT, Cancellation, Tx], None]
    retry: NotRequired[RetryPolicy]
    timeout: NotRequired[float | timedelta]
    commit_failed: NotRequired[Callable[[IntentT, Failure, Tx], None]]


_REQUIRED = (
    "kind",
    "intent_event_kind",
    "cancellation",
    "parse_intent",
    "acquire",
    "commit",
    "commit_cancelled",
)
_OPTIONAL = ("retry", "timeout", "commit_failed")
_SYNC_KEYS = ("commit", "commit_cancelled", "commit_failed")


@dataclass(frozen=True, slots=True)
class TriggerDef:
    """A validated trigger spec, as the engine uses it."""

    kind: str
    intent_event_kind: str
    cancellation: CancellationMode
    parse_intent: Callable[[JSON], Any]
    acquire: Callable[[Any, Any], Awaitable[Any]]
    commit: Callable[[Any, Any], None]
    commit_cancelled: Callable[[Any, Any, Any], None]
    commit_failed: Callable[[Any, Any, Any], None] | None
    retry: RetryPolicy
    timeout: float | None
    spec: Mapping[str, Any]
    parse_claimed: Callable[[JSON], Any] | None = None
    """The framework's own triggers only: how an intent this host claimed is parsed, where
    that differs from recording one (a workflow run this host lacks the workflow of is not
    refused: it is left for a host that has it)."""

    def start(self, intent: Any, ctx: Any) -> Awaitable[Any]:
        """Call ``acquire(intent, ctx)``; returns what it returned, to await.

        Raises:
            FatalError: ``acquire`` returned something that cannot be awaited (a plain
                ``def``): retrying would not help.
        """
        running = self.acquire(intent, ctx)
        if not inspect.isawaitable(running):
            raise FatalError(
                f"acquire of trigger {self.kind!r} returned {type(running).__name__}, not an"
                " awaitable: define it with async def"
            )
        return running

    def parse(self, payload: JSON, *, claimed: bool = False) -> Any:
        """Validate a raw payload into the typed intent (``claimed``: of an intent this host
        claimed, rather than one about to be recorded).

        Raises:
            IntentRejectedError: ``parse_intent`` refused it: raised a pydantic
                ``ValidationError`` or any other ``Exception`` (a payload of the wrong shape
                often raises ``AttributeError`` or ``IndexError`` in a hand-written parser).
        """
        parse = self.parse_claimed if claimed and self.parse_claimed else self.parse_intent
        try:
            return parse(payload)
        except ValidationError as exc:
            errors = [
                f"{'.'.join(str(p) for p in err['loc']) or '(payload)'}: {err['msg']}"
                for err in exc.errors()
            ]
            raise IntentRejectedError(self.kind, errors) from None
        except (ValueError, TypeError, KeyError) as exc:
            raise IntentRejectedError(self.kind, [str(exc) or type(exc).__name__]) from None
        except Exception as exc:
            raise IntentRejectedError(self.kind, [f"{type(exc).__name__}: {exc}"]) from exc


def as_payload(payload: JSON | BaseModel) -> JSON:
    """An intent payload as JSON: a pydantic model instance (often the trigger's own intent
    model) as ``model_dump(mode="json")``; anything else as it is."""
    if isinstance(payload, BaseModel):
        dumped: JSON = payload.model_dump(mode="json")
        return dumped
    return payload


def validate_trigger(spec: object, position: int = 0, *, builtin: bool = False) -> TriggerDef:
    """Check one spec dict and return its validated form.

    The ``trigger.`` prefix of kinds and event kinds is kept for the framework's own
    (``builtin``) triggers.

    Raises:
        TriggerDefinitionError: naming the trigger and the offending key.
    """
    if not isinstance(spec, Mapping):
        raise TriggerDefinitionError(f"#{position}", None, "a trigger must be a dict")
    kind = spec.get("kind")
    name = kind if isinstance(kind, str) and kind else f"#{position}"
    for key in _REQUIRED:
        if key not in spec:
            raise TriggerDefinitionError(name, key, "missing required key")
    unknown = sorted(set(spec) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise TriggerDefinitionError(name, unknown[0], "unknown key (check the spelling)")
    if not isinstance(kind, str) or not kind or "\x00" in kind:
        raise TriggerDefinitionError(name, "kind", "must be a non-empty str without NUL")
    if kind.startswith(RESERVED_PREFIX) and not builtin:
        raise TriggerDefinitionError(name, "kind", f"the {RESERVED_PREFIX!r} prefix is reserved")
    event_kind = spec["intent_event_kind"]
    if not isinstance(event_kind, str) or not event_kind or "\x00" in event_kind:
        raise TriggerDefinitionError(
            name, "intent_event_kind", "must be a non-empty str without NUL"
        )
    if event_kind.startswith(RESERVED_PREFIX) and not builtin:
        raise TriggerDefinitionError(
            name, "intent_event_kind", f"the {RESERVED_PREFIX!r} prefix is reserved"
        )
    cancellation = spec["cancellation"]
    if cancellation not in ("cooperative", "ignored"):
        raise TriggerDefinitionError(
            name, "cancellation", f"must be 'cooperative' or 'ignored', not {cancellation!r}"
        )
    parse_intent = spec["parse_intent"]
    if isinstance(parse_intent, type) and issubclass(parse_intent, BaseModel):
        parse_intent = parse_intent.model_validate
    elif not callable(parse_intent):
        raise TriggerDefinitionError(
            name, "parse_intent", "must be a pydantic model class or a callable"
        )
    else:
        _check_arguments(name, "parse_intent", parse_intent)
    if not callable(spec["acquire"]):
        raise TriggerDefinitionError(name, "acquire", "must be an async callable")
    _check_arguments(name, "acquire", spec["acquire"])
    for key in _SYNC_KEYS:
        if key not in spec:
            continue
        fn = spec[key]
        if not callable(fn):
            raise TriggerDefinitionError(name, key, "must be a callable")
        if _is_async(fn):
            raise TriggerDefinitionError(
                name, key, "must be synchronous (def, not async def): it runs inside the commit"
            )
        _check_arguments(name, key, fn)
    retry = spec.get("retry", DEFAULT_RETRY)
    if not isinstance(retry, RetryPolicy):
        raise TriggerDefinitionError(name, "retry", "must be a RetryPolicy")
    timeout = spec.get("timeout")
    if isinstance(timeout, timedelta):
        timeout = timeout.total_seconds()
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise TriggerDefinitionError(name, "timeout", "must be a positive number of seconds")
    return TriggerDef(
        kind=kind,
        intent_event_kind=event_kind,
        cancellation=cancellation,
        parse_intent=parse_intent,
        acquire=spec["acquire"],
        commit=spec["commit"],
        commit_cancelled=spec["commit_cancelled"],
        commit_failed=spec.get("commit_failed"),
        retry=retry,
        timeout=None if timeout is None else float(timeout),
        spec=spec,
    )


MAX_KEY_BYTES = 1024
"""The longest idempotency key, in bytes of UTF-8. Keys are indexed: PostgreSQL refuses an
index entry past about 2,700 bytes, and only when the transaction writes it, failing every
operation of its batch; the same limit holds on SQLite, so an application moves between
backends unchanged."""


def check_idempotency_key(key: object) -> None:
    """Refuse an idempotency key a user may not give: not a str, a NUL in it, longer than
    ``MAX_KEY_BYTES``, or the framework's own ``trigger.`` prefix.

    Raises:
        TypeError: ``key`` is not a str (or None).
        ValueError: ``key`` starts with ``trigger.``.
        ledger.PayloadError: ``key`` holds a NUL, or is too long.
    """
    if key is None:
        return
    if not isinstance(key, str):
        raise TypeError(f"idempotency_key must be a str, not {type(key).__name__}")
    if key.startswith(RESERVED_PREFIX):
        raise ValueError(f"idempotency keys starting with {RESERVED_PREFIX!r} are reserved")
    check_text(key, "idempotency_key")
    if len(key) * 4 > MAX_KEY_BYTES and len(key.encode()) > MAX_KEY_BYTES:
        raise PayloadError(f"idempotency_key is longer than {MAX_KEY_BYTES} bytes of UTF-8")


_ARGUMENTS = {
    "parse_intent": "(payload)",
    "acquire": "(intent, ctx)",
    "commit": "(outcome, tx)",
    "commit_cancelled": "(intent, cancellation, tx)",
    "commit_failed": "(intent, failure, tx)",
}
"""The positional arguments each callable of a spec is called with."""


def _check_arguments(name: str, key: str, fn: Callable[..., Any]) -> None:
    """Refuse a callable that cannot take the arguments ``key`` is called with (one whose
    signature Python cannot tell, such as some builtins, is left to fail when called)."""
    wanted = _ARGUMENTS[key]
    arguments = [None] * (wanted.count(",") + 1)
    # A decorator's wrapper (``functools.wraps``) may take other arguments than the function
    # it wraps: either signature may be the one that is called.
    for follow_wrapped in (True, False):
        try:
            signature = inspect.signature(fn, follow_wrapped=follow_wrapped)
        except (TypeError, ValueError):  # no signature Python can tell (some builtins)
            return
        try:
            signature.bind(*arguments)
        except TypeError:
            continue
        return
    raise TriggerDefinitionError(
        name, key, f"is called as {key}{wanted}, but its signature is {signature}"
    )


def _is_async(fn: Callable[..., Any]) -> bool:
    call = getattr(fn, "__call__", None)  # noqa: B004 - callable objects with async __call__
    return (
        inspect.iscoroutinefunction(fn)
        or inspect.isasyncgenfunction(fn)
        or (call is not None and inspect.iscoroutinefunction(call))
    )


class TriggerRegistry:
    """The validated triggers of one actor class, by kind."""

    def __init__(self, specs: Iterable[object], *, builtins: Iterable[object] = ()) -> None:
        """Validate ``specs`` (and the framework's ``builtins``, dicts or already validated),
        refusing duplicate kinds and intent event kinds.

        Raises:
            TriggerDefinitionError: naming the trigger and the offending key.
        """
        if isinstance(specs, Mapping | str | bytes):
            raise TriggerDefinitionError(
                "(actor class)", "triggers", "must be a list of trigger dicts: triggers=[...]"
            )
        self._by_kind: dict[str, TriggerDef] = {}
        checked = [validate_trigger(spec, position) for position, spec in enumerate(specs)]
        checked += [
            spec if isinstance(spec, TriggerDef) else validate_trigger(spec, builtin=True)
            for spec in builtins
        ]
        event_kinds: dict[str, str] = {}
        for trigger in checked:
            if trigger.kind in self._by_kind:
                raise TriggerDefinitionError(trigger.kind, "kind", "duplicate trigger kind")
            other = event_kinds.setdefault(trigger.intent_event_kind, trigger.kind)
            if other != trigger.kind:
                raise TriggerDefinitionError(
                    trigger.kind, "intent_event_kind",
                    f"{trigger.intent_event_kind!r} is already trigger {other!r}'s: the intent"
                    " events of two triggers could not be told apart",
                )  # fmt: skip
            self._by_kind[trigger.kind] = trigger

    def get(self, kind: object) -> TriggerDef:
        """The trigger of ``kind``.

        Raises:
            UnknownTriggerError: nothing of that kind is registered.
        """
        trigger = self._by_kind.get(kind) if isinstance(kind, str) else None
        if trigger is None:
            # The framework's own kinds are not the user's to name: the hint leaves them out.
            users = [known for known in self._by_kind if not known.startswith(RESERVED_PREFIX)]
            raise UnknownTriggerError(kind, users)
        return trigger

    @property
    def kinds(self) -> tuple[str, ...]:
        """Registered kinds, in registration order."""
        return tuple(self._by_kind)

    def __iter__(self) -> Any:
        return iter(self._by_kind.values())
