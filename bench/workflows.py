"""Workflows: the overhead of a recorded step, and what sleeping runs cost.

    .venv/bin/python bench/workflows.py [--steps 2000] [--runs 10000] [--actors 100]

(a) per-step overhead: one run of a workflow that calls a no-op step ``--steps`` times, timed
    from ``start`` to its result, against calling the same step function directly as often.
    Each recorded step is one token-checked write of its result (and the replays after sleeps
    would read them back; this run does not sleep).
(b) sleeping runs: ``--runs`` runs over ``--actors`` actors, each records one step and then
    sleeps for an hour. Once every run is asleep: how many attempts are running (should be 0),
    how many asyncio tasks exist, resident memory now and at its peak, and file descriptors.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import anyio
from _common import environment, metric, open_fds, peak_rss_mib, quiet_logs, rate

from actors import ActorHost, define_agent_do
from ledger import IntentStatus
from triggers.workflows import Run, sleep, start, step, workflow


@step
async def noop(index: int) -> int:
    return index


@workflow(name="bench.many_steps")
async def many_steps(count: int) -> int:
    total = 0
    for index in range(count):
        total += await noop(index)
    return total


@workflow(name="bench.nap")
async def nap(index: int) -> int:
    await noop(index)
    await sleep("1h")
    return index


SPEC = define_agent_do(workflows=[many_steps, nap])


def rss_mib() -> float:
    """Resident set size of this process now, MiB."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * 4096 / (1024 * 1024)


async def step_overhead(data_dir: Path, steps: int) -> None:
    started = time.perf_counter()
    for index in range(steps):
        await noop(index)
    direct = time.perf_counter() - started
    async with ActorHost(SPEC, data_dir=data_dir) as host:
        began = time.perf_counter()
        run = await start(many_steps, [steps], actor=host.get("bench:steps"))
        with anyio.fail_after(600):
            total = await run.result()
        elapsed = time.perf_counter() - began
    if total != steps * (steps - 1) // 2:
        raise SystemExit(f"wrong result {total}")
    metric("recorded steps", f"{steps} in {elapsed:.3f} s ({rate(steps, elapsed)})")
    metric("per recorded step", f"{elapsed / steps * 1e6:,.0f} µs")
    metric("per direct call", f"{direct / steps * 1e6:,.2f} µs")


async def sleeping_runs(data_dir: Path, runs: int, actors: int) -> None:
    before = rss_mib()
    async with ActorHost(SPEC, data_dir=data_dir) as host:
        began = time.perf_counter()
        started: list[Run] = []

        async def starter(first: int) -> None:
            for index in range(first, runs, 50):
                agent = host.get(f"bench:nap:{index % actors}")
                started.append(await start(nap, [index], actor=agent))

        async with anyio.create_task_group() as tg:
            for first in range(50):
                tg.start_soon(starter, first)
        metric("started", f"{runs} runs in {time.perf_counter() - began:.1f} s")
        # Asleep once no attempt runs and each actor's runs are pending again.
        assert host.scheduler is not None
        with anyio.fail_after(900):
            while True:
                await anyio.sleep(1)
                if list(host.scheduler.running_attempts()):
                    continue
                pending = 0
                for actor in range(actors):
                    intents = await host.get(f"bench:nap:{actor}").intents(status="pending")
                    pending += len(intents)
                if pending == runs:
                    break
        metric("asleep", f"{runs} runs after {time.perf_counter() - began:.1f} s")
        metric("running attempts", len(list(host.scheduler.running_attempts())))
        metric("asyncio tasks", len(asyncio.all_tasks()))
        metric("rss now", f"{rss_mib():.0f} MiB (before the host: {before:.0f} MiB)")
        metric("rss peak", f"{peak_rss_mib():.0f} MiB")
        metric("open fds", open_fds())
        sample = await started[0].status()
        if sample is not IntentStatus.PENDING:
            raise SystemExit(f"a run is {sample}, expected pending (asleep)")


async def main(steps: int, runs: int, actors: int) -> None:
    metric("environment", environment())
    with tempfile.TemporaryDirectory(prefix="bench-workflows-") as tmp:
        await step_overhead(Path(tmp) / "steps", steps)
        await sleeping_runs(Path(tmp) / "naps", runs, actors)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--actors", type=int, default=100)
    args = parser.parse_args()
    quiet_logs()
    anyio.run(main, args.steps, args.runs, args.actors)
