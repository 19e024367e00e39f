"""``define_agent_do``: the actor class, its bindings, triggers and projections."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ledger import Projection
from triggers import TriggerDefinitionError, TriggerRegistry
from triggers._distributed import ABORT_CONTROLLER_TRIGGER
from triggers._workflow import Workflow, workflow_trigger


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """An actor class: what every actor of it can do. Build it with ``define_agent_do``."""

    registry: TriggerRegistry
    projections: tuple[Projection[Any], ...]
    bindings: Mapping[str, Any] = field(default_factory=dict)


def define_agent_do(
    *,
    bindings: Mapping[str, Any] | Iterable[Any] | None = None,
    triggers: Iterable[object] = (),
    projections: Iterable[Projection[Any]] = (),
    workflows: Iterable[Workflow[Any, Any]] = (),
) -> AgentSpec:
    """Define an actor class (the Durable Object class of the model).

    Args:
        bindings: shared resources handed to every attempt as ``ctx.bindings`` (API clients,
            configuration). A mapping of names to values; an empty list is accepted too.
        triggers: the trigger dicts (``DurableTrigger``) its actors can run. The framework's
            own triggers (``trigger.`` kinds, such as the distributed abort controller's) are
            added to every class.
        projections: folds of the ledger kept current in every write transaction.
        workflows: the ``@workflow`` functions its actors can run (``triggers.workflows``).

    Raises:
        TriggerDefinitionError: a trigger spec is invalid or two share a kind; the message
            names the trigger and the key.
        ValueError: two projections, or two workflows, share a name.
    """
    builtins: list[object] = [ABORT_CONTROLLER_TRIGGER]
    workflow_list = list(workflows)
    if workflow_list:
        builtins.append(workflow_trigger(workflow_list))
    registry = TriggerRegistry(triggers, builtins=builtins)
    if isinstance(projections, Projection):
        raise TypeError("projections must be a list of ledger.Projection: projections=[...]")
    projection_list = list(projections)
    for projection in projection_list:
        if not isinstance(projection, Projection):
            raise TypeError("projections must be ledger.Projection instances")
    names = [p.name for p in projection_list]
    if len(names) != len(set(names)):
        raise ValueError("projection names must be unique")
    if bindings is None:
        bound: Mapping[str, Any] = {}
    elif isinstance(bindings, Mapping):
        bound = dict(bindings)
    else:
        items = list(bindings)
        if items:
            raise TriggerDefinitionError(
                "(actor class)", "bindings", "must be a mapping of names to values"
            )
        bound = {}
    return AgentSpec(
        registry=registry,
        projections=tuple(projection_list),
        bindings=MappingProxyType(dict(bound)),
    )
