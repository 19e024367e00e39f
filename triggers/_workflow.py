"""Durable workflows, built as a trigger: steps, durable sleep, run cancellation.

A run is an intent of the built-in ``trigger.workflow`` trigger. Its body runs in ``acquire``
and is resumed by replay: every step result and every sleep is a ledger fact of the run,
recorded as it happens (token-checked, so only the attempt holding the claim records), and a
replay answers completed steps and elapsed sleeps from those facts instead of running them
again. Calls are matched to facts by their order in the body (their *place*, ``seq``), so a
body must make its calls in a deterministic order; each fact also says what kind of call made
it, so a replay that calls something else at a recorded place fails with
``ReplayDivergenceError``.

A sleep that has not elapsed ends the attempt: the run is rescheduled to wake at the sleep's
end (a due time; nothing waits in memory). A step's retry backoff is such a wait too. A cancel
reaches the body once (``RunCancelledError``): at the call it awaits (a step already running
finishes and is recorded first), or at its next call; a waiting run is resumed by replay to
the place where it waits. The place where it reached the body is a fact, so a replay raises
it there again; calls made after it (in ``finally`` blocks) run as cleanup.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
import random
import re
import time
from collections.abc import (
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, NoReturn, ParamSpec, TypeVar, overload

import anyio
from pydantic import BaseModel, ValidationError

from ledger import (
    JSON,
    LedgerBusyError,
    LedgerClosedError,
    LedgerTx,
    LedgerWriteError,
    PayloadError,
    dump_json,
    ms_to_datetime,
)

from ._abort import AbortError, AbortSignal, is_failure
from ._context import ClaimLostError, StreamWriter, TriggerContext
from ._engine import CANCEL_REQUESTED, PutBack
from ._errors import FatalError, TriggerError
from ._spec import RetryPolicy, TriggerDef, validate_trigger

if TYPE_CHECKING:
    from ledger import Event

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
STEP_ATTEMPT_FAILED = "trigger.workflow.step_attempt_failed"
WAIT_CREATED = "trigger.workflow.wait_created"
WAIT_COMPLETED = "trigger.workflow.wait_completed"
RUN_COMPLETED = "trigger.workflow.run_completed"
RUN_CANCELLED = "trigger.workflow.run_cancelled"
HOOK_CREATED = "trigger.workflow.hook_created"
HOOK_RECEIVED = "trigger.workflow.hook_received"
HOOK_DISPOSED = "trigger.workflow.hook_disposed"
HOOK_CONFLICT = "trigger.workflow.hook_conflict"
HOOK_REJECTED = "trigger.workflow.hook_rejected"
RUN_FAILED = "trigger.workflow.run_failed"
RACE_WON = "trigger.workflow.race_won"
CANCEL_DELIVERED = "trigger.workflow.cancel_delivered"
CONTROLLER_ABORTED = "trigger.workflow.controller_aborted"
STREAM_WRITTEN = "trigger.workflow.stream_written"
REPLAY_KINDS = (STEP_COMPLETED, STEP_FAILED, STEP_ATTEMPT_FAILED, WAIT_CREATED, WAIT_COMPLETED,
                HOOK_CREATED, HOOK_RECEIVED, HOOK_DISPOSED, HOOK_CONFLICT, HOOK_REJECTED,
                RACE_WON, CANCEL_DELIVERED, CONTROLLER_ABORTED, STREAM_WRITTEN)  # fmt: skip
_PLACE_KINDS = {STEP_COMPLETED: "step", STEP_FAILED: "step", STEP_ATTEMPT_FAILED: "step",
                WAIT_CREATED: "sleep", WAIT_COMPLETED: "sleep", HOOK_CREATED: "hook",
                HOOK_CONFLICT: "hook", RACE_WON: "race", CONTROLLER_ABORTED: "AbortController",
                STREAM_WRITTEN: "stream write"}  # fmt: skip
"""What kind of call made each fact that has a place (``seq``) in the run."""
FOREVER_MS = 253_402_300_799_000
"""9999-12-31: the due time of a run that waits for a hook and nothing else."""
MAX_SLEEP_MS = 100 * 366 * 86_400_000
"""The longest sleep: about a century (a longer one is surely a unit mistake)."""
MAX_TOKEN_BYTES = 1024
"""The longest hook token, in UTF-8 bytes."""

_HOOK_POLL_S = 1.0
"""How often a group re-reads its awaited hooks when no wake-up came (lost wake-ups)."""

ELSEWHERE_S = 5.0
"""How long a run claimed by a host that lacks its workflow waits before it is due again."""

_NOT_HERE_WARN_S = 60.0
"""A host lacking a workflow warns of its runs at most this often (debug in between)."""

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


class HookNotFoundError(WorkflowError, LookupError):
    """No active hook holds this token in the actor (never created, disposed, or its run
    ended).

    Attributes:
        token: the token asked for.
    """

    def __init__(self, token: str) -> None:
        self.token = token
        super().__init__(f"no active hook with token {token!r}")


class HookConflictError(WorkflowError):
    """Another active hook of the actor already holds this token.

    Attributes:
        token: the token.
        run_id: the run whose hook holds it.
    """

    def __init__(self, token: str, run_id: int) -> None:
        self.token = token
        self.run_id = run_id
        super().__init__(f"the hook token {token!r} is held by an active hook of run {run_id}")


class HookAlreadyResumedError(WorkflowError):
    """The hook holding this token already received its payload: a hook is single-shot
    (``await hook`` answers its first payload), so a second one would never be seen.

    Attributes:
        token: the token.
        run_id: the run whose hook holds it.
    """

    def __init__(self, token: str, run_id: int) -> None:
        self.token = token
        self.run_id = run_id
        super().__init__(
            f"the hook with token {token!r} of run {run_id} already received its payload "
            "(a hook takes one; create another hook for the next)"
        )


class _BodyFailedError(FatalError):
    """The body raised ``error`` (or its replay diverged): the run fails at once, and the
    run's ``run_failed`` fact keeps the error's own type and message."""

    def __init__(self, error: BaseException) -> None:
        self.error_type = type(error).__name__
        self.message = str(error)
        super().__init__(f"{self.error_type}: {self.message}")


class ReplayDivergenceError(WorkflowError):
    """A replay made a different call than the run's first execution at the same place (a
    step where a sleep was recorded, another step, ...): the body is not deterministic (a
    clock, a random number, I/O or a plain coroutine decided which calls to make).

    Raised at the call; the run fails with it even if the body catches it.

    Attributes:
        seq: the place in the run.
        recorded: the call recorded there (``"step 'fetch'"``, ``"sleep"``, ``"hook"``, ...).
        called: the call the replay made there.
    """

    def __init__(self, seq: int, recorded: str, called: str) -> None:
        self.seq = seq
        self.recorded = recorded
        self.called = called
        super().__init__(
            f"call {seq} of the run replayed as {called}, but the run recorded {recorded} "
            "there: the workflow body must make the same calls in the same order"
        )


class _Suspend(BaseException):
    """Unwinds a body that must wait for a sleep or a hook (caught by the run, never seen)."""

    def __init__(self, until_ms: int, hooks: tuple[int, ...] = ()) -> None:
        super().__init__(until_ms)
        self.until_ms = until_ms
        self.hooks = hooks
        """The places (``seq``) of the hooks it waits for."""


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

    def __call__(self, *args: object, **kwargs: object) -> NoReturn:
        """A workflow is not called: its runs are started (and its body replayed) by hosts."""
        raise TypeError(
            f"workflow {self.name!r} is not called directly: start a run with"
            f" start({self.fn.__name__}, [args...], actor=host.get(name))"
        )


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
    Each failed attempt is a fact too, so a restart continues the attempt count, and the
    backoff before the next attempt is a durable wait (as a ``sleep``). Called outside a
    workflow, or inside another step, it is a plain call.

    Raises:
        TypeError: ``fn`` is not an ``async def`` function.
    """

    def wrap(body: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        if not inspect.iscoroutinefunction(body):
            raise TypeError(f"@step needs an async def function, not {body!r}")
        step_name = name or body.__qualname__

        @functools.wraps(body)
        def call(*args: P.args, **kwargs: P.kwargs) -> Awaitable[R]:
            run = _current.get(None)
            if run is None or _step_place.get():
                return body(*args, **kwargs)  # outside a run, or inside a step: a plain call
            # The call's place in the run is taken now, in the order of the body's calls, so
            # calls awaited together (gather, race) replay onto the same facts.
            seq = run._next(f"step {step_name!r}")
            call = functools.partial(body, *args, **kwargs)
            return _Pending(lambda: run.step(seq, step_name, retry, call))

        return call

    return wrap if fn is None else wrap(fn)


def sleep(duration: str | float | timedelta) -> Awaitable[None]:
    """Sleep durably inside a workflow: survives restarts, fires once, holds no task.

    ``duration`` is seconds, a ``timedelta``, or a string such as ``"30s"``, ``"5min"``,
    ``"2h"``, ``"1d"``, ``"250ms"``. Cancelling a sleeping run resumes it: the sleep raises
    ``RunCancelledError`` (so ``finally`` blocks run) and the run ends cancelled.

    Raises:
        RuntimeError: called outside a workflow body, or inside a step (steps are plain code:
            use ``anyio.sleep`` there).
        ValueError: the duration is negative, longer than a century, or not understood.
    """
    run = _body_run("workflows.sleep()", "use anyio.sleep elsewhere")
    ms = parse_duration(duration)
    if ms > MAX_SLEEP_MS:
        raise ValueError(f"a workflow sleep lasts at most a century, not {duration!r}")
    seq = run._next("sleep")
    return _Pending(lambda: run.sleep(seq, ms))


_UNITS_MS = {"ms": 1, "s": 1000, "sec": 1000, "m": 60_000, "min": 60_000, "h": 3_600_000,
             "d": 86_400_000}  # fmt: skip
_DURATION = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?)\s*(ms|s|sec|m|min|h|d)\s*$")


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


