"""This project's side of the peer comparison: the three workloads on ``ActorHost``.

Runs in the project's ``.venv``, started by ``run.py``:

    .venv/bin/python bench/peers/ours_workloads.py throughput|cancel|race
        [--backend sqlite --dir DIR | --backend postgres --url URL] [--n N] [--workers W] ...

- SQLite: ``ActorHost(data_dir=DIR, synchronous="FULL")`` (WAL, every commit flushed: the
  durability of SqliteHuey's defaults). PostgreSQL: ``ActorHost(database_url=URL)`` (server
  defaults: ``fsync=on``, ``synchronous_commit=on``).
- ``SchedulerConfig(max_concurrency=W)``: at most ``W`` attempts run at once, like ``W`` worker
  threads or a worker concurrency of ``W`` in the peers.
- One actor: the peers have one queue.

Prints one ``PEER-RESULT {json}`` line (see ``_peer_common``).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import one_trigger_spec, quiet_logs
from _peer_common import (
    cancel_offsets,
    emit,
    now,
    parser,
    race_offsets,
    throughput_result,
)

from actors import ActorHost, AgentSpec
from triggers import SchedulerConfig

if TYPE_CHECKING:
    import argparse

    from ledger import JSON
    from triggers import Cancellation, TriggerContext, Tx

KIND = "peers.unit"
SYSTEM = "this project"


class Probe:
    """What the running bodies report: start, the moment they learned of the cancel, end."""

    def __init__(self) -> None:
        self.started: dict[int, anyio.Event] = {}
        self.started_at: dict[int, float] = {}
        self.learned_at: dict[int, float] = {}
        self.finished_at: dict[int, float] = {}
        self.completed = 0
        self.lock = threading.Lock()

    def start_event(self, intent_id: int) -> anyio.Event:
        return self.started.setdefault(intent_id, anyio.Event())


def make_spec(args: argparse.Namespace, probe: Probe) -> AgentSpec:
    """One cooperative trigger whose body depends on the workload."""

    def parse(payload: JSON) -> JSON:
        return payload

    async def acquire(intent: JSON, ctx: TriggerContext) -> JSON:
        if args.workload == "throughput":
            return None
        iid = ctx.intent_event_id
        probe.started_at[iid] = now()
        probe.start_event(iid).set()
        if args.workload == "cancel":
            # Wait for the natural end or the signal, whichever comes first.
            with anyio.move_on_after(args.body_seconds):
                await ctx.signal.wait()
            if ctx.signal.aborted:
                probe.learned_at[iid] = now()
                ctx.signal.throw_if_aborted()
        else:
            with ctx.signal.scope():  # raises AbortError when cancelled
                await anyio.sleep(args.race_seconds)
        probe.finished_at[iid] = now()
        return None

    def commit(outcome: JSON, tx: Tx) -> None:
        tx.insert_event(kind="peers.done", payload=None)
        with probe.lock:
            probe.completed += 1

    def commit_cancelled(intent: JSON, cancellation: Cancellation, tx: Tx) -> None:
        tx.insert_event(kind="peers.cancelled", payload={"reason": cancellation.reason})

    return one_trigger_spec(KIND, parse, acquire, commit, commit_cancelled)


def host_options(args: argparse.Namespace) -> dict[str, Any]:
    """``ActorHost`` options for the backend, with the same worker count as the peers."""
    config = SchedulerConfig(max_concurrency=args.workers)
    if args.backend == "postgres":
        return {"database_url": args.url, "config": config}
    return {"data_dir": args.dir, "synchronous": "FULL", "config": config}


async def throughput(args: argparse.Namespace) -> dict[str, Any]:
    """Enqueue ``n`` no-op intents one call at a time; clock until the last commit landed."""
    probe = Probe()
    async with ActorHost(make_spec(args, probe), **host_options(args)) as host:
        agent = host.get("peers-bench")
        done = anyio.Event()

        def on_commit(_: object) -> None:
            if probe.completed >= args.n:
                done.set()

        host.store.add_commit_listener(on_commit)
        with anyio.fail_after(900):
            started = now()
            for i in range(args.n):
                await agent.enqueue_trigger(trigger_kind=KIND, payload={"i": i})
            enqueued = now()
            await done.wait()
            finished = now()
        completed = len(await agent.intents(status="completed"))
    if completed != args.n:
        raise SystemExit(f"only {completed} of {args.n} intents completed")
    return throughput_result(
        SYSTEM, args.backend, args.n, args.workers, enqueued - started, finished - started
    )


async def cancel_trials(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Cancel a running unit ``offset`` seconds after its body started, or race its end."""
    probe = Probe()
    trials: list[dict[str, Any]] = []
    if args.workload == "cancel":
        offsets = cancel_offsets(args.trials)
    else:
        offsets = race_offsets(args.trials, args.race_seconds)
    async with ActorHost(make_spec(args, probe), **host_options(args)) as host:
        agent = host.get("peers-bench")
        for i, offset in enumerate(offsets):
            with anyio.fail_after(60):
                intent = await agent.enqueue_trigger(trigger_kind=KIND, payload={"i": i})
                await probe.start_event(intent.id).wait()
                await anyio.sleep(max(0.0, probe.started_at[intent.id] + offset - now()))
                called = now()
                result = await agent.cancel_trigger(
                    trigger_kind=KIND, intent_event_id=intent.id, reason="bench"
                )
                returned = now()
                state = await agent.wait_for_intent(intent.id)
            learned = probe.learned_at.get(intent.id)
            finished = probe.finished_at.get(intent.id)
            answer = str(result.status)
            if result.terminal_status is not None:
                answer += f" ({result.terminal_status})"
            trials.append(
                {
                    "offset_s": offset,
                    "answer": answer,
                    "call_s": returned - called,
                    "learned_s": None if learned is None else learned - called,
                    "ran_to_end": finished is not None,
                    "body_finished": finished is not None,
                    "recorded": str(state.status),
                }
            )
    return trials


def main() -> None:
    args = parser(__doc__.split("\n", 1)[0]).parse_args()
    quiet_logs()
    if args.workload == "throughput":
        emit(anyio.run(throughput, args))
        return
    trials = anyio.run(cancel_trials, args)
    emit(
        {
            "system": SYSTEM,
            "backend": args.backend,
            "workload": args.workload,
            "variant": "acquire awaits ctx.signal",
            "trials": trials,
        }
    )


if __name__ == "__main__":
    main()
