"""Actors and their host: define an actor class, serve it, and talk to its actors.

AgentDO = define_agent_do(bindings={...}, triggers=[trigger], projections=[...])
async with ActorHost(AgentDO, data_dir="./data") as host:
    agent = host.get("chat:123")
    intent = await agent.enqueue_trigger(trigger_kind="...", payload={...})
    result = await agent.cancel_trigger(trigger_kind="...", intent_event_id=intent.id)
"""

from ._agent import Agent as Agent
from ._call import CallHandle as CallHandle
from ._errors import HostClosedError as HostClosedError
from ._host import ActorHost as ActorHost
from ._spec import AgentSpec as AgentSpec
from ._spec import define_agent_do as define_agent_do

__all__ = ["ActorHost", "Agent", "AgentSpec", "CallHandle", "HostClosedError", "define_agent_do"]
