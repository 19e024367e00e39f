"""Unit tests for triggers._abort: AbortController, AbortSignal and AbortError."""

from __future__ import annotations

import gc
import logging
import math
import pickle
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given
from hypothesis import strategies as st

from triggers._abort import AbortController, AbortError, AbortSignal

pytestmark = pytest.mark.anyio


# --- AbortError ---------------------------------------------------------------------------


def test_abort_error_str_mentions_reason() -> None:
    """str(AbortError(reason)) mentions the reason."""
    assert "user" in str(AbortError("user"))
    assert str(AbortError("user pressed stop")) == "aborted: user pressed stop"


def test_abort_error_str_without_reason() -> None:
    """str(AbortError()) is just "aborted" and its reason is None."""
    err = AbortError()
    assert str(err) == "aborted"
    assert err.reason is None


def test_abort_error_non_str_reason_uses_repr() -> None:
    """A non-str reason is shown by repr and kept as-is in .reason."""
    cause = TimeoutError("slow")
    err = AbortError(cause)
    assert err.reason is cause
    assert "TimeoutError('slow')" in str(err)


def test_abort_error_pickles_with_its_reason() -> None:
    """AbortError survives a pickle round-trip with its reason intact."""
    assert pickle.loads(pickle.dumps(AbortError("x"))).reason == "x"
    assert pickle.loads(pickle.dumps(AbortError())).reason is None


# --- basic state, reasons, first abort wins ----------------------------------------------


def test_new_signal_is_not_aborted() -> None:
    """A fresh signal is not aborted, has no reason, and throw_if_aborted is a no-op."""
    signal = AbortController().signal
    assert not signal.aborted
    assert signal.reason is None
    signal.throw_if_aborted()
    assert not AbortSignal().aborted


def test_default_reason_is_an_abort_error() -> None:
    """abort() without a reason sets the reason to an AbortError instance with no reason."""
    controller = AbortController()
    controller.abort()
    assert controller.signal.aborted
    reason = controller.signal.reason
    assert isinstance(reason, AbortError)
    assert reason.reason is None


def test_first_abort_wins() -> None:
    """Later abort() calls change neither the reason nor re-run listeners."""
    controller = AbortController()
    calls: list[object] = []
    controller.signal.add_listener(lambda s: calls.append(s.reason))
    controller.abort("first")
    controller.abort("second")
    controller.abort()
    assert controller.signal.reason == "first"
    assert calls == ["first"]


def test_private_abort_reports_whether_it_aborted() -> None:
    """_abort returns True for the aborting call and False afterwards."""
    signal = AbortSignal()
    assert signal._abort("a") is True
    assert signal._abort("b") is False
    assert signal.reason == "a"


@given(st.lists(st.one_of(st.none(), st.text(), st.integers()), min_size=1))
def test_first_reason_wins_for_any_sequence(reasons: list[object]) -> None:
    """For any sequence of aborts the first reason sticks and listeners run exactly once."""
    controller = AbortController()
    seen: list[object] = []
    controller.signal.add_listener(lambda s: seen.append(s.reason))
    for reason in reasons:
        controller.abort(reason)
    if reasons[0] is None:
        assert isinstance(controller.signal.reason, AbortError)
    else:
        assert controller.signal.reason == reasons[0]
    assert seen == [controller.signal.reason]


def test_repr_shows_state_and_reason() -> None:
    """repr shows whether the signal is aborted and its reason."""
    controller = AbortController()
    assert "aborted=False" in repr(controller.signal)
    controller.abort("why")
    assert "aborted=True" in repr(controller.signal)
    assert "'why'" in repr(controller.signal)
    assert "aborted=True" in repr(controller)


def test_static_abort_returns_aborted_signal() -> None:
    """AbortSignal.abort(reason) returns an already-aborted signal with that reason."""
    signal = AbortSignal.abort("x")
    assert signal.aborted
    assert signal.reason == "x"
    assert isinstance(AbortSignal.abort().reason, AbortError)


# --- throw_if_aborted ---------------------------------------------------------------------


def test_throw_if_aborted_wraps_plain_reason() -> None:
    """throw_if_aborted raises AbortError carrying a non-AbortError reason."""
    signal = AbortSignal.abort("x")
    with pytest.raises(AbortError) as info:
        signal.throw_if_aborted()
    assert info.value.reason == "x"