# -- streams --------------------------------------------------------------------------------------


def get_writable() -> StreamWriter:
    """The run's output stream, from inside a step or a workflow body: ``await
    get_writable().write(chunk)`` appends any JSON value. Readers (``run.get_readable()``)
    replay it from the start and follow it until the run ends.

    A write from the body takes a place in the run, like a step, and is written once: a
    replay skips the writes it already made (a crash between a write and its record may
    repeat that one chunk). A step's chunks are transport: a step that runs again after a
    crash writes its chunks again.

    Raises:
        RuntimeError: called outside a workflow run.
    """
    run = _current.get(None)
    if run is None:
        raise RuntimeError("get_writable() is for workflow bodies and their steps")
    return _BodyStream(run)


class _BodyStream(StreamWriter):
    """The run's stream as the body writes it: each write is recorded at its place."""

    __slots__ = ("_run",)

    def __init__(self, run: _Run) -> None:
        ctx = run.ctx
        super().__init__(ctx._backend, ctx.actor_id, ctx.intent_event_id, ctx._claim_token)
        self._run = run

    async def write(self, chunk: JSON) -> int:
        """Append one chunk once (see ``get_writable``); returns its index."""
        if _step_place.get():  # a step that was handed the body's writer: a plain write
            return await super().write(chunk)
        return await self._run.write(self._run._next("stream write"), chunk)


# -- awaiting several calls at once -------------------------------------------------------------


class _Pending(Generic[R]):
    """A step call or sleep whose place in the run is already taken; runs when awaited.

    It holds how to run it, not a started coroutine, so it may be awaited again (a replay
    answers from the facts) and one never awaited (a race's loser on replay) leaves nothing.
    """

    __slots__ = ("_start", "calls")

    def __init__(
        self, start: Callable[[], Awaitable[R]], calls: Sequence[Awaitable[Any]] = ()
    ) -> None:
        self._start = start
        self.calls = calls
        """The calls a gather or race awaits (to find the hooks of a losing branch)."""

    def __await__(self) -> Generator[Any, None, R]:
        _refuse_in_step()
        return self._start().__await__()


class _Group:
    """Calls awaited together, and which of them are still at work (not waiting for a sleep,
    a hook or a retry backoff).

    A call that waits does so in the attempt while another call of the group is still at
    work (that attempt runs anyway); once none is, the run itself waits, holding nothing. A
    cancel of the run ends the waits: the call is awaited again, and raises the cancel at its
    own place.
    """

    def __init__(self, run: _Run, size: int) -> None:
        self.run = run
        self.working = set(range(size))
        self._changed = anyio.Event()

    def _set(self, index: int, working: bool) -> None:
        before = len(self.working)
        if working:
            self.working.add(index)
        else:
            self.working.discard(index)
        if len(self.working) != before:
            changed, self._changed = self._changed, anyio.Event()
            changed.set()

    def done(self, index: int) -> None:
        """Call ``index`` has ended (its result or error is known, or it gave up waiting)."""
        self._set(index, False)

    async def await_patiently(self, index: int, call: Awaitable[Any]) -> Any:
        """Await ``call``; what it waits for is waited for here while another call works.

        Raises:
            _Suspend: the call waits for something this attempt will not wait for.
            RunCancelledError: the run was cancelled (the call raised it).
        """
        while True:
            try:
                return await call
            except _Suspend as suspend:
                self._set(index, False)
                ready = await (
                    self._wait_for_hooks(suspend.hooks, suspend.until_ms)
                    if suspend.hooks
                    else self._wait_until(suspend.until_ms)
                )
                if not ready:
                    raise
                self._set(index, True)

    async def _wait_until(self, until_ms: int) -> bool:
        backend = self.run.ctx._backend
        while self.working:
            if self.run.ctx.signal.aborted:
                return True
            delay = (until_ms - backend.now_ms()) / 1000
            if delay <= 0:
                return True
            await self._wait_change(None, self._changed, delay)
        return False

    async def _wait_for_hooks(self, places: tuple[int, ...], until_ms: int) -> bool:
        """Wait for a payload to one of the hooks at ``places``, or (a suspension that
        merged hooks with a sleep, as a nested race's) for ``until_ms``."""
        ctx = self.run.ctx
        backend = ctx._backend
        while self.working:
            if ctx.signal.aborted:
                return True
            left = (until_ms - backend.now_ms()) / 1000
            if left <= 0:
                return True
            version = backend.version(ctx.actor_id)
            facts = await ctx.events(intent_event_id=ctx.intent_event_id, kinds=_RECEIPT_KINDS)
            if _delivered(facts, places):
                return True
            await self._wait_change(version, self._changed, min(_HOOK_POLL_S, left))
        return False

    async def _wait_change(self, version: int | None, changed: anyio.Event, seconds: float) -> None:
        """Return when the actor's ledger (if ``version`` is given) or this group changes, the
        run is cancelled, or ``seconds`` pass."""
        ctx = self.run.ctx
        with anyio.move_on_after(seconds):
            async with anyio.create_task_group() as tg:

                async def until(wait: Callable[[], Awaitable[object]]) -> None:
                    await wait()
                    tg.cancel_scope.cancel()

                if version is not None:
                    tg.start_soon(until, functools.partial(
                        ctx._backend.wait_changed, ctx.actor_id, version))  # fmt: skip
                tg.start_soon(until, changed.wait)
                tg.start_soon(until, ctx.signal.wait)


