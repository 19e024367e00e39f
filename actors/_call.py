"""``CallHandle``: durable work as an awaitable with a signal and an ``abort``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import structlog

from ledger import IntentStatus, LedgerBusyError, LedgerWriteError
from triggers import AbortError, AbortSignal, CancelStatus, Failure, TriggerFailedError
from triggers._abort import reason_text
from triggers._engine import FAILED

from ._errors import HostClosedError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Generator

    from ledger import Event, IntentState
    from triggers import CancelResult

    from ._agent import Agent

__all__ = ["CallHandle"]

_log = structlog.get_logger("actors")
_CLOSING_CANCEL_S = 5.0
"""How long a closing host waits to record a cancel owed to an aborted ``signal=``."""


class CallHandle:
    """One durable call, as returned by ``Agent.call``: await it, watch it, abort it.

    ``await handle`` waits until the intent ends and returns its facts: the events recorded
    with its id after the intent event itself, in order. It raises ``AbortError``
    (``.reason`` is the cancel reason) when the intent was cancelled and
    ``TriggerFailedError`` when it failed.

    Cancelling the awaiting task (a cancel scope or timeout around ``await handle``) only stops
    that wait: the durable work goes on, and the handle can be awaited again. Stopping the
    work is ``await handle.abort(reason)``, or aborting the ``signal=`` given to the call.

    The handle follows its intent from a task of the host until the intent ends; when the host
    closes first, awaiting raises ``HostClosedError`` (the work itself stays durable).
    """

    __slots__ = ("_agent", "_cancel_sent", "_done", "_error", "_external", "_facts",
                 "_intent_event_id", "_recorded", "_remove_listener", "_signal",
                 "_wait_scope", "trigger_kind")  # fmt: skip

    def __init__(
        self,
        agent: Agent,
        trigger_kind: str,
        record: Callable[[], Awaitable[Event]],
        signal: AbortSignal | None,
        start_soon: Callable[..., None],
    ) -> None:
        """Start recording and following the intent (``Agent.call`` builds handles)."""
        self._agent = agent
        self.trigger_kind = trigger_kind
        self._signal = AbortSignal()
        self._intent_event_id: int | None = None
        self._recorded = anyio.Event()
        self._done = anyio.Event()
        self._facts: list[Event] = []
        self._error: BaseException | None = None
        self._external: AbortSignal | None = None
        self._cancel_sent = False
        self._wait_scope: anyio.CancelScope | None = None
        self._remove_listener: Callable[[], None] | None = None
        if signal is not None:
            self._remove_listener = signal.add_listener(self._on_external_abort)
        start_soon(self._run, record)

    def __repr__(self) -> str:
        state = "done" if self._done.is_set() else "running"
        return (
            f"<CallHandle {self._agent.actor_id!r} {self.trigger_kind!r} "
            f"intent={self._intent_event_id} {state}>"
        )

    @property
    def actor_id(self) -> str:
        """The actor that owns the work."""
        return self._agent.actor_id

    @property
    def intent_event_id(self) -> int | None:
        """The intent's id once it is recorded; ``None`` before (see ``wait_recorded``)."""
        return self._intent_event_id

    @property
    def signal(self) -> AbortSignal:
        """Aborts when the work is cancelled, by anyone, from any process.

        It fires once a cancel is recorded for the intent (or the intent ended cancelled),
        with the recorded cancel reason. A trigger that ignores cancellation never fires it.
        """
        return self._signal

    def done(self) -> bool:
        """Whether the outcome is known (awaiting the handle will not block)."""
        return self._done.is_set()

    async def wait_recorded(self) -> int:
        """Wait until the intent is recorded; returns its id.

        Raises:
            Exception: whatever recording raised (a ledger error, ``HostClosedError``).
        """
        await self._recorded.wait()
        if self._intent_event_id is None:
            assert self._error is not None
            raise self._error
        return self._intent_event_id

    async def result(self) -> list[Event]:
        """Wait for the intent to end; the same as ``await handle``.

        Returns:
            The events recorded with the intent's id after the intent event, in order (what
            its commit wrote, with any framework facts such as ``trigger.cancel_requested``).

        Raises:
            AbortError: the intent was cancelled; ``.reason`` is the cancel reason.
            TriggerFailedError: the intent failed; ``.failure`` says why.
            HostClosedError: the host closed before the intent ended.
        """
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return list(self._facts)

    def __await__(self) -> Generator[object, None, list[Event]]:
        return self.result().__await__()

    async def abort(self, reason: str | None = None) -> CancelResult:
        """Cancel the work durably through ``cancel_trigger``; returns its ``CancelResult``.

        Waits for the intent to be recorded first. When the cancel is recorded (``cancelled``
        or ``requested``), ``signal`` has fired by the time this returns.

        Raises:
            TypeError: ``reason`` is not a str or None.
            Exception: whatever recording the intent raised.
        """
        if reason is not None and not isinstance(reason, str):
            raise TypeError("reason must be a str or None")
        intent_event_id = await self.wait_recorded()
        result = await self._agent.cancel_trigger(
            trigger_kind=self.trigger_kind, intent_event_id=intent_event_id, reason=reason
        )
        if result.status in (CancelStatus.CANCELLED, CancelStatus.REQUESTED):
            # The first recorded reason wins: fire the signal with that one.
            self._observe(await self._agent.intent(intent_event_id))
        return result

    # -- the follower -------------------------------------------------------------------

    def _on_external_abort(self, signal: AbortSignal) -> None:
        self._external = signal
        if self._wait_scope is not None:
            self._wait_scope.cancel()

    async def _run(self, record: Callable[[], Awaitable[Event]]) -> None:
        try:
            # Shielded: once started, the record lands whatever happens to the host, so the
            # handle always knows the id of an intent that exists.
            with anyio.CancelScope(shield=True):
                event = await record()
            self._intent_event_id = event.id
            self._recorded.set()
            await self._follow(event.id)
        except anyio.get_cancelled_exc_class():
            self._error = HostClosedError(self._agent.actor_id, self._intent_event_id)
            if self._intent_event_id is not None and self._cancel_owed():
                # The host is closing: still turn the external abort into a durable cancel.
                with anyio.CancelScope(shield=True), anyio.move_on_after(_CLOSING_CANCEL_S):
                    await self._send_cancel(self._intent_event_id)
            raise
        except Exception as exc:
            self._error = exc
        finally:
            if self._remove_listener is not None:
                self._remove_listener()
            self._recorded.set()
            self._done.set()

    def _cancel_owed(self) -> bool:
        return self._external is not None and not self._cancel_sent

    async def _send_cancel(self, intent_event_id: int) -> None:
        assert self._external is not None
        await self._agent.cancel_trigger(
            trigger_kind=self.trigger_kind,
            intent_event_id=intent_event_id,
            reason=reason_text(self._external.reason),
        )
        self._cancel_sent = True

    async def _follow(self, intent_event_id: int) -> None:
        agent = self._agent
        store = agent._host.store
        poll = agent._host.poll_interval
        while True:
            version = store.version(agent.actor_id)
            try:
                if self._cancel_owed():
                    await self._send_cancel(intent_event_id)
                state = await agent.intent(intent_event_id)
                self._observe(state)
                if state.status.terminal:
                    await self._settle(state)
                    return
            except (LedgerBusyError, LedgerWriteError) as exc:
                # Another process holds the ledger, or the disk hiccuped: try again shortly
                # (the cancel owed stays owed).
                _log.warning("call_follow_retry", actor=agent.actor_id,
                             intent=intent_event_id, error=str(exc))  # fmt: skip
                await anyio.sleep(poll)
                continue
            with anyio.move_on_after(poll) as scope:
                self._wait_scope = scope
                if not self._cancel_owed():
                    await store.wait_changed(agent.actor_id, version)
            self._wait_scope = None

    def _observe(self, state: IntentState) -> None:
        if state.cancel_requested_at is not None or state.status is IntentStatus.CANCELLED:
            self._signal._abort(state.cancel_reason)

    async def _settle(self, state: IntentState) -> None:
        if state.status is IntentStatus.CANCELLED:
            self._error = AbortError(state.cancel_reason)
            return
        intent_event_id = state.intent_event_id
        facts = await self._agent.events(intent_event_id=intent_event_id, after=intent_event_id)
        if state.status is IntentStatus.COMPLETED:
            self._facts = facts
            return
        failed = [event for event in facts if event.kind == FAILED]
        if failed:
            failure = Failure.model_validate(failed[-1].payload)
        else:  # failed before the framework fact was always written
            failure = Failure(
                error_type="Unknown", message="no trigger.failed fact", attempts=state.attempts
            )
        self._error = TriggerFailedError(failure, facts=facts)
