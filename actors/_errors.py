"""Errors of the actor host."""

from __future__ import annotations

from ledger import LedgerClosedError


class HostClosedError(LedgerClosedError, RuntimeError):
    """The host is not running (not entered yet, or stopped), or closed before a call's
    intent ended.

    The durable work is not affected: another host runs it, and
    ``agent.wait_for_intent(intent_event_id)`` follows it from any process. It is a
    ``ledger.LedgerClosedError`` too, which is what the ledger store itself raises when it
    is not open.

    Attributes:
        actor_id: the actor the call was made on, if any.
        intent_event_id: the intent's id if it was recorded, else None.
    """

    def __init__(self, actor_id: str | None = None, intent_event_id: int | None = None) -> None:
        self.actor_id = actor_id
        self.intent_event_id = intent_event_id
        if intent_event_id is None or actor_id is None:
            what = (
                "the host is not running (not entered yet, or stopped); enter it with"
                " `async with ActorHost(...)` first"
            )
        else:
            what = (
                f"the host closed before intent {intent_event_id} of actor {actor_id!r} ended; "
                "the work goes on durably (follow it with agent.wait_for_intent)"
            )
        Exception.__init__(self, what)  # (LedgerClosedError's own message is the store's)