def gather(*calls: Awaitable[Any]) -> Awaitable[list[Any]]:
    """Await step calls, sleeps, hooks, races and gathers together (like ``Promise.all``);
    results in order.

    Pass the calls themselves (``gather(fetch(a), fetch(b), sleep("1s"))``): their places in
    the run are taken when they are made, so a replay matches them to the same facts. The
    first error (after all calls have ended) is raised. A sleep is waited for in the attempt
    while other calls still work; once all that is left waits for sleeps or hooks, the run
    waits, holding nothing, with the finished calls recorded. A cancel of the run lets the
    steps already running finish, then raises ``RunCancelledError``.

    Raises:
        RuntimeError: called outside a workflow body, or inside a step.
        TypeError: a call is not a step call, sleep, hook, race or gather.
    """
    run = _body_run("gather()", "use an anyio task group elsewhere")
    _check_calls("gather", calls)
    return _Pending(lambda: _gather(run, calls), calls)


async def _gather(run: _Run, calls: Sequence[Awaitable[Any]]) -> list[Any]:
    run._check_unwinding()
    group = _Group(run, len(calls))
    results: list[Any] = [None] * len(calls)
    errors: list[Exception | None] = [None] * len(calls)
    suspends: list[_Suspend] = []

    async def one(index: int, call: Awaitable[Any]) -> None:
        _in_group.set(True)
        try:
            results[index] = await group.await_patiently(index, call)
        except _Suspend as suspend:
            suspends.append(suspend)
        except Exception as exc:
            errors[index] = exc
        group.done(index)

    async with anyio.create_task_group() as tg:
        for index, call in enumerate(calls):
            tg.start_soon(one, index, call)
    # The first error in the order of the calls (so a replay raises the same one), a cancel
    # before all: the body must see it, not an error it might catch and carry on after.
    raised = [error for error in errors if error is not None]
    raised.sort(key=lambda error: not isinstance(error, RunCancelledError))
    if raised:
        raise raised[0]
    if suspends:
        raise run._suspend(_merge(suspends))
    return results


def race(*calls: Awaitable[Any]) -> Awaitable[Any]:
    """Await step calls, sleeps, hooks, gathers and races together; the first to end wins
    (like ``Promise.race``): its result is returned (or its error raised), the others are
    stopped.

    The winner is recorded, so a replay returns the same winner without running the losers
    (a losing sleep or hook is disposed of, not left pending). Pass the calls themselves, as
    for ``gather``; ``race(gather(a(), b()), sleep("1h"))`` is "all of these, or time out".
    A hook resumed while another call still works is seen at once (the attempt watches the
    run's ledger while it waits), so it may win against a step still running. A cancel of
    the run is no winner: the steps already running finish, then ``RunCancelledError`` is
    raised.

    Raises:
        RuntimeError: called outside a workflow body, or inside a step.
        TypeError: a call is not a step call, sleep, hook, race or gather.
        ValueError: no calls (a race of nothing would never end).
    """
    run = _body_run("race()", "use an anyio task group elsewhere")
    if not calls:
        raise ValueError("race() needs at least one call")
    _check_calls("race", calls)
    seq = run._next("race")
    return _Pending(lambda: _race(run, seq, calls), calls)


async def _race(run: _Run, seq: int, calls: Sequence[Awaitable[Any]]) -> Any:
    run._replay_cancel(seq)
    if seq in run.races:
        await _dispose_losers(run, calls, run.races[seq])  # if a crash came before
        return await calls[run.races[seq]]
    group = _Group(run, len(calls))
    outcome: list[tuple[int, Any, Exception | None]] = []
    suspends: list[_Suspend] = []
    cancelled: list[RunCancelledError] = []

    async with anyio.create_task_group() as tg:

        async def one(index: int, call: Awaitable[Any]) -> None:
            _in_group.set(True)
            try:
                value = await group.await_patiently(index, call)
            except _Suspend as suspend:
                suspends.append(suspend)
                group.done(index)
                return
            except RunCancelledError as exc:
                # The run's cancel wins nothing and stops no step: the running ones finish.
                cancelled.append(exc)
                group.done(index)
                return
            except Exception as exc:
                outcome.append((index, None, exc))
            else:
                outcome.append((index, value, None))
            if not cancelled:
                tg.cancel_scope.cancel()

        for index, call in enumerate(calls):
            tg.start_soon(one, index, call)
    if cancelled:
        if run.cancelled_at is not None:
            # The members raced: a replay raises the cancel at the race itself.
            await run._record_cancel(seq)
        raise cancelled[0]
    if not outcome:
        raise run._suspend(_merge(suspends))
    index, value, error = outcome[0]
    await run.ctx._record(RACE_WON, {"seq": seq, "index": index})
    run.races[seq] = index
    await _dispose_losers(run, calls, index)
    if error is not None:
        raise error
    return value


async def _dispose_losers(run: _Run, calls: Sequence[Awaitable[Any]], winner: int) -> None:
    """Free the tokens of the hooks that lost the race, those nested in losing gathers and
    races included."""
    for index, call in enumerate(calls):
        if index == winner:
            continue
        for hook in _hooks_in(call):
            created = run.hooks_created.get(hook._seq)
            if created is not None:
                await run.dispose_hook(*created)


def _hooks_in(call: Awaitable[Any]) -> Iterator[Hook[Any]]:
    if isinstance(call, Hook):
        yield call
    elif isinstance(call, _Pending):
        for nested in call.calls:
            yield from _hooks_in(nested)


E = TypeVar("E", bound=BaseException)


def _leaves(group: BaseExceptionGroup[E]) -> list[E]:
    found: list[E] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found += _leaves(exc)
        else:
            found.append(exc)
    return found


def _reason_of(reason: object) -> object:
    return reason.reason if isinstance(reason, AbortError) else reason


def _check_calls(what: str, calls: Sequence[Awaitable[Any]]) -> None:
    for call in calls:
        if not isinstance(call, _Pending | Hook):
            if inspect.iscoroutine(call):
                call.close()
            raise TypeError(
                f"{what}() takes step calls, sleeps, hooks, races and gathers, not {call!r}: "
                "make the function a @step, or await its calls one after another"
            )


class StepMisuseError(FatalError, RuntimeError):
    """A body's call (a step call, ``sleep``, a hook, ``gather``, ``race``) awaited inside a
    step: a mistake in the code, so the step fails at once (``FatalError``) rather than being
    retried. A ``RuntimeError`` too."""


def _refuse_in_step() -> None:
    """A call made in the body is awaited in the body: inside a step it would suspend the
    run, or record, in the middle of the step.

    Raises:
        RuntimeError: awaited inside a step.
    """
    if _step_place.get():
        raise StepMisuseError(
            "a step call, sleep, hook, gather or race made in a workflow body must be awaited "
            "in the body, not inside a step (a step is plain code: use anyio there)"
        )


def _body_run(what: str, instead: str) -> _Run:
    """The run whose body is calling ``what``.

    Raises:
        RuntimeError: outside a workflow run, or inside a step (``instead`` says what to do
            there).
    """
    run = _current.get(None)
    if run is None:
        raise RuntimeError(f"{what} is for workflow bodies: {instead}")
    if _step_place.get():
        raise StepMisuseError(f"{what} is for workflow bodies, not steps (a step is plain"
                                 f" code): {instead}")  # fmt: skip
    return run


