"""Call handles: durable work you can await, watch and abort, like an SDK call.

Run it with ``.venv/bin/python examples/call_handles.py`` (after ``python3 dev.py demo`` has
made the environment). Each section prints what happened:

1. a call that completes, and its committed facts;
2. a timeout on a long call (``signal=AbortSignal.timeout(...)``);
3. a manual abort from another task (``handle.abort(reason)``);
4. a pre-aborted signal: refused before anything is written;
5. a composite signal (``AbortSignal.any([external, timeout])``), aborted by the user;
6. a shell command (``run_process``) killed when its call is aborted;
7. cancelling only the wait (a cancel scope around ``await handle``): the work goes on.

Aborts here are durable cancels (``cancel_trigger``): they would reach the work in any process
serving the same data directory.
"""

from __future__ import annotations

import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from actors import ActorHost, define_agent_do
from triggers import AbortController, AbortError, AbortSignal, run_process

if TYPE_CHECKING:
    from ledger import JSON
    from triggers import Cancellation, DurableTrigger, TriggerContext, Tx


async def prompt_model(intent: dict[str, Any], ctx: TriggerContext) -> dict[str, Any]:
    """Stand-in for a streaming LLM call: one token every 50 ms, stopped by the signal."""
    tokens = []
    with ctx.signal.scope():
        for index in range(intent["tokens"]):
            await anyio.sleep(0.05)
            tokens.append(f"t{index}")
            await ctx.stream.write(tokens[-1])
    return {"text": " ".join(tokens)}


async def run_shell(intent: dict[str, Any], ctx: TriggerContext) -> dict[str, Any]:
    """Run a shell command; on abort it gets SIGTERM, then SIGKILL after the grace."""
    done = await run_process(intent["cmd"], signal=ctx.signal, grace=2.0)
    return {"returncode": done.returncode, "stdout": done.stdout.decode()}


def commit_done(outcome: JSON, tx: Tx) -> None:
    tx.insert_event(kind="call.done", payload=outcome)


def commit_cancelled(intent: JSON, cancellation: Cancellation, tx: Tx) -> None:
    tx.insert_event(kind="call.cancelled", payload={"reason": cancellation.reason})


def trigger(kind: str, acquire: Any) -> DurableTrigger[Any, Any]:
    return {
        "kind": kind,
        "intent_event_kind": f"{kind}.requested",
        "cancellation": "cooperative",
        "parse_intent": dict,
        "acquire": acquire,
        "commit": commit_done,
        "commit_cancelled": commit_cancelled,
    }


AgentDO = define_agent_do(
    triggers=[trigger("agent.prompt", prompt_model), trigger("agent.shell", run_shell)]
)


def say(section: str, **values: object) -> None:
    detail = "  ".join(f"{k}={v}" for k, v in values.items())
    print(f"{section:<28} {detail}")


async def main(data_dir: str) -> None:
    async with ActorHost(AgentDO, data_dir=data_dir) as host:
        agent = host.get("session:1")

        # 1. A call that completes: awaiting the handle returns the committed facts.
        facts = await agent.call(trigger_kind="agent.prompt", payload={"tokens": 3})
        say("completed", facts=[(f.kind, f.payload) for f in facts])

        # 2. A timeout on a long call.
        handle = agent.call(
            trigger_kind="agent.prompt", payload={"tokens": 1000}, signal=AbortSignal.timeout(0.3)
        )
        try:
            await handle
        except AbortError as error:
            say("timeout", error=error, signal_aborted=handle.signal.aborted)

        # 3. A manual abort from another task.
        handle = agent.call(trigger_kind="agent.prompt", payload={"tokens": 1000})

        async def press_stop() -> None:
            await anyio.sleep(0.2)
            result = await handle.abort("user-cancel")
            say("abort() answered", status=result.status)

        async with anyio.create_task_group() as tg:
            tg.start_soon(press_stop)
            try:
                await handle
            except AbortError as error:
                say("manual abort", reason=error.reason)

        # 4. A pre-aborted signal: nothing is written.
        before = len(await agent.intents())
        try:
            agent.call(trigger_kind="agent.prompt", payload={"tokens": 5},
                       signal=AbortSignal.abort("already done"))  # fmt: skip
        except AbortError as error:
            written = len(await agent.intents()) - before
            say("pre-aborted", reason=error.reason, intents_written=written)

        # 5. A composite signal: the user's controller or a 3 s timeout, whichever is first.
        external = AbortController()
        combined = AbortSignal.any([external.signal, AbortSignal.timeout(3)])
        handle = agent.call(trigger_kind="agent.shell", payload={"cmd": "sleep 30"},
                            signal=combined)  # fmt: skip
        await handle.wait_recorded()
        external.abort("user-requested-stop")
        try:
            await handle
        except AbortError as error:
            say("composite signal", reason=error.reason)

        # 6. A shell command killed on abort: `sleep 30` is stopped within the grace.
        started = time.monotonic()
        handle = agent.call(trigger_kind="agent.shell", payload={"cmd": "sleep 30"})
        await handle.wait_recorded()
        await anyio.sleep(0.2)
        await handle.abort("stop the shell")
        try:
            await handle
        except AbortError as error:
            elapsed = time.monotonic() - started
            say("shell killed", reason=error.reason, seconds=f"{elapsed:.1f}")
        facts = await agent.call(trigger_kind="agent.shell", payload={"cmd": "echo still here"})
        say("next shell command", stdout=facts[-1].payload["stdout"].strip())

        # 7. Cancelling only the wait: the durable work goes on and can be awaited again.
        handle = agent.call(trigger_kind="agent.prompt", payload={"tokens": 20})
        async for _token in agent.stream(await handle.wait_recorded()):
            break  # it is running: it has streamed its first token
        with anyio.move_on_after(0.1):
            await handle
        state = await agent.intent(await handle.wait_recorded())
        say("stopped waiting", intent_status=state.status)
        facts = await handle
        say("awaited again", facts=[f.kind for f in facts])


if __name__ == "__main__":
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    directory = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="call-handles-")
    anyio.run(main, directory)
