"""End-to-end throughput: no-op triggers per second across many actors, against raw SQLite.

    .venv/bin/python bench/throughput.py [--actors 100] [--intents 20000]
                                         [--callers 100 1000] [--synchronous NORMAL FULL]
                                         [--raw-seconds 3] [--profile]

Concurrent caller tasks enqueue the intents one ``enqueue_trigger`` call at a time, each
waiting for its call, round-robin over the actors; the host's scheduler in the same process
(``ActorHost`` defaults) claims, runs and settles them. The clock runs from the first enqueue
until every intent is terminal. In the same run, the physical limit is measured: stdlib
``sqlite3`` doing one event insert + one row update per transaction (``_common.raw_sqlite_rate``)
with the same durability setting; ``ratio`` is end-to-end / raw.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from _common import (
    ThreadProfile,
    environment,
    loadavg,
    metric,
    one_trigger_spec,
    quiet_logs,
    rate,
    raw_sqlite_rate,
)

from actors import ActorHost, AgentSpec

if TYPE_CHECKING:
    from ledger import JSON, Committed
    from triggers import Cancellation, TriggerContext, Tx

KIND = "bench.noop"
HUEY_ANCHOR = 865.0
"""Huey (SqliteHuey, 2 thread workers) end-to-end no-op tasks/s on this machine (median,
perf-baselines.md §2)."""

# The intent payload: about 200 bytes of JSON, like the raw baseline's event.
PAD = "x" * 170


class Counter:
    """Completed intents, counted by ``commit`` on the ledger worker thread."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def add(self) -> None:
        with self._lock:
            self.value += 1


def make_spec(counter: Counter) -> AgentSpec:
    """An actor class with one no-op trigger whose commit writes one fact and counts."""

    def parse(payload: JSON) -> JSON:
        return payload

    async def acquire(intent: JSON, ctx: TriggerContext) -> JSON:
        return None

    def commit(outcome: JSON, tx: Tx) -> None:
        tx.insert_event(kind="bench.done", payload={"ok": True})
        counter.add()

    def commit_cancelled(intent: JSON, cancellation: Cancellation, tx: Tx) -> None:
        tx.insert_event(kind="bench.cancelled", payload=None)

    return one_trigger_spec(KIND, parse, acquire, commit, commit_cancelled)


async def end_to_end(
    data_dir: Path,
    *,
    actors: int,
    intents: int,
    callers: int,
    synchronous: str,
    shards: int,
    profile: ThreadProfile | None,
) -> tuple[float, float]:
    """Run one end-to-end pass; returns (seconds until all terminal, seconds enqueueing)."""
    counter = Counter()
    spec = make_spec(counter)
    async with ActorHost(spec, data_dir=data_dir, synchronous=synchronous, shards=shards) as host:
        agents = [host.get(f"bench-{a}") for a in range(actors)]
        all_done = anyio.Event()

        def on_commit(committed: list[Committed]) -> None:
            # Runs on the event loop after each batch has committed.
            if counter.value >= intents:
                all_done.set()

        host.store.add_commit_listener(on_commit)
        numbers = iter(range(intents))

        async def caller() -> None:
            for n in numbers:
                await agents[n % actors].enqueue_trigger(
                    trigger_kind=KIND, payload={"n": n, "pad": PAD}
                )

        with anyio.fail_after(600):
            started = time.perf_counter()
            with ThreadProfile.maybe(profile):
                async with anyio.create_task_group() as tg:
                    for _ in range(callers):
                        tg.start_soon(caller)
                enqueued = time.perf_counter()
                await all_done.wait()
                finished = time.perf_counter()

        # Check (outside the clock) that every intent really is completed in its ledger.
        completed = 0
        for agent in agents:
            completed += len(await agent.intents(status="completed"))
        if completed != intents or counter.value != intents:
            raise SystemExit(
                f"only {completed} of {intents} intents completed (commits counted: "
                f"{counter.value})"
            )
    return finished - started, enqueued - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--actors", type=int, default=100)
    parser.add_argument("--intents", type=int, default=20_000)
    parser.add_argument("--callers", type=int, nargs="+", default=[100, 1000])
    parser.add_argument(
        "--synchronous", nargs="+", choices=["NORMAL", "FULL"], default=["NORMAL", "FULL"]
    )
    parser.add_argument("--raw-seconds", type=float, default=3.0)
    parser.add_argument(
        "--shards", type=int, default=1, help="ActorHost shards (default: the default, 1)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the end-to-end runs (slower)"
    )
    args = parser.parse_args()
    quiet_logs()
    metric("environment", environment())
    metric(
        "config",
        f"actors={args.actors} intents={args.intents} callers={args.callers} shards={args.shards}",
    )
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        root = Path(tmp)
        for synchronous in args.synchronous:
            mode = synchronous.lower()
            raw = raw_sqlite_rate(root / f"raw-{mode}.db", synchronous, seconds=args.raw_seconds)
            metric(f"raw_sqlite_{mode}", f"{raw:,.0f} writes/s")
            for callers in args.callers:
                profile = ThreadProfile() if args.profile else None
                run = functools.partial(
                    end_to_end,
                    root / f"e2e-{mode}-{callers}",
                    actors=args.actors,
                    intents=args.intents,
                    callers=callers,
                    synchronous=synchronous,
                    shards=args.shards,
                    profile=profile,
                )
                total, enqueue = anyio.run(run)
                name = f"{mode}_callers{callers}"
                e2e = args.intents / total
                metric(f"end_to_end_{name}", f"{e2e:,.0f} intents/s ({total:.3f} s)")
                metric(f"enqueue_{name}", rate(args.intents, enqueue))
                metric(f"ratio_{name}", f"{e2e / raw:.3f} (target >= 0.5)")
                metric(f"x_huey_{name}", f"{e2e / HUEY_ANCHOR:.1f} (target >= 8)")
                metric(f"loadavg_after_{name}", loadavg())
                if profile is not None:
                    profile.report(25, elapsed=total)


if __name__ == "__main__":
    main()