def _merge(suspends: list[_Suspend]) -> _Suspend:
    until = min(s.until_ms for s in suspends)
    hooks = tuple(hook_id for s in suspends for hook_id in s.hooks)
    return _Suspend(until, hooks)


# -- a durable abort controller --------------------------------------------------------------


class AbortController:
    """An abort controller made inside a workflow body, whose abort is a fact of the run.

    Pass ``controller.signal`` to steps (they run in the run's attempt); ``await
    controller.abort(reason)`` from the body, from a step (a watchdog or a quota monitor), or
    after a hook fires. The steps' signals abort at once; the abort is recorded, so a replay
    makes the controller already aborted, with the same reason.
    """

    __slots__ = ("_run", "_seq", "_signal")

    def __init__(self) -> None:
        """Create the controller (inside a workflow body only: it takes a place in the run).

        Raises:
            RuntimeError: called outside a workflow body, or inside a step (use
                ``triggers.AbortController`` there).
        """
        run = _body_run(
            "workflows.AbortController()",
            "use triggers.AbortController elsewhere (a step-local controller), or pass the "
            "step the body's controller",
        )
        self._run = run
        self._seq = run._next("AbortController")
        self._signal = AbortSignal()
        run.controllers[self._seq] = self

    @property
    def signal(self) -> AbortSignal:
        """The controlled signal."""
        return self._signal

    async def abort(self, reason: str | None = None) -> None:
        """Abort, durably; a second abort changes nothing (the first reason stays).

        Raises:
            TypeError: ``reason`` is not a str or None.
        """
        if reason is not None and not isinstance(reason, str):
            raise TypeError("reason must be a str or None")
        run = self._run
        run._check_unwinding()
        recorded = run.aborts.get(self._seq)
        if recorded is not None:  # replaying the abort this body made before
            self._signal._abort(recorded[0])
            return
        if self._signal.aborted:
            return
        self._signal._abort(reason)  # steps stop now; the fact follows
        # A replay applies the abort once the aborting step (or the body's last call) is
        # answered, so the body sees it at the same point as the first time.
        at = _step_place.get() or run.seq
        await run.ctx._record(CONTROLLER_ABORTED, {"seq": self._seq, "reason": reason, "at": at})
        run.aborts[self._seq] = (reason, at)


# -- hooks ----------------------------------------------------------------------------------------

T = TypeVar("T")


class Hook(Generic[T]):
    """A hook of a running workflow: ``await hook`` waits, durably, for its payload.

    Create it in a workflow body with ``create_hook(token=...)`` (or a typed hook's
    ``.create``). A hook takes one payload: awaiting it again answers the same payload, and a
    second ``resume_hook`` raises ``HookAlreadyResumedError`` (make a new hook for the next
    one). Use it as ``async with create_hook(token=t) as hook:`` to dispose of it (release its
    token) when the block ends; a hook is disposed anyway when its run ends. While the run
    waits for a hook it holds no task: it wakes when ``resume_hook`` is called.
    """

    __slots__ = ("_hook_id", "_model", "_parse", "_run", "_seq", "_token", "_wanted")

    def __init__(
        self, token: str | None, parse: Callable[[JSON], T], model: str | None = None
    ) -> None:
        run = _body_run("create_hook()", "create hooks in the body; resume one by its token")
        if token is not None:
            _check_token(token)
        self._run = run
        self._seq = run._next("hook")
        self._wanted = token
        self._token: str | None = None
        self._hook_id = 0
        self._parse = parse
        self._model = model

    @property
    def token(self) -> str | None:
        """The hook's token, once created (``None`` before its first use)."""
        return self._token

    async def _ensure(self) -> int:
        if self._token is None:
            self._token, self._hook_id = await self._run.create_hook(
                self._seq, self._wanted, self._model
            )
        return self._hook_id

    async def _wait(self) -> T:
        await self._ensure()
        return await self._run.wait_hook(self._seq, self._parse)

    def __await__(self) -> Generator[Any, None, T]:
        _refuse_in_step()
        return self._wait().__await__()

    async def __aenter__(self) -> Hook[T]:
        _refuse_in_step()
        await self._ensure()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, _: object
    ) -> None:
        if self._token is None or _keeps_hooks(exc, self._run.ctx.signal):
            return  # waiting, cancelled or storage trouble: the hook lives on (or dies with it)
        await self._run.dispose_hook(self._token, self._hook_id)


_STORAGE_TROUBLE = (LedgerWriteError, LedgerBusyError, LedgerClosedError)
"""Ledger errors a later attempt may get past (the body runs again); the others (a payload
the ledger cannot hold, an unknown intent or actor, a damaged file) are the body's failure."""


def _interrupts(exc: BaseException, signal: AbortSignal) -> bool:
    """True if ``exc`` ends the attempt without being the body's failure: the run waiting,
    its claim lost, storage trouble, or an abort while the run's own signal is aborted (its
    cancel, its host stopping). An abort of the body's own making (its own timeout, a
    cancelled child run) is the body's failure, like any other error it raises."""
    if isinstance(exc, (_Suspend, ClaimLostError, *_STORAGE_TROUBLE)):
        return True
    return isinstance(exc, AbortError) and signal.aborted


def _keeps_hooks(exc: BaseException | None, signal: AbortSignal) -> bool:
    """True if ``exc`` leaving a hook's block is the run waiting, cancelled or in storage
    trouble, alone or grouped by the body's own task group: not the end of the hook."""
    if exc is None:
        return False
    if isinstance(exc, BaseExceptionGroup):
        return all(_interrupts(leaf, signal) for leaf in _leaves(exc))
    return _interrupts(exc, signal)


def _check_token(token: object) -> None:
    """Refuse what cannot be a hook token (it is stored, and compared, as text).

    Raises:
        TypeError: ``token`` is not a str.
        ValueError: it is empty, holds a NUL character or a lone surrogate, or is longer than
            ``MAX_TOKEN_BYTES`` in UTF-8.
    """
    if not isinstance(token, str):
        raise TypeError(f"a hook token is a str, not {token!r}")
    try:
        size = len(token.encode())
    except UnicodeEncodeError:
        raise ValueError("a hook token must be valid text (it holds a lone surrogate)") from None
    if not 0 < size <= MAX_TOKEN_BYTES or "\x00" in token:
        raise ValueError(
            f"a hook token is 1 to {MAX_TOKEN_BYTES} UTF-8 bytes without NUL characters, "
            f"not {token[:40]!r}" + ("..." if len(token) > 40 else "")
        )


def _is_token(token: object) -> bool:
    try:
        _check_token(token)
    except (TypeError, ValueError):
        return False
    return True


def create_hook(*, token: str | None = None) -> Hook[JSON]:
    """A hook whose resume payload is any JSON value (see ``Hook``).

    Raises:
        RuntimeError: called outside a workflow body, or inside a step.
        TypeError: ``token`` is not a str (or None, for a token made from the run and place).
        ValueError: ``token`` is empty, holds a NUL character, or is longer than 1 KB.
        HookConflictError: (when first used) another active hook holds ``token``. The
            conflict is recorded: a replay raises it again at the same place.
    """
    return Hook(token, _identity)


def _identity(payload: JSON) -> JSON:
    return payload


M = TypeVar("M", bound=BaseModel)

_hook_models: dict[str, type[BaseModel] | None] = {}
"""The payload models of the typed hooks defined in this process, by ``_model_name`` (None
when two models share a name: their payloads are then validated by the body only)."""


def _model_name(model: type[BaseModel]) -> str:
    return f"{model.__module__}.{model.__qualname__}"