def test_throw_if_aborted_raises_abort_error_reason_itself() -> None:
    """throw_if_aborted raises the reason itself when it is an AbortError."""
    reason = AbortError("custom")
    signal = AbortSignal.abort(reason)
    with pytest.raises(AbortError) as info:
        signal.throw_if_aborted()
    assert info.value is reason


def test_throw_if_aborted_default_reason_is_raised_as_is() -> None:
    """With the default reason, throw_if_aborted raises that default AbortError instance."""
    signal = AbortSignal.abort()
    with pytest.raises(AbortError) as info:
        signal.throw_if_aborted()
    assert info.value is signal.reason


def test_throw_if_aborted_wraps_exception_reason() -> None:
    """An exception reason that is not an AbortError is wrapped in AbortError."""
    cause = TimeoutError("late")
    signal = AbortSignal.abort(cause)
    with pytest.raises(AbortError) as info:
        signal.throw_if_aborted()
    assert info.value.reason is cause


# --- listeners ----------------------------------------------------------------------------


def test_listeners_called_once_in_registration_order_with_signal() -> None:
    """Listeners run once each, in registration order, receiving the signal."""
    controller = AbortController()
    calls: list[tuple[str, AbortSignal]] = []
    controller.signal.add_listener(lambda s: calls.append(("a", s)))
    controller.signal.add_listener(lambda s: calls.append(("b", s)))
    controller.signal.add_listener(lambda s: calls.append(("c", s)))
    controller.abort()
    controller.abort()
    assert calls == [("a", controller.signal), ("b", controller.signal), ("c", controller.signal)]


def test_listeners_run_synchronously_within_abort() -> None:
    """Listeners have already run when abort() returns and see the signal as aborted."""
    controller = AbortController()
    seen: list[bool] = []
    controller.signal.add_listener(lambda s: seen.append(s.aborted))
    controller.abort()
    assert seen == [True]


def test_removed_listener_is_not_called_and_removal_is_idempotent() -> None:
    """A removed listener is not called; calling the remover again is harmless."""
    controller = AbortController()
    calls: list[str] = []
    remove_a = controller.signal.add_listener(lambda _: calls.append("a"))
    controller.signal.add_listener(lambda _: calls.append("b"))
    remove_a()
    remove_a()
    assert controller.signal._listener_count() == 1
    controller.abort()
    remove_a()
    assert calls == ["b"]


def test_same_callback_registered_twice_runs_twice_and_removes_separately() -> None:
    """Each registration is independent, even for the same callback."""
    controller = AbortController()
    calls: list[int] = []

    def callback(_: AbortSignal) -> None:
        calls.append(1)

    remove_first = controller.signal.add_listener(callback)
    controller.signal.add_listener(callback)
    remove_first()
    controller.abort()
    assert calls == [1]


