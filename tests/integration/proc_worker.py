"""A worker program for the real-process tests: a host or a client on a shared data directory.

Run it as ``python tests/integration/proc_worker.py --data-dir D --role host|client [...]``
with the repository root as the working directory and on ``PYTHONPATH``. It talks to the test
through JSON lines only: commands arrive on stdin, reports leave on stdout (flushed at once,
so the test can synchronize on them); structlog writes its warnings to stderr.

Host: prints ``{"event": "ready", ...}`` once serving, then runs the triggers below until its
stdin closes (then it shuts down gracefully and prints ``{"event": "stopped"}``) or it is
killed. It prints ``{"event": "stopping"}`` when its scheduler begins to shut down. Stdin
commands: ``{"op": "release", "actor": A, "intent": I}`` lets a held ``proc.wait`` acquire
return.

Client (``run_scheduler=False``): prints ``ready``, then answers stdin commands ``enqueue``,
``cancel`` and ``wait`` with one line each (``enqueued``, ``cancel``, ``terminal``). The
``dac_create`` / ``dac_listen`` / ``dac_work`` / ``dac_abort`` commands (``id``, optional
``ttl``, ``grace``, ``reason``) get a ``DistributedAbortController`` (``dac_created``) and
report its signal (``dac_fired``), work stopped by it (``dac_work_stopped``) or an abort sent
(``dac_abort_done``); times are ``time.monotonic_ns()``.

Triggers (the test process imports ``AgentDO`` from here to be a client of the same class):

* ``proc.wait`` prints ``started`` (actor, intent, attempt, redrive, aborted_at_start, pid),
  then waits for its signal, a ``release`` command or ``payload["seconds"]``, whichever comes
  first. When the signal fires it prints ``aborted`` with the reason and raises AbortError.
  Attempts up to ``payload["fail_attempts"]`` then raise RuntimeError (3 attempts at most).
* ``proc.quick`` prints ``started`` and returns at once.
* the workflow ``proc.pipeline(tag)`` runs step one (prints ``wf_step``), then step two (prints
  ``wf_step`` and holds until ``{"op": "release", "actor": "wf:<tag>", "intent": 0}``).

Each commit writes exactly one ``proc.*`` fact per terminal transition, holding the pid of
the process that wrote it.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import math
import os
import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from actors import ActorHost, define_agent_do
from triggers import (
    AbortError,
    AbortSignal,
    DistributedAbortController,
    RetryPolicy,
    SchedulerConfig,
)
from triggers.workflows import step, workflow

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from anyio.abc import TaskGroup

    from ledger import JSON
    from triggers import Cancellation, DurableTrigger, Failure, TriggerContext, Tx

WAIT = "proc.wait"
QUICK = "proc.quick"
DONE = "proc.done"
CANCELLED = "proc.cancelled"
FAILED = "proc.failed"
TERMINAL_KINDS = (DONE, CANCELLED, FAILED)

_releases: dict[tuple[str, int], anyio.Event] = {}


def place(where: str) -> dict[str, Any]:
    """``ActorHost`` options for ``--data-dir``: a directory, or a ``postgresql://`` URL."""
    if where.startswith("postgresql://"):
        return {"database_url": where}
    return {"data_dir": where}


def emit(record: dict[str, Any]) -> None:
    """One JSON line on stdout, flushed: the tests synchronize on these."""
    sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _release_event(actor_id: str, intent_event_id: int) -> anyio.Event:
    key = (actor_id, intent_event_id)
    event = _releases.get(key)
    if event is None:
        event = _releases[key] = anyio.Event()
    return event


def _reason_text(reason: object) -> str | None:
    if reason is None or isinstance(reason, str):
        return reason
    return str(reason)


def _started(intent: JSON, ctx: TriggerContext) -> None:
    emit(
        {
            "event": "started",
            "kind": ctx.trigger_kind,
            "actor": ctx.actor_id,
            "intent": ctx.intent_event_id,
            "attempt": ctx.attempt,
            "redrive": ctx.redrive,
            "aborted_at_start": ctx.signal.aborted,
            "pid": os.getpid(),
        }
    )


def parse_payload(payload: JSON) -> JSON:
    if payload is not None and not isinstance(payload, dict):
        raise ValueError("payload must be an object or null")
    return payload


