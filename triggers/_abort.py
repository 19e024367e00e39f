"""Web-style abort primitives: :class:`AbortController`, :class:`AbortSignal`, :class:`AbortError`.

These mirror the browser ``AbortController`` / ``AbortSignal`` pair, adapted to anyio:
a controller owns a signal, calling :meth:`AbortController.abort` aborts the signal once,
and code holding the signal can poll it (:attr:`AbortSignal.aborted`,
:meth:`AbortSignal.throw_if_aborted`), be notified (:meth:`AbortSignal.add_listener`),
wait for it (:meth:`AbortSignal.wait`) or run a block that is cancelled when it fires
(:meth:`AbortSignal.scope`).

Threading: signals are not thread-safe. Every method, and in particular aborting, must be
used from the event loop thread. Delivering an abort from another thread (for example via
``anyio.from_thread.run_sync``) is the caller's responsibility.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import weakref
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    import contextlib
    from collections.abc import Callable, Iterable
    from types import TracebackType

__all__ = ["AbortController", "AbortError", "AbortSignal"]

_logger = logging.getLogger("triggers")


class AbortError(Exception):
    """Raised when work is aborted.

    Attributes:
        reason: The abort reason: any object, often a ``str``; ``None`` if none was given.
    """

    reason: object

    def __init__(self, reason: object = None) -> None:
        """Create the error.

        Args:
            reason: The abort reason. It is kept as-is in :attr:`reason` and shown in
                ``str(error)``.
        """
        # args holds the reason itself (not the message) so the error pickles round-trip.
        if reason is None:
            super().__init__()
        else:
            super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        """Return ``"aborted"``, or ``"aborted: <reason>"`` when there is a reason."""
        if self.reason is None:
            return "aborted"
        shown = self.reason if isinstance(self.reason, str) else repr(self.reason)
        return f"aborted: {shown}"


class AbortSignal:
    """A one-shot flag that tells work to stop, with a reason.

    Signals are normally obtained from :attr:`AbortController.signal` or from the
    static factories :meth:`any`, :meth:`timeout` and :meth:`abort`. A plain
    ``AbortSignal()`` is a signal that nothing can abort (short of :meth:`_abort`),
    which is handy as a default.

    A signal is aborted at most once; the first reason wins. Signals must only be used
    from the event loop thread.
    """

    __slots__ = ("__weakref__", "_aborted", "_event", "_listeners", "_pin", "_reason")

    def __init__(self) -> None:
        """Create a signal that is not aborted."""
        self._aborted = False
        self._reason: object = None
        # Insertion-ordered: key is a unique token per registration. None once aborted.
        self._listeners: dict[object, Callable[[AbortSignal], object]] | None = {}
        # Created lazily by the first wait(), so signals nobody waits on stay cheap.
        self._event: anyio.Event | None = None
        # Signals held weakly by what fires them (made by any(), whose inputs hold them; a
        # distributed abort controller's, whose follower holds it): strongly through this
        # list only while it holds them (while someone listens to them). None otherwise.
        self._pin: list[AbortSignal] | None = None

    def __repr__(self) -> str:
        """Show whether the signal is aborted and, if so, its reason."""
        if self._aborted:
            return f"<AbortSignal aborted=True reason={self._reason!r}>"
        return "<AbortSignal aborted=False>"

    @property
    def aborted(self) -> bool:
        """Whether the signal has been aborted."""
        return self._aborted

    @property
    def reason(self) -> object:
        """The abort reason; ``None`` until aborted.

        Once aborted this is the reason passed to ``abort()``, or, if that was ``None``,
        an :class:`AbortError` instance created at abort time (like the web's default
        ``AbortError`` reason), so an aborted signal's reason is never ``None``.
        """
        return self._reason

    def throw_if_aborted(self) -> None:
        """Raise if the signal is aborted; do nothing otherwise.

        Raises:
            AbortError: If the signal is aborted. When :attr:`reason` is itself an
                :class:`AbortError`, that very instance is raised; otherwise a new
                ``AbortError(reason)``.
        """
        if self._aborted:
            raise self._abort_error()

    def add_listener(self, callback: Callable[[AbortSignal], object]) -> Callable[[], None]:
        """Call ``callback(signal)`` once, synchronously, when the signal aborts.

        Listeners run inside the ``abort()`` call, in registration order. A listener that
        raises is logged (logger ``"triggers"``) and does not stop the other listeners
        or make ``abort()`` raise. A listener removed by an earlier listener during the
        same abort is not called.

        If the signal is **already aborted, the callback is not called**, neither now nor
        later (web semantics); check :attr:`aborted` first if that matters.

        Args:
            callback: Called with this signal as its only argument. Its return value is
                ignored.

        Returns:
            A function that removes the listener. Calling it more than once, or after the
            signal aborted, does nothing.

        Raises:
            TypeError: ``callback`` is not callable.
        """
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        listeners = self._listeners
        if self._aborted or listeners is None:
            return _noop
        token = object()
        listeners[token] = callback
        pin = self._pin
        if pin is not None and not pin:
            pin.append(self)  # a listener waits: the inputs must keep this signal alive

        def remove() -> None:
            # Use the dict captured at registration: after abort, _listeners is None.
            listeners.pop(token, None)
            if pin is not None and len(listeners) <= 1:  # only any()'s own detach is left
                pin.clear()

        return remove

    async def wait(self) -> None:
        """Return once the signal is aborted.

        Returns at once, without yielding to the event loop, if the signal is already
        aborted. Otherwise blocks until it is; this wait is cancellable by anyio cancel
        scopes and registers no listener, so cancelling it leaves nothing behind.
        """
        if self._aborted:
            return
        event = self._event
        if event is None:
            event = self._event = anyio.Event()
        await event.wait()

    def scope(self) -> contextlib.AbstractContextManager[anyio.CancelScope]:
        """Run a block in a cancel scope that is cancelled when the signal aborts.

        Usage::

            with signal.scope():
                await do_work()

        If the signal is already aborted the scope starts out cancelled, so the block is
        cancelled at its first checkpoint.

        On exit:

        * If the scope caught a cancellation caused by the signal, :class:`AbortError`
          is raised (the reason itself if it is an :class:`AbortError`, otherwise
          ``AbortError(reason)``). If the block finished without hitting a checkpoint
          after the abort, it completes normally, like ``anyio.fail_after``.
        * Any other exception from the block propagates unchanged.
        * Cancellation of an enclosing scope propagates untouched; it is never swallowed
          or turned into :class:`AbortError`.

        Returns:
            A context manager yielding the :class:`anyio.CancelScope`. Each call returns a
            new, single-use context manager.
        """
        return _AbortScope(self)

    @staticmethod
    def any(signals: Iterable[AbortSignal]) -> AbortSignal:
        """Return a signal that aborts when the first of ``signals`` aborts.

        The new signal takes the reason of the input that aborted first. If an input is
        already aborted, the returned signal is already aborted with the reason of the
        first such input (in iteration order). Once the new signal aborts it removes its
        listeners from all inputs.

        As on the web, the inputs hold the new signal weakly: one that nobody references,
        listens to or waits on is garbage, and its listeners leave the inputs with it, so
        deriving many signals that never abort from one long-lived input leaks nothing. A
        signal with listeners is kept alive by its inputs until they are removed.

        Args:
            signals: The input signals. May be empty (the result then never aborts).

        Returns:
            The combined signal.

        Raises:
            TypeError: ``signals`` is one signal (give a list) or holds something else.
        """
        if isinstance(signals, AbortSignal):
            raise TypeError("signals must be an iterable of AbortSignal: AbortSignal.any([s])")
        inputs = list(signals)
        for signal in inputs:
            if not isinstance(signal, AbortSignal):
                raise TypeError(f"signals must be AbortSignal, not {type(signal).__name__}")
        for signal in inputs:
            if signal._aborted:
                return AbortSignal.abort(signal._reason)

        combined = AbortSignal()
        removers: list[Callable[[], None]] = []
        # Nothing below may refer to ``combined`` strongly, except through ``pin``.
        pin: list[AbortSignal] = []
        weak = weakref.ref(combined)

        def forward(source: AbortSignal) -> None:
            target = pin[0] if pin else weak()
            if target is not None:
                target._abort(source._reason)

        # Registered first, so the inputs are detached before user listeners run, and
        # also when the combined signal is aborted directly through _abort().
        combined.add_listener(functools.partial(_detach, removers))
        combined._pin = pin
        removers.extend(signal.add_listener(forward) for signal in inputs)
        weakref.finalize(combined, _detach, removers, None)
        return combined

    @staticmethod
    def timeout(seconds: float) -> AbortSignal:
        """Return a signal that aborts after ``seconds``.

        The reason is ``TimeoutError(f"signal timed out after {seconds}s")``. Must be
        called from inside a running asyncio event loop (the timer starts immediately).
        ``math.inf`` gives a signal that never times out.

        Args:
            seconds: Delay before the signal aborts; ``0`` aborts on the next loop
                iteration.

        Returns:
            The new signal.

        Raises:
            TypeError: If ``seconds`` is not a number.
            ValueError: If ``seconds`` is negative or NaN.
            RuntimeError: If there is no running asyncio event loop.
        """
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise TypeError(f"seconds must be a number, not {type(seconds).__name__}")
        if math.isnan(seconds) or seconds < 0:
            raise ValueError(f"seconds must be a non-negative number, got {seconds!r}")
        # Backend-specific on purpose: the project runs anyio on the asyncio backend and
        # anyio has no public "call later" primitive. This is the only asyncio-specific
        # call in this module; keep it confined to this helper.
        loop = asyncio.get_running_loop()
        signal = AbortSignal()
        if seconds != math.inf:
            reason = TimeoutError(f"signal timed out after {seconds}s")
            loop.call_later(seconds, signal._abort, reason)
        return signal

    @staticmethod
    def abort(reason: object = None) -> AbortSignal:
        """Return a signal that is already aborted.

        Args:
            reason: The reason; ``None`` gives a default :class:`AbortError` reason.

        Returns:
            The aborted signal.
        """
        signal = AbortSignal()
        signal._abort(reason)
        return signal

    def _abort(self, reason: object) -> bool:
        """Abort the signal: set the reason, wake waiters, run listeners.

        Must be called on the event loop thread. Listener errors are logged, not raised.

        Args:
            reason: The reason; ``None`` is replaced by a new :class:`AbortError`.

        Returns:
            ``True`` if this call aborted the signal, ``False`` if it was already aborted
            (in which case nothing changes).
        """
        if self._aborted:
            return False
        self._aborted = True
        self._reason = AbortError() if reason is None else reason
        if self._event is not None:
            self._event.set()
        listeners = self._listeners
        self._listeners = None
        # Pop one at a time: a listener removed by an earlier one (its remover still
        # holds this dict) is skipped. Listeners added meanwhile are refused, since the
        # signal is already marked aborted.
        while listeners:
            callback = listeners.pop(next(iter(listeners)))
            try:
                callback(self)
            except Exception:
                _logger.exception("abort listener %r raised", callback)
        return True

    def _listener_count(self) -> int:
        """Return how many listeners are registered (for tests and diagnostics)."""
        return 0 if self._listeners is None else len(self._listeners)

    def _abort_error(self) -> AbortError:
        """Return the error to raise for this (aborted) signal."""
        reason = self._reason
        return reason if isinstance(reason, AbortError) else AbortError(reason)


class AbortController:
    """Owns an :class:`AbortSignal` and is the only public way to abort it.

    Hand :attr:`signal` to the work; keep the controller to abort it.
    """

    __slots__ = ("_signal",)

    def __init__(self) -> None:
        """Create a controller with a fresh, non-aborted signal."""
        self._signal = AbortSignal()

    def __repr__(self) -> str:
        """Show the controlled signal."""
        return f"<AbortController signal={self._signal!r}>"

    @property
    def signal(self) -> AbortSignal:
        """The signal controlled by this controller."""
        return self._signal

    def abort(self, reason: object = None) -> None:
        """Abort the signal.

        The first call wins: later calls do nothing (the reason is unchanged and
        listeners do not run again). Must be called on the event loop thread.

        Args:
            reason: The abort reason; ``None`` gives a default :class:`AbortError` reason.
        """
        self._signal._abort(reason)


def is_failure(error: BaseException) -> bool:
    """True if ``error``, raised by user code, is that code's failure rather than an
    interruption: any ``Exception``, and a ``CancelledError`` that is not a cancellation of
    the current task (the code awaited something someone else cancelled, such as a library's
    inner task or a future). A cancellation in progress, ``KeyboardInterrupt`` and the like
    are interruptions and must propagate."""
    if isinstance(error, Exception):
        return True
    return isinstance(error, asyncio.CancelledError) and not being_cancelled()


def being_cancelled() -> bool:
    """True while the current task has a cancellation pending (an anyio cancel scope's or
    anyone's ``task.cancel()``): a ``CancelledError`` raised now is that cancellation."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def reason_text(reason: object) -> str | None:
    """An abort reason as the text a durable cancel records (``None`` for no reason)."""
    if reason is None or (isinstance(reason, AbortError) and reason.reason is None):
        return None
    if isinstance(reason, AbortError):
        return reason_text(reason.reason)
    return storable(reason if isinstance(reason, str) else _text(reason))


def describe(error: BaseException) -> str:
    """``str(error)``, as text every ledger can store (see ``storable``)."""
    return storable(_text(error))


def _text(value: object) -> str:
    try:
        return str(value)
    except Exception:  # a __str__ that raises must not stop the fact being recorded
        return f"<{type(value).__name__} whose text could not be read>"


def storable(text: str) -> str:
    """``text`` with lone surrogates (from undecodable file names, say) written as escapes:
    neither SQLite nor PostgreSQL can store them, and a failure must still be recorded."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _detach(removers: list[Callable[[], None]], _: AbortSignal | None) -> None:
    """Remove a combined signal's listeners from its inputs (it aborted, or is garbage)."""
    for remove in removers:
        remove()
    removers.clear()


def _noop() -> None:
    """Do nothing (the remover for a listener that was never registered)."""


class _AbortScope:
    """Context manager behind :meth:`AbortSignal.scope`."""

    __slots__ = ("_cancel_scope", "_fired", "_remove", "_signal")

    def __init__(self, signal: AbortSignal) -> None:
        self._signal = signal
        self._cancel_scope = anyio.CancelScope()
        self._fired = False
        self._remove: Callable[[], None] = _noop

    def _on_abort(self, _: AbortSignal) -> None:
        self._fired = True
        self._cancel_scope.cancel("abort signal fired")

    def __enter__(self) -> anyio.CancelScope:
        cancel_scope = self._cancel_scope.__enter__()
        if self._signal.aborted:
            self._on_abort(self._signal)
        else:
            self._remove = self._signal.add_listener(self._on_abort)
        return cancel_scope

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool:
        self._remove()
        self._remove = _noop
        # Only swallows our own cancellation; outer cancellation and other errors
        # propagate from here (we return False and the with statement re-raises).
        swallowed = self._cancel_scope.__exit__(exc_type, exc_val, exc_tb)
        if swallowed and self._fired and self._cancel_scope.cancelled_caught:
            raise self._signal._abort_error()
        return swallowed