def test_raising_listener_is_logged_and_does_not_stop_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A listener that raises is logged; later listeners still run and abort() returns."""
    controller = AbortController()
    calls: list[str] = []

    def boom(_: AbortSignal) -> None:
        raise RuntimeError("listener failed")

    controller.signal.add_listener(lambda _: calls.append("before"))
    controller.signal.add_listener(boom)
    controller.signal.add_listener(lambda _: calls.append("after"))
    with caplog.at_level(logging.ERROR, logger="triggers"):
        controller.abort("x")
    assert calls == ["before", "after"]
    assert controller.signal.reason == "x"
    records = [r for r in caplog.records if r.name == "triggers"]
    assert len(records) == 1
    assert records[0].exc_info is not None
    assert isinstance(records[0].exc_info[1], RuntimeError)


def test_add_listener_on_aborted_signal_is_not_called() -> None:
    """add_listener on an already-aborted signal never calls the callback."""
    signal = AbortSignal.abort("done")
    calls: list[AbortSignal] = []
    remove = signal.add_listener(calls.append)
    remove()
    signal._abort("again")
    assert calls == []
    assert signal._listener_count() == 0


def test_listener_removed_during_dispatch_is_skipped() -> None:
    """A listener removed by an earlier listener during the same abort is not called."""
    controller = AbortController()
    calls: list[str] = []

    def first(_: AbortSignal) -> None:
        calls.append("first")
        remove_second()

    controller.signal.add_listener(first)
    remove_second = controller.signal.add_listener(lambda _: calls.append("second"))
    controller.abort()
    assert calls == ["first"]


def test_listener_added_during_dispatch_is_not_called() -> None:
    """A listener added while abort listeners are running is not called."""
    controller = AbortController()
    calls: list[str] = []

    def first(signal: AbortSignal) -> None:
        calls.append("first")
        signal.add_listener(lambda _: calls.append("late"))

    controller.signal.add_listener(first)
    controller.abort()
    assert calls == ["first"]
    assert controller.signal._listener_count() == 0


def test_listeners_are_released_after_abort() -> None:
    """After abort the signal holds no listeners."""
    controller = AbortController()
    controller.signal.add_listener(lambda _: None)
    assert controller.signal._listener_count() == 1
    controller.abort()
    assert controller.signal._listener_count() == 0


# --- wait() -------------------------------------------------------------------------------


async def test_wait_after_abort_returns_immediately() -> None:
    """wait() on an aborted signal returns at once."""
    signal = AbortSignal.abort()
    with anyio.fail_after(5):
        await signal.wait()


async def test_wait_before_abort_returns_once_aborted() -> None:
    """wait() blocks until the signal is aborted, then every waiter returns."""
    controller = AbortController()
    woken: list[int] = []

    async def waiter(n: int) -> None:
        await controller.signal.wait()
        woken.append(n)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter, 1)
            tg.start_soon(waiter, 2)
            await anyio.wait_all_tasks_blocked()
            assert woken == []
            controller.abort()
    assert sorted(woken) == [1, 2]


async def test_cancelled_wait_leaves_no_listener_behind() -> None:
    """Cancelling wait() leaves no listener on the signal and later waits still work."""
    controller = AbortController()
    with anyio.fail_after(5):
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(controller.signal.wait)
                await anyio.wait_all_tasks_blocked()
                scope.cancel()
        assert scope.cancelled_caught
        assert controller.signal._listener_count() == 0

        async with anyio.create_task_group() as tg:
            tg.start_soon(controller.signal.wait)
            await anyio.wait_all_tasks_blocked()
            controller.abort()
    assert controller.signal._listener_count() == 0


# --- scope() ------------------------------------------------------------------------------


async def test_scope_cancels_blocked_work_and_raises_abort_error() -> None:
    """scope() cancels a blocked sleep_forever on abort and raises AbortError(reason)."""
    controller = AbortController()
    caught: list[AbortError] = []
    reached_end = False

    async def worker() -> None:
        nonlocal reached_end
        try:
            with controller.signal.scope():
                await anyio.sleep_forever()
            reached_end = True
        except AbortError as err:
            caught.append(err)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker)
            await anyio.wait_all_tasks_blocked()
            controller.abort("user pressed stop")
    assert not reached_end
    assert len(caught) == 1
    assert caught[0].reason == "user pressed stop"
    assert controller.signal._listener_count() == 0


async def test_scope_with_already_aborted_signal_cancels_at_first_checkpoint() -> None:
    """scope() on an aborted signal cancels the block at once and raises the AbortError reason."""
    signal = AbortSignal.abort()
    after_checkpoint = False

    async def block() -> None:
        nonlocal after_checkpoint
        with signal.scope() as cancel_scope:
            assert cancel_scope.cancel_called
            await anyio.sleep_forever()
            after_checkpoint = True

    with anyio.fail_after(5), pytest.raises(AbortError) as info:
        await block()
    assert not after_checkpoint
    assert info.value is signal.reason


async def test_scope_abort_from_inside_block() -> None:
    """Aborting from inside the block cancels it at the next checkpoint."""
    controller = AbortController()

    async def block() -> None:
        with controller.signal.scope():
            controller.abort("inner")
            await anyio.sleep_forever()

    with anyio.fail_after(5), pytest.raises(AbortError) as info:
        await block()
    assert info.value.reason == "inner"


async def test_scope_leaves_outer_cancellation_alone() -> None:
    """Outer scope cancellation propagates through scope() untouched, without AbortError."""
    controller = AbortController()
    with anyio.fail_after(5):
        with anyio.CancelScope() as outer:
            with controller.signal.scope() as inner:
                outer.cancel()
                await anyio.sleep_forever()
    assert outer.cancelled_caught
    assert not inner.cancelled_caught
    assert not controller.signal.aborted
    assert controller.signal._listener_count() == 0


async def test_scope_outer_cancellation_wins_over_signal() -> None:
    """With both an outer cancel and an abort, the outer cancellation propagates, no AbortError."""
    controller = AbortController()
    with anyio.fail_after(5):
        with anyio.CancelScope() as outer:
            with controller.signal.scope():
                outer.cancel()
                controller.abort("also")
                await anyio.sleep_forever()
    assert outer.cancelled_caught


async def test_scope_propagates_other_exceptions() -> None:
    """An exception raised in the block propagates unchanged from scope()."""
    controller = AbortController()

    async def block() -> None:
        with controller.signal.scope():
            await anyio.lowlevel.checkpoint()
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await block()
    assert controller.signal._listener_count() == 0


async def test_scope_propagates_other_exception_even_after_abort() -> None:
    """An exception raised after the abort (before a checkpoint) wins over AbortError."""
    controller = AbortController()

    def block() -> None:
        with controller.signal.scope():
            controller.abort()
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        block()
    assert controller.signal.aborted


async def test_scope_completes_normally_when_block_finishes_before_a_checkpoint() -> None:
    """An abort that the block never observes (no checkpoint after it) raises nothing."""
    controller = AbortController()
    with controller.signal.scope() as cancel_scope:
        controller.abort()
    assert cancel_scope.cancel_called
    assert not cancel_scope.cancelled_caught
    # No stray cancellation is left pending on the task.
    with anyio.fail_after(5):
        await anyio.lowlevel.checkpoint()


async def test_scope_without_abort_is_transparent() -> None:
    """Without an abort the block runs to completion and the listener is removed."""
    controller = AbortController()
    with controller.signal.scope() as cancel_scope:
        assert controller.signal._listener_count() == 1
        await anyio.lowlevel.checkpoint()
    assert not cancel_scope.cancel_called
    assert controller.signal._listener_count() == 0
    controller.abort()  # aborting after the block has no effect on it


async def test_scope_manual_cancel_is_swallowed_without_abort_error() -> None:
    """Cancelling the yielded scope by hand behaves like a plain cancel scope."""
    controller = AbortController()
    with controller.signal.scope() as cancel_scope:
        cancel_scope.cancel()
        await anyio.sleep_forever()
    assert cancel_scope.cancelled_caught


# --- any() --------------------------------------------------------------------------------


def test_any_with_already_aborted_input() -> None:
    """any() is already aborted, with that input's reason, if some input is."""
    fresh = AbortController()
    done = AbortSignal.abort("early")
    combined = AbortSignal.any([fresh.signal, done])
    assert combined.aborted
    assert combined.reason == "early"
    assert fresh.signal._listener_count() == 0