async def wait_acquire(intent: JSON, ctx: TriggerContext) -> JSON:
    """Hold until the signal aborts, a release command arrives or the payload's seconds pass."""
    _started(intent, ctx)
    seconds = math.inf
    if isinstance(intent, dict) and isinstance(intent.get("seconds"), int | float):
        seconds = float(intent["seconds"])
    release = _release_event(ctx.actor_id, ctx.intent_event_id)
    with anyio.move_on_after(seconds):
        async with anyio.create_task_group() as tg:

            async def until(event_wait: Any) -> None:
                await event_wait()
                tg.cancel_scope.cancel()

            tg.start_soon(until, release.wait)
            tg.start_soon(until, ctx.signal.wait)
    if ctx.signal.aborted:
        emit(
            {
                "event": "aborted",
                "actor": ctx.actor_id,
                "intent": ctx.intent_event_id,
                "reason": _reason_text(ctx.signal.reason),
                "pid": os.getpid(),
            }
        )
        ctx.signal.throw_if_aborted()
    if isinstance(intent, dict) and intent.get("fail_attempts", 0) >= ctx.attempt:
        raise RuntimeError(f"planned failure of attempt {ctx.attempt}")
    return {"pid": os.getpid(), "attempt": ctx.attempt}


async def quick_acquire(intent: JSON, ctx: TriggerContext) -> JSON:
    _started(intent, ctx)
    return {"pid": os.getpid(), "attempt": ctx.attempt}


def commit(outcome: JSON, tx: Tx) -> None:
    tx.insert_event(kind=DONE, payload={"pid": os.getpid(), "outcome": outcome})


def commit_cancelled(intent: JSON, cancellation: Cancellation, tx: Tx) -> None:
    tx.insert_event(kind=CANCELLED, payload={"pid": os.getpid(), "reason": cancellation.reason})


def commit_failed(intent: JSON, failure: Failure, tx: Tx) -> None:
    tx.insert_event(kind=FAILED, payload={"pid": os.getpid(), **failure.model_dump()})


def _trigger(kind: str, acquire: Any) -> DurableTrigger[Any, Any]:
    spec: dict[str, Any] = {
        "kind": kind,
        "intent_event_kind": f"{kind}.requested",
        "cancellation": "cooperative",
        "parse_intent": parse_payload,
        "acquire": acquire,
        "commit": commit,
        "commit_cancelled": commit_cancelled,
        "commit_failed": commit_failed,
        "retry": RetryPolicy(max_attempts=3, initial_backoff=0, jitter=False),
    }
    return spec  # type: ignore[return-value]


@step
async def wf_step_one(tag: str) -> str:
    """Reports that it ran (and where), then returns at once."""
    emit({"event": "wf_step", "step": "one", "tag": tag, "pid": os.getpid()})
    return f"one:{tag}"


@step
async def wf_step_two(tag: str) -> str:
    """Reports that it ran, then holds until a ``release`` command for actor ``wf:<tag>``,
    intent 0."""
    emit({"event": "wf_step", "step": "two", "tag": tag, "pid": os.getpid()})
    await _release_event(f"wf:{tag}", 0).wait()
    return f"two:{tag}"


@workflow(name="proc.pipeline")
async def pipeline(tag: str) -> list[str]:
    """Two recorded steps; the second waits for a release."""
    return [await wf_step_one(tag), await wf_step_two(tag)]


AgentDO = define_agent_do(
    triggers=[_trigger(WAIT, wait_acquire), _trigger(QUICK, quick_acquire)], workflows=[pipeline]
)


# -- the program -----------------------------------------------------------------------------


async def read_commands() -> AsyncIterator[dict[str, Any]]:
    """JSON objects from stdin, one per line, until stdin closes."""
    fd = sys.stdin.fileno()
    os.set_blocking(fd, False)
    buffer = b""
    while True:
        await anyio.wait_readable(fd)
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            continue
        if not chunk:
            return
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.strip():
                yield json.loads(line)


async def _no_cancel_poll(self: ActorHost, scheduler: Any) -> None:
    """Replaces the host's cancel-poll fallback: only a direct wake-up can deliver a cancel."""


def report_stopping(host: ActorHost) -> None:
    """Print ``stopping`` when the host's scheduler begins to shut down (the grace begins)."""
    scheduler = host.scheduler
    assert scheduler is not None
    wait_idle = scheduler._wait_idle  # what ``shutdown`` awaits first
    reported = False

    async def reporting() -> None:
        nonlocal reported
        if scheduler._stopping and not reported:
            reported = True
            emit({"event": "stopping", "pid": os.getpid()})
        await wait_idle()

    scheduler._wait_idle = reporting  # type: ignore[method-assign]


