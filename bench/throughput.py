"""End-to-end throughput: no-op triggers per second across many actors, against raw SQLite.

    .venv/bin/python bench/throughput.py [--actors 100] [--intents 20000]
                                         [--callers 100 1000] [--synchronous NORMAL FULL]
                                         [--raw-seconds 3] [--profile]

Concurrent caller tasks enqueue the intents one ``enqueue_trigger`` call at a time, each
waiting for its call, round-robin over the actors; the host's scheduler in the same process
(``ActorHost`` defaults) claims, runs and settles them. The clock runs from the first enqueue
until every intent is terminal. In the same run, the physical limit is measured: stdlib
``sqlite3`` doing one event insert + one row update per transaction (``_common.raw_sqlite_rate``)
with the same durability setting; ``ratio`` is end-to-end / raw. For a one-host run,
``cpu_by_thread`` splits the CPU per intent between the event loop and the ledger's shard
threads (which run the SQL and the triggers' commit functions), where ``/proc`` has it.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import multiprocessing.queues
import multiprocessing.synchronize
import os
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
    thread_cpu_seconds,
    thread_split,
)

from actors import ActorHost, AgentSpec

if TYPE_CHECKING:
    from collections.abc import Callable
    from multiprocessing.sharedctypes import Synchronized

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
        self._value = 0
        self._lock = threading.Lock()

    @property
    def value(self) -> int:
        return self._value

    def add(self) -> None:
        with self._lock:
            self._value += 1


class SharedCounter(Counter):
    """Completed intents counted across host processes (any host may run any intent)."""

    def __init__(self, shared: Synchronized[int]) -> None:
        super().__init__()
        self._shared = shared

    @property
    def value(self) -> int:
        return self._shared.value

    def add(self) -> None:
        with self._shared.get_lock():
            self._shared.value += 1


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
) -> tuple[float, float, float, str]:
    """Run one end-to-end pass in this process; returns (seconds until all terminal, seconds
    enqueueing, process CPU seconds over the same span, CPU per intent by thread role)."""
    counter = Counter()
    names = [f"bench-{a}" for a in range(actors)]
    with ThreadProfile.maybe(profile):
        started, enqueued, finished, cpu, split = await _host_run(
            data_dir, names, intents, intents, callers, synchronous, shards, counter, None
        )
    await _check_completed(data_dir, names, intents, counter.value)
    return finished - started, enqueued - started, cpu, split


async def _host_run(
    data_dir: Path,
    names: list[str],
    intents: int,
    total: int,
    callers: int,
    synchronous: str,
    shards: int,
    counter: Counter,
    go: Callable[[], object] | None,
) -> tuple[float, float, float, float, str]:
    """One host: ``callers`` tasks enqueue ``intents`` over ``names`` once ``go()`` returns;
    returns the monotonic times it started, finished enqueueing and saw ``total`` intents
    completed (by any host), its CPU seconds in between, and its CPU per intent by thread
    role (``thread_split``)."""
    spec = make_spec(counter)
    async with ActorHost(spec, data_dir=data_dir, synchronous=synchronous, shards=shards) as host:
        agents = [host.get(name) for name in names]
        all_done = anyio.Event()

        def on_commit(committed: list[Committed]) -> None:
            # Runs on the event loop after each batch has committed.
            if counter.value >= total:
                all_done.set()

        host.store.add_commit_listener(on_commit)
        numbers = iter(range(intents))

        async def caller() -> None:
            for n in numbers:
                await agents[n % len(agents)].enqueue_trigger(
                    trigger_kind=KIND, payload={"n": n, "pad": PAD}
                )

        if go is not None:
            await anyio.to_thread.run_sync(go)
        with anyio.fail_after(600):
            started = time.monotonic()
            cpu_started = _cpu_seconds()
            threads_started = thread_cpu_seconds()
            async with anyio.create_task_group() as tg:
                for _ in range(callers):
                    tg.start_soon(caller)
            enqueued = time.monotonic()
            while counter.value < total:
                # Another host may land the last commits: look again now and then.
                with anyio.move_on_after(0.005 if go is not None else 600):
                    await all_done.wait()
            finished = time.monotonic()
            cpu = _cpu_seconds() - cpu_started
            split = thread_split(threads_started, thread_cpu_seconds(), intents)
    return started, enqueued, finished, cpu, split


async def _check_completed(data_dir: Path, names: list[str], intents: int, counted: int) -> None:
    """Check (outside the clock) that every intent really is completed in its ledger."""
    spec = make_spec(Counter())
    completed = 0
    async with ActorHost(spec, data_dir=data_dir, run_scheduler=False) as client:
        for name in names:
            completed += len(await client.get(name).intents(status="completed"))
    if completed != intents or counted != intents:
        raise SystemExit(
            f"only {completed} of {intents} intents completed (commits counted: {counted})"
        )


def multi_host(
    data_dir: Path, *, hosts: int, actors: int, intents: int, callers: int, synchronous: str
) -> tuple[float, float]:
    """Run one end-to-end pass with ``hosts`` host processes on one ``data_dir``, each with
    its share of the actors and callers; returns (seconds until all terminal, CPU seconds of
    all hosts over their clocked spans)."""
    context = multiprocessing.get_context("spawn")
    shared = context.Value("q", 0)
    barrier = context.Barrier(hosts + 1)  # every host open, then all start at once
    results: multiprocessing.queues.Queue[tuple[float, float, float, float, str]] = context.Queue()
    processes = [
        context.Process(
            target=_host_process,
            args=(
                data_dir,
                [f"bench-{a}" for a in range(index, actors, hosts)],
                intents // hosts + (index < intents % hosts),
                intents,
                callers // hosts,
                synchronous,
                shared,
                barrier,
                results,
            ),
        )
        for index in range(hosts)
    ]
    for process in processes:
        process.start()
    barrier.wait(timeout=600)
    spans = [results.get(timeout=600) for _ in processes]
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise SystemExit(f"a host process failed (exit code {process.exitcode})")
    names = [f"bench-{a}" for a in range(actors)]
    anyio.run(_check_completed, data_dir, names, intents, shared.value)
    seconds = max(span[2] for span in spans) - min(span[0] for span in spans)
    return seconds, sum(span[3] for span in spans)


def _host_process(
    data_dir: Path,
    names: list[str],
    intents: int,
    total: int,
    callers: int,
    synchronous: str,
    shared: Synchronized[int],
    barrier: multiprocessing.synchronize.Barrier,
    results: multiprocessing.queues.Queue[tuple[float, float, float, float, str]],
) -> None:
    """One host process of ``multi_host``: open, wait for the others, run, report its span."""
    quiet_logs()
    results.put(
        anyio.run(
            _host_run,
            data_dir,
            names,
            intents,
            total,
            callers,
            synchronous,
            1,
            SharedCounter(shared),
            functools.partial(barrier.wait, 600),
        )
    )


def _cpu_seconds() -> float:
    """User + system CPU time of this process, every thread."""
    times = os.times()
    return times.user + times.system


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
    parser.add_argument(
        "--hosts",
        type=int,
        nargs="+",
        default=[1, 2],
        help="host processes on one data_dir, each a separate run (1: in this process)",
    )
    args = parser.parse_args()
    quiet_logs()
    metric("environment", environment())
    metric(
        "config",
        f"actors={args.actors} intents={args.intents} callers={args.callers} "
        f"shards={args.shards} hosts={args.hosts}",
    )
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        root = Path(tmp)
        for synchronous in args.synchronous:
            mode = synchronous.lower()
            raw = raw_sqlite_rate(root / f"raw-{mode}.db", synchronous, seconds=args.raw_seconds)
            metric(f"raw_sqlite_{mode}", f"{raw:,.0f} writes/s")
            for callers in args.callers:
                for hosts in args.hosts:
                    data_dir = root / f"e2e-{mode}-{callers}-{hosts}"
                    name = f"{mode}_callers{callers}" + (f"_hosts{hosts}" if hosts > 1 else "")
                    if hosts == 1:
                        profile = ThreadProfile() if args.profile else None
                        run = functools.partial(
                            end_to_end,
                            data_dir,
                            actors=args.actors,
                            intents=args.intents,
                            callers=callers,
                            synchronous=synchronous,
                            shards=args.shards,
                            profile=profile,
                        )
                        total, enqueue, cpu, split = anyio.run(run)
                        metric(f"enqueue_{name}", rate(args.intents, enqueue))
                    else:
                        profile, split = None, None
                        total, cpu = multi_host(
                            data_dir,
                            hosts=hosts,
                            actors=args.actors,
                            intents=args.intents,
                            callers=callers,
                            synchronous=synchronous,
                        )
                    e2e = args.intents / total
                    metric(f"end_to_end_{name}", f"{e2e:,.0f} intents/s ({total:.3f} s)")
                    metric(
                        f"cpu_per_intent_{name}",
                        f"{cpu / args.intents * 1e6:,.0f} us ({cpu / total:.2f} cores busy)",
                    )
                    if split is not None:
                        metric(f"cpu_by_thread_{name}", f"{split} per intent")
                    metric(f"ratio_{name}", f"{e2e / raw:.3f} (target >= 0.5)")
                    metric(f"x_huey_{name}", f"{e2e / HUEY_ANCHOR:.1f} (target >= 8)")
                    metric(f"loadavg_after_{name}", loadavg())
                    if profile is not None:
                        profile.report(25, elapsed=total)


if __name__ == "__main__":
    main()