def test_any_reuses_default_reason_object() -> None:
    """any() of an aborted input with a default reason reuses that same reason object."""
    done = AbortSignal.abort()
    assert AbortSignal.any([done]).reason is done.reason


def test_any_fires_with_first_reason() -> None:
    """any() aborts with the reason of the first input to abort."""
    a, b = AbortController(), AbortController()
    combined = AbortSignal.any([a.signal, b.signal])
    calls: list[object] = []
    combined.add_listener(lambda s: calls.append(s.reason))
    assert not combined.aborted
    b.abort("b first")
    a.abort("a second")
    assert combined.reason == "b first"
    assert calls == ["b first"]


def test_any_detaches_from_other_inputs_once_fired() -> None:
    """Once any() fires it removes its listeners from every input."""
    a, b, c = AbortController(), AbortController(), AbortController()
    combined = AbortSignal.any(iter([a.signal, b.signal, c.signal]))
    assert [s._listener_count() for s in (a.signal, b.signal, c.signal)] == [1, 1, 1]
    b.abort()
    assert combined.aborted
    assert [s._listener_count() for s in (a.signal, b.signal, c.signal)] == [0, 0, 0]


def test_any_detaches_when_aborted_directly() -> None:
    """Aborting the combined signal itself also detaches it from its inputs."""
    parent = AbortController()
    combined = AbortSignal.any([parent.signal])
    combined._abort("direct")
    assert parent.signal._listener_count() == 0
    assert not parent.signal.aborted


def test_any_of_nothing_never_aborts() -> None:
    """any([]) is a signal that is not aborted."""
    assert not AbortSignal.any([]).aborted


async def test_any_wakes_waiters() -> None:
    """wait() on an any() signal returns once an input aborts."""
    a, b = AbortController(), AbortController()
    combined = AbortSignal.any([a.signal, b.signal])
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(combined.wait)
            await anyio.wait_all_tasks_blocked()
            a.abort("a")
    assert combined.reason == "a"


# --- timeout() ----------------------------------------------------------------------------


async def test_timeout_aborts_with_timeout_error_reason() -> None:
    """timeout() aborts after the delay with a TimeoutError reason naming the delay."""
    signal = AbortSignal.timeout(0.01)
    with anyio.fail_after(5):
        await signal.wait()
    assert isinstance(signal.reason, TimeoutError)
    assert str(signal.reason) == "signal timed out after 0.01s"


