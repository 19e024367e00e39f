"""Durable workflows, built as a trigger: steps, durable sleep, run cancellation.

A run is an intent of the built-in ``trigger.workflow`` trigger. Its body runs in ``acquire``
and is resumed by replay: every step result and every sleep is a ledger fact of the run,
recorded as it happens (token-checked, so only the attempt holding the claim records), and a
replay answers completed steps and elapsed sleeps from those facts instead of running them
again. Calls are matched to facts by their order in the body (``seq``), so a body must call
its steps and sleeps in a deterministic order.

A sleep that has not elapsed ends the attempt: the run is rescheduled to wake at the sleep's
end (a due time; nothing waits in memory). Cancelling a run is ``cancel_trigger``: a sleeping
run is cancelled at once; a running one stops at its next step call or sleep (``finally``
blocks run), and a step already running finishes first.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
import random
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

import anyio

from ledger import JSON, LedgerError, dump_json, ms_to_datetime

from ._abort import AbortError
from ._context import ClaimLostError, TriggerContext
from ._errors import FatalError, TriggerError
from ._spec import RetryPolicy

if TYPE_CHECKING:
    from ._results import Cancellation, Failure
    from ._spec import DurableTrigger
    from ._tx import Tx

__all__ = [
    "WORKFLOW_KIND",
    "RunCancelledError",
    "StepFailedError",
    "Workflow",
    "WorkflowError",
    "sleep",
    "step",
    "workflow",
    "workflow_trigger",
]

P = ParamSpec("P")
R = TypeVar("R")

WORKFLOW_KIND = "trigger.workflow"
RUN_STARTED = "trigger.workflow.started"
STEP_COMPLETED = "trigger.workflow.step_completed"
STEP_FAILED = "trigger.workflow.step_failed"
WAIT_CREATED = "trigger.workflow.wait_created"
WAIT_COMPLETED = "trigger.workflow.wait_completed"
RUN_COMPLETED = "trigger.workflow.run_completed"
RUN_CANCELLED = "trigger.workflow.run_cancelled"
REPLAY_KINDS = (STEP_COMPLETED, STEP_FAILED, WAIT_CREATED, WAIT_COMPLETED)

DEFAULT_STEP_RETRY = RetryPolicy(max_attempts=3, initial_backoff=1.0, max_backoff=30.0)
"""Steps retry three times in all, 1 s then 2 s apart (jittered), unless they say otherwise."""


class WorkflowError(TriggerError):
    """Root of the workflow errors."""


class RunCancelledError(WorkflowError, AbortError):
    """The run was cancelled; ``reason`` is the cancel reason."""

    def __init__(self, reason: object = None) -> None:
        AbortError.__init__(self, reason)

    def __str__(self) -> str:
        return "run cancelled" + ("" if self.reason is None else f": {self.reason}")


class StepFailedError(WorkflowError):
    """A step failed for good (a ``FatalError``, an abort, or its attempts ran out).

    Raised inside the workflow body at the step's call, where the body may catch it; the same
    error is raised again, from the recorded fact, on every replay.

    Attributes:
        step: the step's name.
        error_type: the last error's type name.
        message: the last error's message.
        attempts: how many attempts ran.
    """

    def __init__(self, step: str, error_type: str, message: str, attempts: int) -> None:
        self.step = step
        self.error_type = error_type
        self.message = message
        self.attempts = attempts
        super().__init__(
            f"step {step!r} failed after {attempts} attempt(s): {error_type}: {message}"
        )


class _Suspend(BaseException):
    """Unwinds a body that must wait for a sleep to end (caught by the run, never seen)."""

    def __init__(self, until_ms: int) -> None:
        super().__init__(until_ms)
        self.until_ms = until_ms


# -- declaring workflows and steps -------------------------------------------------------------


@dataclass(frozen=True)
class Workflow(Generic[P, R]):
    """A workflow function, as ``@workflow`` returns it; start runs with ``start(wf, args)``.

    Attributes:
        name: the name runs record (the function's qualified name unless given).
        fn: the async body.
    """

    name: str
    fn: Callable[P, Awaitable[R]]


@overload
def workflow(fn: Callable[P, Awaitable[R]], /) -> Workflow[P, R]: ...


@overload
def workflow(
    *, name: str | None = None
) -> Callable[[Callable[P, Awaitable[R]]], Workflow[P, R]]: ...


def workflow(fn: Callable[P, Awaitable[R]] | None = None, /, *, name: str | None = None) -> Any:
    """Declare an async function as a durable workflow (``@workflow`` or
    ``@workflow(name="...")``).

    The body calls steps (``@step`` functions) and ``sleep``; it is replayed from the ledger
    after a sleep, a crash or a restart, so it must make the same calls in the same order
    given the same arguments and step results (no clocks, random numbers or I/O outside steps).

    Raises:
        TypeError: ``fn`` is not an ``async def`` function.
    """

    def wrap(body: Callable[P, Awaitable[R]]) -> Workflow[P, R]:
        if not inspect.iscoroutinefunction(body):
            raise TypeError(f"@workflow needs an async def function, not {body!r}")
        return Workflow(name=name or f"{body.__module__}.{body.__qualname__}", fn=body)

    return wrap if fn is None else wrap(fn)


@overload
def step(fn: Callable[P, Awaitable[R]], /) -> Callable[P, Awaitable[R]]: ...


@overload
def step(
    *, name: str | None = None, retry: RetryPolicy = ...
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]: ...


def step(
    fn: Callable[P, Awaitable[R]] | None = None,
    /,
    *,
    name: str | None = None,
    retry: RetryPolicy = DEFAULT_STEP_RETRY,
) -> Any:
    """Declare an async function as a workflow step (``@step`` or ``@step(retry=...)``).

    Called inside a workflow, the call is recorded: its result (any JSON value) becomes a
    ledger fact, and a replay returns that result without running the step again. A step
    that raises is retried per ``retry``; ``FatalError`` and abort errors are never retried.
    Called outside a workflow, it is a plain call.

    Raises:
        TypeError: ``fn`` is not an ``async def`` function.
    """

    def wrap(body: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        if not inspect.iscoroutinefunction(body):
            raise TypeError(f"@step needs an async def function, not {body!r}")
        step_name = name or body.__qualname__

        @functools.wraps(body)
        async def call(*args: P.args, **kwargs: P.kwargs) -> R:
            run = _current.get(None)
            if run is None:
                return await body(*args, **kwargs)
            return await run.step(step_name, retry, functools.partial(body, *args, **kwargs))

        return call

    return wrap if fn is None else wrap(fn)


async def sleep(duration: str | float | timedelta) -> None:
    """Sleep durably inside a workflow: survives restarts, fires once, holds no task.

    ``duration`` is seconds, a ``timedelta``, or a string such as ``"30s"``, ``"5min"``,
    ``"2h"``, ``"1d"``, ``"250ms"``. A sleeping run is cancelled at once by a cancel.

    Raises:
        RuntimeError: called outside a workflow (use ``anyio.sleep`` there).
        ValueError: the duration is negative or not understood.
    """
    run = _current.get(None)
    if run is None:
        raise RuntimeError("workflows.sleep() is for workflow bodies; use anyio.sleep elsewhere")
    await run.sleep(parse_duration(duration))


_UNITS_MS = {"ms": 1, "s": 1000, "sec": 1000, "m": 60_000, "min": 60_000, "h": 3_600_000,
             "d": 86_400_000}  # fmt: skip
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|sec|m|min|h|d)\s*$")


def parse_duration(duration: str | float | timedelta) -> int:
    """A duration as milliseconds (see ``sleep``)."""
    if isinstance(duration, timedelta):
        ms = duration.total_seconds() * 1000
    elif isinstance(duration, str):
        match = _DURATION.match(duration)
        if match is None:
            raise ValueError(f"cannot read the duration {duration!r} (try '30s', '5min', '2h')")
        ms = float(match.group(1)) * _UNITS_MS[match.group(2)]
    elif isinstance(duration, int | float) and not isinstance(duration, bool):
        ms = duration * 1000
    else:
        raise TypeError(f"a duration is seconds, a timedelta or a string, not {duration!r}")
    if not math.isfinite(ms) or ms < 0:
        raise ValueError(f"a duration must be finite and >= 0, not {duration!r}")
    return round(ms)


# -- running a body ------------------------------------------------------------------------------


_rng = random.Random()
_current: contextvars.ContextVar[_Run] = contextvars.ContextVar("durable_triggers_workflow_run")


@dataclass
class _Run:
    """One attempt's view of a run: the recorded facts and the next call's sequence number."""

    ctx: TriggerContext
    completed: dict[int, JSON] = field(default_factory=dict)
    failed: dict[int, dict[str, Any]] = field(default_factory=dict)
    waits: dict[int, int] = field(default_factory=dict)
    woke: set[int] = field(default_factory=set)
    seq: int = 0

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def _check_cancel(self) -> None:
        signal = self.ctx.signal
        if signal.aborted:
            reason = signal.reason
            if isinstance(reason, AbortError):
                reason = reason.reason
            raise RunCancelledError(reason)

    async def step(self, name: str, retry: RetryPolicy, call: Callable[[], Awaitable[R]]) -> R:
        seq = self._next()
        if seq in self.completed:
            recorded: R = self.completed[seq]
            return recorded
        if seq in self.failed:
            fact = self.failed[seq]
            raise StepFailedError(name, fact["error_type"], fact["message"], fact["attempts"])
        self._check_cancel()
        attempt = 0
        while True:
            attempt += 1
            try:
                result = await call()
            except Exception as exc:
                final = isinstance(exc, FatalError | AbortError) or attempt >= retry.max_attempts
                if not final:
                    await anyio.sleep(retry.backoff(attempt, _rng))
                    self._check_cancel()
                    continue
                fact = {"seq": seq, "step": name, "error_type": type(exc).__name__,
                        "message": str(exc), "attempts": attempt}  # fmt: skip
                await self.ctx._record(STEP_FAILED, fact)
                raise StepFailedError(name, fact["error_type"], fact["message"], attempt) from exc
            await self.ctx._record(STEP_COMPLETED, {"seq": seq, "step": name, "result": result})
            self.completed[seq] = result
            return result

    async def sleep(self, ms: int) -> None:
        seq = self._next()
        if seq in self.woke:
            return
        self._check_cancel()
        until = self.waits.get(seq)
        if until is None:
            until = self.ctx._backend.now_ms() + ms
            await self.ctx._record(WAIT_CREATED, {"seq": seq, "until": until})
            self.waits[seq] = until
        if self.ctx._backend.now_ms() < until:
            raise _Suspend(until)
        await self.ctx._record(WAIT_COMPLETED, {"seq": seq})
        self.woke.add(seq)


async def _replay_facts(ctx: TriggerContext) -> _Run:
    run = _Run(ctx)
    for event in await ctx.events(intent_event_id=ctx.intent_event_id, kinds=REPLAY_KINDS):
        fact = event.payload
        assert isinstance(fact, dict)
        seq = int(fact["seq"])
        if event.kind == STEP_COMPLETED:
            run.completed.setdefault(seq, fact.get("result"))
        elif event.kind == STEP_FAILED:
            run.failed.setdefault(seq, fact)
        elif event.kind == WAIT_CREATED:
            run.waits.setdefault(seq, int(fact["until"]))
        else:
            run.woke.add(seq)
    return run


# -- the built-in trigger ------------------------------------------------------------------------


def workflow_trigger(workflows: Sequence[Workflow[..., Any]]) -> DurableTrigger[Any, Any]:
    """The ``trigger.workflow`` trigger that runs ``workflows`` (``define_agent_do`` adds it).

    Raises:
        ValueError: two workflows share a name.
    """
    by_name: dict[str, Workflow[..., Any]] = {}
    for wf in workflows:
        if not isinstance(wf, Workflow):
            raise TypeError(f"workflows must come from @workflow, not {wf!r}")
        if wf.name in by_name:
            raise ValueError(f"two workflows are named {wf.name!r}")
        by_name[wf.name] = wf

    def parse(payload: JSON) -> JSON:
        if not (isinstance(payload, dict) and isinstance(payload.get("workflow"), str)):
            raise ValueError("a workflow run's payload names its workflow")
        if payload["workflow"] not in by_name:
            raise ValueError(f"no workflow named {payload['workflow']!r} on this actor class")
        if not isinstance(payload.get("args", []), list):
            raise ValueError("a workflow run's args are a list")
        return payload

    async def acquire(intent: Mapping[str, Any], ctx: TriggerContext) -> JSON:
        wf = by_name[intent["workflow"]]
        run = await _replay_facts(ctx)
        token = _current.set(run)
        try:
            run._check_cancel()
            try:
                result = await wf.fn(*intent.get("args", []))
            except (AbortError, _Suspend, LedgerError, ClaimLostError):
                raise  # cancelled, waiting, or storage trouble: not the body's failure
            except Exception as exc:
                # The body failed: a run failure, not something to retry by running it again.
                raise FatalError(f"{type(exc).__name__}: {exc}") from exc
        except _Suspend as suspend:
            return {"suspend_until": suspend.until_ms}
        finally:
            _current.reset(token)
        return {"result": result}

    def commit(outcome: Mapping[str, Any], tx: Tx) -> None:
        if "suspend_until" in outcome:
            tx.reschedule(ms_to_datetime(int(outcome["suspend_until"])))
            return
        dump_json(outcome["result"], what="workflow result")
        tx._insert_framework_event(RUN_COMPLETED, {"result": outcome["result"]})

    def commit_cancelled(intent: Any, cancellation: Cancellation, tx: Tx) -> None:
        tx._insert_framework_event(RUN_CANCELLED, {"reason": cancellation.reason})

    def commit_failed(intent: Any, failure: Failure, tx: Tx) -> None:
        return None  # the framework's trigger.failed fact says it all

    return {
        "kind": WORKFLOW_KIND,
        "intent_event_kind": RUN_STARTED,
        "cancellation": "cooperative",
        "parse_intent": parse,
        "acquire": acquire,
        "commit": commit,
        "commit_cancelled": commit_cancelled,
        "commit_failed": commit_failed,
        "retry": RetryPolicy(max_attempts=5, initial_backoff=0.5, max_backoff=10.0),
    }