async def run_host(args: argparse.Namespace) -> None:
    if args.no_cancel_poll:
        # Fail loudly if the fallback moved: patching a missing name would prove nothing.
        assert callable(getattr(ActorHost, "_poll_cancels", None)), "cancel poll not found"
        ActorHost._poll_cancels = _no_cancel_poll  # type: ignore[method-assign]
    config = SchedulerConfig(
        lease=args.lease,
        poll_interval=args.poll_interval,
        shutdown_grace=args.shutdown_grace,
        max_redrives=args.max_redrives,
    )
    async with ActorHost(AgentDO, **place(args.data_dir), config=config) as host:
        report_stopping(host)
        emit({"event": "ready", "role": "host", "pid": os.getpid(), "process_id": host.process_id})
        async for command in read_commands():
            if command.get("op") == "release":
                _release_event(str(command["actor"]), int(command["intent"])).set()
    emit({"event": "stopped", "pid": os.getpid()})


async def run_work(controller: DistributedAbortController) -> None:
    """Work that runs until the controller's signal fires (``dac_work``)."""
    emit({"event": "dac_work_started", "id": controller.id, "pid": os.getpid()})
    try:
        with controller.signal.scope():
            await anyio.sleep_forever()
    except AbortError as exc:
        emit({"event": "dac_work_stopped", "id": controller.id, "reason": str(exc.reason),
              "t_ns": time.monotonic_ns()})  # fmt: skip


def listen(controller: DistributedAbortController) -> None:
    """Report when the controller's signal fires (``dac_listen``)."""

    def fired(signal: AbortSignal) -> None:
        emit({"event": "dac_fired", "id": controller.id, "reason": str(signal.reason),
              "t_ns": time.monotonic_ns()})  # fmt: skip

    signal = controller.signal
    if signal.aborted:
        fired(signal)
    else:
        signal.add_listener(fired)


async def distributed_abort(host: ActorHost, command: dict[str, Any], tg: TaskGroup) -> None:
    """The ``dac_*`` commands: create / listen / work / abort a DistributedAbortController."""
    op = command["op"]
    options = {k: command[k] for k in ("ttl", "grace") if k in command}
    controller = await DistributedAbortController.create(command["id"], host=host, **options)
    emit({"event": "dac_created", "id": controller.id, "run_id": controller.run_id, "op": op})
    if op == "dac_listen":
        listen(controller)
    elif op == "dac_work":
        tg.start_soon(run_work, controller)
    elif op == "dac_abort":
        sent = time.monotonic_ns()
        await controller.abort(command.get("reason"))
        emit({"event": "dac_abort_done", "id": controller.id, "t_ns": sent})


async def run_client(args: argparse.Namespace) -> None:
    config = SchedulerConfig(lease=args.lease, poll_interval=args.poll_interval)
    async with (
        ActorHost(AgentDO, **place(args.data_dir), run_scheduler=False, config=config) as c,
        anyio.create_task_group() as tg,
    ):
        emit({"event": "ready", "role": "client", "pid": os.getpid(), "process_id": c.process_id})
        async for command in read_commands():
            op = command.get("op")
            if str(op).startswith("dac_"):
                await distributed_abort(c, command, tg)
                continue
            agent = c.get(str(command["actor"]))
            if op == "enqueue":
                at_ms = command.get("at_ms")
                at = None if at_ms is None else datetime.fromtimestamp(at_ms / 1000, UTC)
                event = await agent.enqueue_trigger(
                    trigger_kind=command["kind"], payload=command.get("payload"), at=at
                )
                emit({"event": "enqueued", "actor": agent.actor_id, "intent": event.id})
            elif op == "cancel":
                result = await agent.cancel_trigger(
                    trigger_kind=command["kind"],
                    intent_event_id=int(command["intent"]),
                    reason=command.get("reason"),
                )
                emit({"event": "cancel", "actor": agent.actor_id, **result.model_dump(mode="json")})
            elif op == "wait":
                state = await agent.wait_for_intent(int(command["intent"]))
                emit(
                    {"event": "terminal", "actor": agent.actor_id, **state.model_dump(mode="json")}
                )
        tg.cancel_scope.cancel()
    emit({"event": "stopped", "pid": os.getpid()})


def main(argv: list[str] | None = None) -> None:
    faulthandler.enable()  # SIGABRT dumps every thread's stack: a test's view of a hang
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data-dir", required=True, help="a directory or a postgresql:// URL")
    parser.add_argument("--role", choices=("host", "client"), required=True)
    parser.add_argument("--lease", type=float, default=3.0, help="claim lease, seconds")
    parser.add_argument("--poll-interval", type=float, default=0.2, help="fallback poll, seconds")
    parser.add_argument("--shutdown-grace", type=float, default=0.5)
    parser.add_argument("--max-redrives", type=int, default=5)
    parser.add_argument(
        "--no-cancel-poll",
        action="store_true",
        help="disable the host's cancel-poll fallback (to prove the direct wake-up path)",
    )
    args = parser.parse_args(argv)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    anyio.run(run_host if args.role == "host" else run_client, args)


if __name__ == "__main__":
    main()