@dataclass(frozen=True)
class TypedHook(Generic[M]):
    """A hook definition with a pydantic payload model, from ``define_hook(Model)``.

    Its hooks record the model's name (module and qualified name). ``resume_hook`` validates
    a payload for them when the model is known in its process (this definition ran there): a
    bad payload raises ``ValidationError`` and nothing is written. Otherwise the body
    validates it, and a payload that fails is set aside (a ``hook_rejected`` fact says why):
    the hook waits on for another, and the run does not fail.

    Raises:
        TypeError: ``model`` is not a pydantic ``BaseModel`` subclass.
    """

    model: type[M]

    def __post_init__(self) -> None:
        model: object = self.model
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise TypeError(f"define_hook() takes a pydantic BaseModel subclass, not {model!r}")
        name = _model_name(model)
        if _hook_models.setdefault(name, model) is not model:
            _hook_models[name] = None  # two models, one name: resume_hook cannot tell which

    def create(self, *, token: str | None = None) -> Hook[M]:
        """A hook (inside a workflow) whose awaited payload is a ``model`` instance.

        Raises:
            RuntimeError, TypeError, ValueError, HookConflictError: as ``create_hook``.
        """
        return Hook(token, self.model.model_validate, _model_name(self.model))

    async def resume(self, token: str, payload: M | Mapping[str, Any], *, actor: Any) -> int:
        """Validate ``payload`` against the model, then ``resume_hook`` with it as JSON, by
        alias (as the hook's body validates it); returns the run id.

        Raises:
            pydantic.ValidationError: the payload does not fit the model (nothing written).
            HookNotFoundError: no active hook holds ``token``.
            HookAlreadyResumedError: the hook already received its payload.
        """
        value = self.model.model_validate(payload)
        data = value.model_dump(mode="json", by_alias=True)
        return await resume_hook(token, data, actor=actor)


def define_hook(model: type[M]) -> TypedHook[M]:
    """A typed hook: ``.create(token=)`` in a workflow, ``.resume(token, payload, actor=)``
    from anywhere (see ``TypedHook``).

    Raises:
        TypeError: ``model`` is not a pydantic ``BaseModel`` subclass.
    """
    return TypedHook(model)


# The actor's active hooks, by token: one row each, so that finding a hook by its token
# reads one row whatever the actor's history. The rows are named values of the ledger
# (``tx.value``), named _HOOK_ROW + token, written in the transaction that records the
# hook's fact. Created with the hook (``run``; ``seq``, its place; ``model``, its payload
# model's name); marked ``received`` by resume_hook (unmarked when the body sets a payload
# aside); dropped when the hook is disposed of or its run ends. A row whose run has ended
# is not active.
_HOOK_ROW = "trigger.workflow.hook:"


def _hook_row(tx: LedgerTx, token: str) -> dict[str, Any] | None:
    found = tx.value(_HOOK_ROW + token)
    return dict(found) if isinstance(found, dict) else None


def _put_hook_row(tx: LedgerTx, token: str, row: dict[str, Any]) -> None:
    tx.set_value(_HOOK_ROW + token, row)


def _drop_hook_row(tx: LedgerTx, token: str, run_id: int) -> None:
    """Drop the row of ``token`` if ``run_id`` holds it (a run holds a token once at most)."""
    row = _hook_row(tx, token)
    if row is not None and row["run"] == run_id:
        tx.set_value(_HOOK_ROW + token, None)


def active_hook_row(tx: LedgerTx, token: str) -> dict[str, Any] | None:
    """The row of the active hook holding ``token`` in this actor, or None.

    A hook is active from its creation until its disposal or the end of its run.
    """
    row = _hook_row(tx, token)
    if row is None:
        return None
    intent = tx.intent_row(int(row["run"]))
    if intent is None or intent.status not in ("pending", "running"):
        return None
    return row


def _release_run_hooks(tx: LedgerTx, run_id: int) -> None:
    """Drop the rows of the hooks ``run_id`` still holds (it ends): its own facts say which."""
    for event in tx.events(intent_event_id=run_id, kinds=[HOOK_CREATED]):
        if isinstance(event.payload, dict):
            _drop_hook_row(tx, str(event.payload["token"]), run_id)


def check_actor(actor: object) -> None:
    """Refuse what is not an actor's handle (a name given where ``host.get(name)`` belongs).

    Raises:
        TypeError: ``actor`` is not an ``actors.Agent`` (or alike).
    """
    if not (hasattr(actor, "_ledger_op") and hasattr(actor, "actor_id")):
        hint = f" (host.get({actor!r}))" if isinstance(actor, str) else ""
        raise TypeError(f"actor must be an actor's handle{hint}, not {type(actor).__name__}")


async def resume_hook(token: str, payload: JSON = None, *, actor: Any) -> int:
    """Deliver ``payload`` to the active hook holding ``token`` in ``actor``; returns its run.

    The payload is recorded in the run's ledger at once, and a run waiting for it is woken. A
    hook takes one payload. A typed hook's payload is validated against its model when the
    model is known in this process (see ``TypedHook``).

    Raises:
        HookNotFoundError: no active hook holds ``token`` (unknown, disposed, run ended, or
            not a token at all).
        HookAlreadyResumedError: the hook already received its payload.
        pydantic.ValidationError: the payload does not fit the typed hook's model; nothing
            was written.
        ledger.PayloadError: the payload is not JSON.
    """
    check_actor(actor)
    dump_json(payload, what="hook payload")  # refuse it before touching the ledger
    if not _is_token(token):
        raise HookNotFoundError(token)

    def op(tx: LedgerTx) -> int | None:
        row = active_hook_row(tx, token)
        if row is None:
            return None
        run_id = int(row["run"])
        if row["received"]:
            raise HookAlreadyResumedError(token, run_id)
        model = _hook_models.get(row["model"]) if row["model"] is not None else None
        if model is not None:
            model.model_validate(payload)  # raising here writes nothing
        fact = {"token": token, "seq": row["seq"], "payload": payload}
        tx.insert_event(HOOK_RECEIVED, fact, run_id)
        _put_hook_row(tx, token, {**row, "received": True})
        tx.wake(run_id, tx.now_ms)
        return run_id

    run_id = await actor._ledger_op(op)
    if run_id is None:
        raise HookNotFoundError(token)
    return int(run_id)


@dataclass(frozen=True)
class HookInfo:
    """An active hook: its token and the run waiting on it."""

    token: str
    run_id: int


async def get_hook_by_token(token: str, *, actor: Any) -> HookInfo:
    """The active hook holding ``token`` in ``actor``.

    Raises:
        HookNotFoundError: no active hook holds it (or it is not a token at all).
    """
    check_actor(actor)
    if not _is_token(token):
        raise HookNotFoundError(token)
    row = await actor._ledger_op(lambda tx: active_hook_row(tx, token), write=False)
    if row is None:
        raise HookNotFoundError(token)
    return HookInfo(token=token, run_id=int(row["run"]))


_RECEIPT_KINDS = (HOOK_RECEIVED, HOOK_REJECTED)


def _delivered(facts: Sequence[Event], places: Iterable[int]) -> bool:
    """True if ``facts`` (a run's receipts and rejections) hold a payload for a hook made at
    one of ``places`` that the body has not set aside."""
    wanted = set(places)
    received = {e.id for e in facts if e.kind == HOOK_RECEIVED and _fact(e).get("seq") in wanted}
    rejected = {_fact(e).get("receipt") for e in facts if e.kind == HOOK_REJECTED}
    return bool(received - rejected)


