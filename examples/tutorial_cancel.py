"""Durable Trigger Cancel: define a cooperative trigger, enqueue it, cancel it, read the fact.

Run it with ``python3 dev.py demo``. It walks through the tutorial twice: once cancelling work
that has not started (``cancelled``), once cancelling work that is running (``requested``,
then the ``acquire`` sees its signal abort and ``commit_cancelled`` records the fact), and
shows the other answers ``cancel_trigger`` can give.

``tutorial_cancel.py [DATA_DIR]`` keeps its ledgers in DATA_DIR (a new temporary directory if
not given) and leaves them there, printing the ``actors`` commands that show them.
"""

from __future__ import annotations

import functools
import shlex
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import structlog
from pydantic import BaseModel

from actors import ActorHost, define_agent_do

if TYPE_CHECKING:
    from triggers import Cancellation, DurableTrigger, TriggerContext, Tx


class TutorialIntent(BaseModel):
    id: str
    steps: int = 50


class TutorialOutcome(BaseModel):
    id: str
    steps_done: int


async def run_external_work(intent: TutorialIntent, ctx: TriggerContext) -> TutorialOutcome:
    """Stand-in for an LLM call or an HTTP request: slow, and it honours the signal."""
    with ctx.signal.scope():  # raises AbortError(reason) as soon as the signal aborts
        for step in range(intent.steps):
            await ctx.stream.write({"step": step})
            await anyio.sleep(0.05)
    return TutorialOutcome(id=intent.id, steps_done=intent.steps)


def commit(outcome: TutorialOutcome, tx: Tx) -> None:
    tx.insert_event(kind="tutorial.cancelable.done", payload=outcome.model_dump())


def commit_cancelled(intent: TutorialIntent, cancellation: Cancellation, tx: Tx) -> None:
    tx.insert_event(
        kind="tutorial.cancelable.cancelled",
        payload={"id": intent.id, "reason": cancellation.reason},
    )


# 1. Define a cooperative trigger.
trigger: DurableTrigger[TutorialIntent, TutorialOutcome] = {
    "kind": "tutorial.cancelable",
    "intent_event_kind": "tutorial.cancelable.requested",
    "cancellation": "cooperative",
    "parse_intent": TutorialIntent,
    "acquire": run_external_work,
    "commit": commit,
    "commit_cancelled": commit_cancelled,
}


async def write_audit_line(intent: dict[str, str], ctx: TriggerContext) -> dict[str, str]:
    return intent


# A trigger that must always run to the end declares that cancellation is ignored.
audit_trigger: DurableTrigger[dict[str, str], dict[str, str]] = {
    "kind": "tutorial.audit",
    "intent_event_kind": "tutorial.audit.requested",
    "cancellation": "ignored",
    "parse_intent": dict,
    "acquire": write_audit_line,
    "commit": lambda outcome, tx: None,
    "commit_cancelled": lambda intent, cancellation, tx: None,
}

# 2. Register it.
AgentDO = define_agent_do(bindings={}, triggers=[trigger, audit_trigger])


LABEL_WIDTH = len("cancel_trigger, cancellation ignored")
"""The width of the label column: its longest label."""


def say(step: str, **values: object) -> None:
    detail = "  ".join(f"{k}={v}" for k, v in values.items())
    print(f"{step:<{LABEL_WIDTH}}  {detail}")


def actors_command() -> str:
    """The ``actors`` command installed with this Python (``.venv/bin/actors`` under
    ``python3 dev.py demo``), by its full path: it need not be on ``PATH``."""
    script = Path(sys.executable).parent / "actors"
    if script.exists():
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m actors"


async def main(data_dir: str, *, temporary: bool = False) -> None:
    async with ActorHost(AgentDO, data_dir=data_dir) as host:
        agent = host.get("chat:123")

        # 3. Enqueue work for a minute from now, and keep the returned intent id.
        later = datetime.now(UTC) + timedelta(minutes=1)
        intent = await agent.enqueue_trigger(
            trigger_kind="tutorial.cancelable", payload={"id": "job-1"}, at=later
        )
        say("enqueued (due in a minute)", intent_id=intent.id)

        # 4. Request cancellation: it has not started, so it is cancelled right here.
        cancel = await agent.cancel_trigger(
            trigger_kind="tutorial.cancelable", intent_event_id=intent.id, reason="user"
        )
        say("cancel_trigger on pending work", status=cancel.status)

        # Now work that is running: enqueue for now and wait until it streams progress.
        running = await agent.enqueue_trigger(
            trigger_kind="tutorial.cancelable", payload={"id": "job-2"}
        )
        say("enqueued (due now)", intent_id=running.id)
        async for chunk in agent.stream(running.id):
            say("  acquire is running", progress=chunk)
            break
        cancel = await agent.cancel_trigger(
            trigger_kind="tutorial.cancelable", intent_event_id=running.id, reason="user"
        )
        say("cancel_trigger on running work", status=cancel.status)
        state = await agent.wait_for_intent(running.id)
        say("  the attempt settled", status=state.status, cancel_reason=state.cancel_reason)

        # The other answers.
        again = await agent.cancel_trigger(
            trigger_kind="tutorial.cancelable", intent_event_id=running.id
        )
        say("cancel_trigger again", status=again.status, terminal=again.terminal_status)
        missing = await agent.cancel_trigger(
            trigger_kind="tutorial.cancelable", intent_event_id=10_000
        )
        say("cancel_trigger on an unknown id", status=missing.status)
        audit = await agent.enqueue_trigger(trigger_kind="tutorial.audit", payload={"who": "me"})
        ignored = await agent.cancel_trigger(
            trigger_kind="tutorial.audit", intent_event_id=audit.id
        )
        say("cancel_trigger, cancellation ignored", status=ignored.status)

        # 5. Read the ledger for the terminal cancellation facts.
        for event in await agent.events(kinds=["tutorial.cancelable.cancelled"]):
            say("fact in the ledger", id=event.id, kind=event.kind, payload=event.payload)

    # The ledgers stay, to be looked at: they are ordinary files in the data directory.
    where = shlex.quote(str(host.data_dir))
    actors = actors_command()
    kept = "left in a temporary directory" if temporary else "kept"
    print(f"\nThe ledgers (one SQLite file per actor) are {kept}: {host.data_dir}")
    print("Look at them with the actors command:")
    print(f"  {actors} inspect {where}")
    print(f"  {actors} events chat:123 --data-dir {where}")
    if temporary:
        print(f"Remove the directory when done: rm -r {where}")


if __name__ == "__main__":
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    if len(sys.argv) > 1:
        anyio.run(main, sys.argv[1])
    else:
        anyio.run(functools.partial(main, temporary=True), tempfile.mkdtemp(prefix="tutorial-"))
