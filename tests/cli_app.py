"""An actor class for the CLI tests (``actors ... --app tests.cli_app:AgentDO``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio

from actors import define_agent_do
from tests.helpers import make_trigger

if TYPE_CHECKING:
    from triggers import TriggerContext


def positive(payload: Any) -> Any:
    if not (isinstance(payload, dict) and isinstance(payload.get("n"), int) and payload["n"] > 0):
        raise ValueError("n must be a positive int")
    return payload


async def chatty(intent: Any, ctx: TriggerContext) -> Any:
    """Streams ``n`` chunks, then returns (with ``"hold": true``, once its signal aborts)."""
    for index in range(intent["n"]):
        await ctx.stream.write({"chunk": index})
        await anyio.lowlevel.checkpoint()
    if intent.get("hold"):
        await ctx.signal.wait()
        ctx.signal.throw_if_aborted()
    return {"chunks": intent["n"]}


AgentDO = define_agent_do(triggers=[make_trigger("cli.work", chatty, parse_intent=positive)])