async def test_timeout_zero_aborts_on_next_loop_iteration() -> None:
    """timeout(0) is not aborted synchronously but aborts promptly."""
    signal = AbortSignal.timeout(0)
    assert not signal.aborted
    with anyio.fail_after(5):
        await signal.wait()
    assert isinstance(signal.reason, TimeoutError)


async def test_timeout_cancels_scope() -> None:
    """A timeout signal's scope() turns the timeout into AbortError wrapping TimeoutError."""
    signal = AbortSignal.timeout(0.01)

    async def block() -> None:
        with signal.scope():
            await anyio.sleep_forever()

    with anyio.fail_after(5), pytest.raises(AbortError) as info:
        await block()
    assert isinstance(info.value.reason, TimeoutError)


async def test_timeout_infinite_never_aborts() -> None:
    """timeout(math.inf) is a signal that does not abort."""
    assert not AbortSignal.timeout(math.inf).aborted


@pytest.mark.parametrize("seconds", [-1, -0.001, math.nan, -math.inf])
async def test_timeout_rejects_negative_or_nan(seconds: float) -> None:
    """timeout() raises ValueError for negative or NaN seconds."""
    with pytest.raises(ValueError, match="non-negative"):
        AbortSignal.timeout(seconds)


def test_timeout_requires_running_loop() -> None:
    """timeout() outside a running event loop raises RuntimeError."""
    with pytest.raises(RuntimeError):
        AbortSignal.timeout(1)


# --- any(): inputs hold the combined signal weakly -----------------------------------------


def test_any_signals_nobody_holds_leave_their_inputs() -> None:
    """Deriving many never-aborting signals from one long-lived input leaks nothing: once a
    derived signal is garbage, its listener leaves the input."""
    shutdown = AbortController()
    for _ in range(1000):
        AbortSignal.any([shutdown.signal, AbortSignal()])
    gc.collect()
    assert shutdown.signal._listener_count() == 0
    kept = AbortSignal.any([shutdown.signal])
    gc.collect()
    assert shutdown.signal._listener_count() == 1
    shutdown.abort("stop")
    assert kept.reason == "stop"


def test_any_signal_with_a_listener_is_kept_alive_by_its_inputs() -> None:
    """As on the web: a derived signal someone listens to fires even if nobody holds it, and
    is released by its inputs once its listeners are removed."""
    source = AbortController()
    heard: list[object] = []
    remove = AbortSignal.any([source.signal]).add_listener(lambda s: heard.append(s.reason))
    gc.collect()
    assert source.signal._listener_count() == 1
    other = AbortController()
    remove_other = AbortSignal.any([other.signal]).add_listener(heard.append)
    remove_other()
    gc.collect()
    assert other.signal._listener_count() == 0
    source.abort("fired")
    assert heard == ["fired"]
    remove()  # after the abort: harmless


async def test_any_signal_someone_waits_on_fires() -> None:
    source = AbortController()
    async with anyio.create_task_group() as tg:
        fired = anyio.Event()

        async def wait() -> None:
            await AbortSignal.any([source.signal, AbortSignal()]).wait()
            fired.set()

        tg.start_soon(wait)
        await anyio.wait_all_tasks_blocked()
        gc.collect()
        source.abort("go")
        with anyio.fail_after(5):
            await fired.wait()


def _wrong(value: object) -> Any:
    """``value`` typed as anything: the misuse the checks below are for."""
    return value


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: AbortSignal().add_listener(_wrong("print")), "callback must be callable"),
        (lambda: AbortSignal.any(_wrong(AbortSignal())), r"AbortSignal.any\(\[s\]\)"),
        (lambda: AbortSignal.any([AbortSignal(), _wrong("x")]), "must be AbortSignal, not str"),
        (lambda: AbortSignal.any([_wrong(None)]), "must be AbortSignal, not NoneType"),
    ],
)
def test_misuse_is_a_type_error_at_once(call: Any, match: str) -> None:
    """A listener that is not callable, one signal or a non-signal given to ``any()``: a
    TypeError at the call, not an AttributeError (or a logged error) later."""
    with pytest.raises(TypeError, match=match):
        call()


@pytest.mark.parametrize("seconds", ["5", None, True])
async def test_timeout_refuses_what_is_not_a_number(seconds: Any) -> None:
    with pytest.raises(TypeError, match="seconds must be a number"):
        AbortSignal.timeout(seconds)