def _fact(event: Event) -> dict[str, Any]:
    return event.payload if isinstance(event.payload, dict) else {}


# -- running a body ------------------------------------------------------------------------------


_rng = random.Random()
_in_group: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "durable_triggers_in_group", default=False
)
_step_place: contextvars.ContextVar[int] = contextvars.ContextVar(
    "durable_triggers_step_place", default=0
)
"""The place of the step running in this context, 0 outside steps (places start at 1)."""
_current: contextvars.ContextVar[_Run] = contextvars.ContextVar("durable_triggers_workflow_run")


@dataclass
class _Run:
    """One attempt's view of a run: the recorded facts and the next call's place."""

    ctx: TriggerContext
    places: dict[int, str] = field(default_factory=dict)
    """What kind of call each recorded place is (``"step 'fetch'"``, ``"sleep"``, ...)."""
    completed: dict[int, JSON] = field(default_factory=dict)
    failed: dict[int, dict[str, Any]] = field(default_factory=dict)
    attempts: dict[int, tuple[int, int]] = field(default_factory=dict)
    """A retrying step's failed attempts so far, and when the next may start (epoch ms)."""
    waits: dict[int, int] = field(default_factory=dict)
    woke: set[int] = field(default_factory=set)
    hooks_created: dict[int, tuple[str, int]] = field(default_factory=dict)
    conflicts: dict[int, tuple[str, int]] = field(default_factory=dict)
    received: dict[int, list[tuple[int, JSON]]] = field(default_factory=dict)
    """The payloads received by the hook made at each place: (receipt fact id, payload)."""
    rejected: set[int] = field(default_factory=set)
    """The receipts whose payload the body set aside (``hook_rejected``)."""
    disposed: set[int] = field(default_factory=set)
    races: dict[int, int] = field(default_factory=dict)
    aborts: dict[int, tuple[str | None, int]] = field(default_factory=dict)
    controllers: dict[int, AbortController] = field(default_factory=dict)
    written: dict[int, int] = field(default_factory=dict)
    unwinding: _Suspend | None = None
    """Set once the body unwinds to wait (a sleep or hook): calls made meanwhile, from
    ``finally`` blocks, do not run; they rejoin the wait."""
    cancels: set[int] = field(default_factory=set)
    """The places where the run's cancel reached the body: a replay raises it there again."""
    cancelled_at: int | None = None
    """The last place taken when the run's cancel reached the body: calls made after it
    (cleanup in ``finally`` blocks) still run, waits do not."""
    diverged: ReplayDivergenceError | None = None
    seq: int = 0

    def _next(self, call: str) -> int:
        """Take the next place, for ``call``; it must be what the run recorded there.

        Raises:
            ReplayDivergenceError: the run recorded another kind of call there.
        """
        self._replay_aborts(self.seq)
        self.seq += 1
        recorded = self.places.get(self.seq)
        if recorded is not None and recorded != call:
            self.diverged = ReplayDivergenceError(self.seq, recorded, call)
            raise self.diverged
        return self.seq

    def _replay_aborts(self, upto: int) -> None:
        """Fire the recorded aborts made at or before the call numbered ``upto`` (once that
        call is done, on replay, the body must see the abort it saw the first time)."""
        for seq, (reason, at) in self.aborts.items():
            controller = self.controllers.get(seq)
            if controller is not None and at <= upto:
                controller.signal._abort(reason)

    def _suspend(self, suspend: _Suspend) -> _Suspend:
        """Note that the body starts waiting (unless a group catches it); returns it to raise."""
        if not _in_group.get():
            self.unwinding = suspend
        return suspend

    def _check_unwinding(self) -> None:
        if self.unwinding is not None:
            raise self.unwinding

    def _replay_cancel(self, place: int) -> None:
        """Raise ``RunCancelledError`` if the run's cancel reached the body at ``place`` in
        an earlier attempt: a replay takes the path the body took, whatever the ledger now
        holds for the call there."""
        self._check_unwinding()
        if place in self.cancels:
            if self.cancelled_at is None:
                self.cancelled_at = self.seq
            raise RunCancelledError(_reason_of(self.ctx.signal.reason))

    async def _check_cancel(self, place: int, *, wait: bool = False) -> None:
        """Raise ``RunCancelledError`` if the run's signal has aborted.

        A cancel reaches the body once, at the first call checked after it (a step that was
        running finishes, then raises it), and that place is recorded. A call made after
        that (its ``place`` is past the cancel's: cleanup in a ``finally`` block) runs, unless
        it is a wait (``wait``); a call made before it raises the cancel. A signal aborted
        with no cancel requested (the host is stopping) stops every call: nothing new is
        recorded.
        """
        self._replay_cancel(place)
        signal = self.ctx.signal
        if not signal.aborted:
            return
        if self.cancelled_at is None:
            if await self._cancel_requested():
                self.cancelled_at = self.seq
                await self._record_cancel(place)
        elif not wait and place > self.cancelled_at:
            return
        raise RunCancelledError(_reason_of(signal.reason))

    async def _record_cancel(self, place: int) -> None:
        """Record that the run's cancel reached the body at ``place``."""
        if place not in self.cancels:
            await self.ctx._record(CANCEL_DELIVERED, {"seq": place})
            self.cancels.add(place)

    async def _cancel_requested(self) -> bool:
        ctx = self.ctx
        kinds = [CANCEL_REQUESTED]
        return bool(await ctx.events(intent_event_id=ctx.intent_event_id, kinds=kinds, limit=1))

    def began(self) -> bool:
        """True if the body has run before: a fact of it is recorded, or an earlier attempt
        was made (one lost before its first fact had begun too)."""
        return bool(self.places or self.cancels or self.ctx.attempt > 1 or self.ctx.redrive)

    async def execute(self, fn: Callable[..., Awaitable[JSON]], args: Sequence[JSON]) -> JSON:
        """Run the body (replaying what is recorded) in this attempt; returns its result.

        Raises:
            _Suspend: the body waits (a sleep, a hook, a retry backoff).
            RunCancelledError: the run was cancelled (or its host is stopping).
            _BodyFailedError: the body failed, or its replay diverged.
        """
        token = _current.set(self)
        try:
            if not self.began() and self.ctx.signal.aborted:
                # Cancelled before it began: the body never runs. (An attempt lost before the
                # first fact was recorded had begun: its replay raises at its first call.)
                raise RunCancelledError(_reason_of(self.ctx.signal.reason))
            result = await fn(*args)
        except BaseExceptionGroup as group:
            # The body's own task group carried out a suspension, a cancel or a body error.
            suspended, rest = group.split(_Suspend)
            if suspended is not None and rest is None:
                self._check_diverged()
                raise _merge(_leaves(suspended)) from None
            signal = self.ctx.signal
            errors = [exc for exc in _leaves(group) if not _interrupts(exc, signal)]
            if not errors or not all(is_failure(exc) for exc in errors):
                raise  # cancelled or storage trouble (or anyio's cancellation): not a failure
            self._check_diverged()  # else the body failed, as if it had raised errors[0]
            raise _BodyFailedError(errors[0]) from group
        except _Suspend:
            self._check_diverged()
            raise
        except BaseException as exc:
            if not is_failure(exc) or _interrupts(exc, self.ctx.signal):
                raise  # cancelled or storage trouble: not the body's failure
            # The body failed: a run failure, not something to retry by running it again.
            self._check_diverged()
            raise _BodyFailedError(exc) from exc
        finally:
            _current.reset(token)
        self._check_diverged()
        return result

    def _check_diverged(self) -> None:
        """A divergence fails the run even if the body caught it."""
        if self.diverged is not None:
            error = self.diverged
            raise _BodyFailedError(error) from error

    async def step(
        self, seq: int, name: str, retry: RetryPolicy, call: Callable[[], Awaitable[R]]
    ) -> R:
        self._replay_cancel(seq)
        if seq in self.completed:
            recorded: R = self.completed[seq]
            self._replay_aborts(seq)
            return recorded
        if seq in self.failed:
            self._replay_aborts(seq)
            fact = self.failed[seq]
            raise StepFailedError(name, fact["error_type"], fact["message"], fact["attempts"])
        while True:
            await self._check_cancel(seq)
            failures, retry_at = self.attempts.get(seq, (0, 0))
            backoff_ms = retry_at - self.ctx._backend.now_ms()
            if backoff_ms > 0:
                if self.cancelled_at is None:
                    raise self._suspend(_Suspend(retry_at))  # a durable wait, as a sleep
                await anyio.sleep(backoff_ms / 1000)  # a cleanup step, once cancelled
            attempt = failures + 1
            token = _step_place.set(seq)
            try:
                result = await call()
                # A result the ledger cannot hold fails the step: running it again (its side
                # effects too) would not help, nor is it the storage trouble a retry is for.
                dump_json(result, what=f"the result of step {name!r}")
            except BaseException as exc:
                if not is_failure(exc):
                    raise
                fact = {"seq": seq, "step": name, "error_type": type(exc).__name__,
                        "message": str(exc), "attempts": attempt}  # fmt: skip
                final = isinstance(exc, FatalError | AbortError | PayloadError)
                if final or attempt >= retry.max_attempts:
                    await self.ctx._record(STEP_FAILED, fact)
                    self.failed[seq] = fact
                    raise StepFailedError(name, type(exc).__name__, str(exc), attempt) from exc
                # Each failed attempt is a fact: a restart continues the count and the backoff.
                retry_at = self.ctx._backend.now_ms() + round(retry.backoff(attempt, _rng) * 1000)
                await self.ctx._record(STEP_ATTEMPT_FAILED, {**fact, "retry_at": retry_at})
                self.attempts[seq] = (attempt, retry_at)
                continue
            finally:
                _step_place.reset(token)
            await self.ctx._record(STEP_COMPLETED, {"seq": seq, "step": name, "result": result})
            self.completed[seq] = result
            # A cancel that came while the step ran reaches the body here, once it is recorded.
            await self._check_cancel(seq)
            return result

    async def sleep(self, seq: int, ms: int) -> None:
        self._replay_cancel(seq)
        if seq in self.woke:
            return
        await self._check_cancel(seq, wait=True)
        until = self.waits.get(seq)
        if until is None:
            until = self.ctx._backend.now_ms() + ms
            await self.ctx._record(WAIT_CREATED, {"seq": seq, "until": until})
            self.waits[seq] = until
        if self.ctx._backend.now_ms() < until:
            raise self._suspend(_Suspend(until))
        await self.ctx._record(WAIT_COMPLETED, {"seq": seq})
        self.woke.add(seq)

    async def create_hook(self, seq: int, token: str | None, model: str | None) -> tuple[str, int]:
        """The hook made at ``seq``: its token and its id (its creation fact's event id).

        ``model`` is the name of a typed hook's payload model (recorded with the hook, for
        ``resume_hook`` to validate with).

        Raises:
            HookConflictError: another active hook held the token (now, or when recorded).
        """
        if seq in self.hooks_created:
            return self.hooks_created[seq]
        if seq in self.conflicts:
            raise HookConflictError(*self.conflicts[seq])
        await self._check_cancel(seq)
        run_id = self.ctx.intent_event_id
        chosen = token if token is not None else f"hook:{run_id}:{seq}"

        def take(tx: LedgerTx) -> None:
            holder = active_hook_row(tx, chosen)
            if holder is not None:
                raise HookConflictError(chosen, int(holder["run"]))
            row = {"run": run_id, "seq": seq, "model": model, "received": False}
            _put_hook_row(tx, chosen, row)  # in the transaction that records the hook

        fact = {"seq": seq, "token": chosen, "model": model}
        try:
            event = await self.ctx._record(HOOK_CREATED, fact, take)
        except HookConflictError as conflict:
            # Recorded, so a replay takes the path the body took, even once the holder is gone.
            fact = {"seq": seq, "token": chosen, "run_id": conflict.run_id}
            await self.ctx._record(HOOK_CONFLICT, fact)
            self.conflicts[seq] = (chosen, conflict.run_id)
            raise
        self.hooks_created[seq] = (chosen, event.id)
        return chosen, event.id

    async def wait_hook(self, seq: int, parse: Callable[[JSON], R]) -> R:
        """The payload of the hook made at ``seq``, as ``parse`` reads it; the run waits for
        it if none has come.

        A payload that ``parse`` refuses (``ValidationError``: a typed hook's model, unknown
        where it was resumed) is set aside, not delivered: the ``hook_rejected`` fact says
        why, the hook takes a payload again, and the body waits on. A replay skips the
        payloads set aside before.

        Raises:
            _Suspend: no payload (that ``parse`` accepts) has come.
            RunCancelledError: the run was cancelled.
        """
        self._replay_cancel(seq)
        for fresh in (False, True):
            if fresh:
                await self._check_cancel(seq, wait=True)
                await self._read_receipts(seq)  # since this attempt read the run's facts
            for receipt, payload in self.received.get(seq, []):
                if receipt in self.rejected:
                    continue
                try:
                    return parse(payload)
                except ValidationError as exc:
                    await self._reject(seq, receipt, exc)
        raise self._suspend(_Suspend(FOREVER_MS, (seq,)))

    async def _read_receipts(self, seq: int) -> None:
        """Add the payloads that came for the hook at ``seq`` since the replay read them."""
        known = self.received.setdefault(seq, [])
        seen = {receipt for receipt, _ in known}
        for event in await self.ctx.events(
            intent_event_id=self.ctx.intent_event_id, kinds=[HOOK_RECEIVED]
        ):
            fact = _fact(event)
            if fact.get("seq") == seq and event.id not in seen:
                known.append((event.id, fact.get("payload")))

    async def _reject(self, seq: int, receipt: int, error: ValidationError) -> None:
        """Set aside the payload ``receipt`` of the hook at ``seq``: the hook takes another."""
        token, _ = self.hooks_created[seq]
        run_id = self.ctx.intent_event_id

        def reopen(tx: LedgerTx) -> None:
            row = _hook_row(tx, token)
            if row is not None and (row["run"], row["seq"]) == (run_id, seq):
                _put_hook_row(tx, token, {**row, "received": False})

        fact = {"seq": seq, "receipt": receipt, "error_type": type(error).__name__,
                "message": str(error)}  # fmt: skip
        await self.ctx._record(HOOK_REJECTED, fact, reopen)
        self.rejected.add(receipt)

    async def dispose_hook(self, token: str, hook_id: int) -> None:
        """Dispose of the hook ``hook_id``: its token is free again (once, then a no-op)."""
        if hook_id in self.disposed:
            return
        run_id = self.ctx.intent_event_id
        await self.ctx._record(
            HOOK_DISPOSED,
            {"token": token, "hook": hook_id},
            lambda tx: _drop_hook_row(tx, token, run_id),
        )
        self.disposed.add(hook_id)

    async def write(self, seq: int, chunk: JSON) -> int:
        """The body's write at ``seq``: appended once, then answered from its fact."""
        self._check_unwinding()
        if seq in self.written:
            return self.written[seq]
        index = await self.ctx.stream.write(chunk)
        await self.ctx._record(STREAM_WRITTEN, {"seq": seq, "index": index})
        self.written[seq] = index
        return index


async def _began(ctx: TriggerContext) -> bool:
    """True if the run's body has run before; also when its facts cannot be read now (so a
    cancelled run is put back for a host that can run its finally blocks, not ended)."""
    try:
        return (await _replay_facts(ctx)).began()
    except Exception:
        return True


async def _replay_facts(ctx: TriggerContext) -> _Run:
    run = _Run(ctx)
    for event in await ctx.events(intent_event_id=ctx.intent_event_id, kinds=REPLAY_KINDS):
        fact = event.payload
        assert isinstance(fact, dict)
        seq = int(fact.get("seq", 0))
        if event.kind in _PLACE_KINDS:
            place = _PLACE_KINDS[event.kind]
            if place == "step":
                place = f"step {fact.get('step')!r}"
            run.places.setdefault(seq, place)
        if event.kind == STEP_COMPLETED:
            run.completed.setdefault(seq, fact.get("result"))
        elif event.kind == STEP_FAILED:
            run.failed.setdefault(seq, fact)
        elif event.kind == STEP_ATTEMPT_FAILED:
            run.attempts[seq] = (int(fact["attempts"]), int(fact["retry_at"]))
        elif event.kind == WAIT_CREATED:
            run.waits.setdefault(seq, int(fact["until"]))
        elif event.kind == WAIT_COMPLETED:
            run.woke.add(seq)
        elif event.kind == HOOK_CREATED:
            run.hooks_created.setdefault(seq, (str(fact["token"]), event.id))
        elif event.kind == HOOK_CONFLICT:
            run.conflicts.setdefault(seq, (str(fact["token"]), int(fact["run_id"])))
        elif event.kind == HOOK_RECEIVED:
            run.received.setdefault(seq, []).append((event.id, fact.get("payload")))
        elif event.kind == HOOK_REJECTED:
            run.rejected.add(int(fact["receipt"]))
        elif event.kind == RACE_WON:
            run.races.setdefault(seq, int(fact["index"]))
        elif event.kind == CANCEL_DELIVERED:
            run.cancels.add(seq)
        elif event.kind == CONTROLLER_ABORTED:
            reason = fact.get("reason")
            recorded = (reason if isinstance(reason, str) else None, int(fact["at"]))
            run.aborts.setdefault(seq, recorded)
        elif event.kind == STREAM_WRITTEN:
            run.written.setdefault(seq, int(fact["index"]))
        else:
            run.disposed.add(int(fact["hook"]))
    return run


# -- the built-in trigger ------------------------------------------------------------------------


def _received_any(tx: Tx, places: set[int]) -> bool:
    """True if a payload for a hook made at one of ``places`` awaits the run's body."""
    ledger: Any = tx._ledger
    return _delivered(ledger.events(intent_event_id=tx.intent_event_id, kinds=_RECEIPT_KINDS),
                      places)  # fmt: skip


def _release_hooks(tx: Tx) -> None:
    """The run ends: the tokens its hooks hold are free."""
    ledger: Any = tx._ledger
    _release_run_hooks(ledger, tx.intent_event_id)


def workflow_trigger(workflows: Sequence[Workflow[..., Any]]) -> TriggerDef:
    """The ``trigger.workflow`` trigger that runs ``workflows`` (``define_agent_do`` adds it).

    A run is recorded only for a workflow of the class. A host that claims a run of a
    workflow it lacks (an older version during a rolling deploy, say) does not fail it: it
    puts the run back (``PutBack``), due again in ``ELSEWHERE_S`` seconds with no attempt
    spent, for a host that has the workflow, as hosts never claim intents of kinds they
    lack. A cancelled run that never began ends cancelled there, as it would on a host
    with the workflow; one that began is put back too, so that its ``finally`` blocks run.

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

    warned_at: dict[str, float] = {}

    def parse_claimed(payload: JSON) -> JSON:
        if not (isinstance(payload, dict) and isinstance(payload.get("workflow"), str)):
            raise ValueError("a workflow run's payload names its workflow")
        if not isinstance(payload.get("args", []), list):
            raise ValueError("a workflow run's args are a list")
        return payload

    def parse(payload: JSON) -> JSON:
        parse_claimed(payload)
        assert isinstance(payload, dict)
        if payload["workflow"] not in by_name:
            raise ValueError(f"no workflow named {payload['workflow']!r} on this actor class")
        return payload

    async def not_here(name: str, ctx: TriggerContext) -> NoReturn:
        """Put back a run of workflow ``name``, which this class lacks (or end it, cancelled
        before it began, as a host with the workflow would)."""
        if ctx.signal.aborted and not await _began(ctx):
            raise RunCancelledError(_reason_of(ctx.signal.reason))
        # (A run that began and is cancelled is put back too: its finally blocks, cleanup
        # steps included, run on a host that has the workflow.) Each run comes back every
        # few seconds: a warning per workflow and minute.
        now = time.monotonic()
        warn = now - warned_at.get(name, -math.inf) >= _NOT_HERE_WARN_S
        if warn:
            warned_at[name] = now
        log = ctx.log.warning if warn else ctx.log.debug
        log("workflow_not_here", workflow=name, retry_in=ELSEWHERE_S)
        raise PutBack(ctx._backend.now_ms() + round(ELSEWHERE_S * 1000))

    async def acquire(intent: Mapping[str, Any], ctx: TriggerContext) -> JSON:
        wf = by_name.get(intent["workflow"])
        if wf is None:
            await not_here(intent["workflow"], ctx)
        for _ in range(2):
            run = await _replay_facts(ctx)
            try:
                return {"result": await run.execute(wf.fn, intent.get("args", []))}
            except _Suspend as suspend:
                if not ctx.signal.aborted:
                    return {"suspend_until": suspend.until_ms, "hooks": list(suspend.hooks)}
            except _BodyFailedError as failed:
                # The run's failure, as the body raised it; the framework's trigger.failed
                # fact names the FatalError that ends the run without retries.
                fact = {"error_type": failed.error_type, "message": failed.message}
                if not await run._cancel_requested():
                    # (A cancel recorded already ends the run cancelled, whatever it raised.)
                    await ctx._record(RUN_FAILED, fact)
                raise FatalError(str(failed)) from failed.__cause__
            # Cancelled while it suspended: replay it again, so that the cancel reaches the
            # body where it waits and its finally blocks run (cleanup steps included).
        raise RunCancelledError(_reason_of(ctx.signal.reason))

    def commit(outcome: Mapping[str, Any], tx: Tx) -> None:
        if "suspend_until" in outcome:
            until = int(outcome["suspend_until"])
            awaited = set(outcome.get("hooks", []))
            if awaited and _received_any(tx, awaited):
                until = tx._ledger.now_ms  # a resume landed while this attempt ran
            tx.reschedule(ms_to_datetime(until))
            return
        dump_json(outcome["result"], what="workflow result")
        _release_hooks(tx)
        tx._insert_framework_event(RUN_COMPLETED, {"result": outcome["result"]})

    def commit_cancelled(intent: Any, cancellation: Cancellation, tx: Tx) -> None:
        _release_hooks(tx)
        tx._insert_framework_event(RUN_CANCELLED, {"reason": cancellation.reason})

    def commit_failed(intent: Any, failure: Failure, tx: Tx) -> None:
        _release_hooks(tx)  # the framework's trigger.failed fact follows

    spec: DurableTrigger[Any, Any] = {
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
    return replace(validate_trigger(spec, builtin=True), parse_claimed=parse_claimed)
