"""PostgreSQL backend throughput: 1, 2 and 4 host processes on one database, beside raw
asyncpg ledger transactions on the same server.

    .venv/bin/python bench/postgres.py [--database-url URL] [--intents 8000] [--actors 100]
                                       [--hosts 1 2 4] [--callers 100] [--raw-seconds 3]

Without ``--database-url`` a throwaway server is started from the installed PostgreSQL
binaries (fsync on, default durability: every commit is flushed).

End to end: each host process (``ActorHost(database_url=...)``, default settings) enqueues
its share of the no-op intents from ``--callers`` concurrent caller tasks, one
``enqueue_trigger`` call at a time, round-robin over actors shared by every host; every
host's scheduler claims whatever is due, wherever it was enqueued. The clock runs from the
"go" line sent to all hosts until every intent has its terminal fact.

CPU per intent, over the same span: the host processes', and the server's (its processes on
this machine, the watching connection included). Hosts added on other machines bring their
own CPU; the server's share is what they all draw on.

The limit: asyncpg doing one event insert + one row update per transaction, on 1 and on 8
connections, on the same server (tables shaped like the ledger's).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import asyncpg
from _common import (
    cpu_seconds,
    environment,
    loadavg,
    metric,
    one_trigger_spec,
    postgres_url,
    quiet_logs,
)
from anyio.streams.buffered import BufferedByteReceiveStream

from actors import ActorHost
from ledger._pg import DUE, LEASE  # the due-scan index keys (internal, like this bench)
from ledger.postgres import SCHEMA

if TYPE_CHECKING:
    from anyio.abc import Process

    from ledger import JSON
    from triggers import Cancellation, TriggerContext, Tx

KIND = "bench.noop"
DONE = "bench.done"
PAD = "x" * 170
PROCRASTINATE_ANCHOR = (170.0, 230.0)
"""procrastinate end-to-end jobs/s on this kind of machine (the issue's measurement)."""


# -- the raw limit ------------------------------------------------------------------------------


async def raw_rate(url: str, connections: int, seconds: float) -> float:
    """Transactions/s of (insert one event + update one row) over ``connections``."""
    setup = await asyncpg.connect(url)
    try:
        await setup.execute(
            "DROP TABLE IF EXISTS raw_events, raw_rows;"
            "CREATE TABLE raw_events (actor_id text, id bigint, ts bigint, kind text,"
            " payload text, PRIMARY KEY (actor_id, id));"
            "CREATE TABLE raw_rows (actor_id text, id bigint, status text, attempts int,"
            " PRIMARY KEY (actor_id, id));"
        )
        await setup.executemany(
            "INSERT INTO raw_rows VALUES ($1, $2, 'pending', 0)",
            [(f"a{n}", 0) for n in range(connections)],
        )
    finally:
        await setup.close()
    counts = [0] * connections
    deadline = time.perf_counter() + seconds

    async def worker(n: int) -> None:
        conn = await asyncpg.connect(url)
        actor = f"a{n}"
        try:
            while time.perf_counter() < deadline:
                counts[n] += 1
                async with conn.transaction():
                    await conn.execute(
                        "INSERT INTO raw_events VALUES ($1, $2, $3, 'x', $4)",
                        actor,
                        counts[n],
                        counts[n],
                        PAD,
                    )
                    await conn.execute(
                        "UPDATE raw_rows SET attempts = attempts + 1 WHERE actor_id = $1"
                        " AND id = 0",
                        actor,
                    )
        finally:
            await conn.close()

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for n in range(connections):
            tg.start_soon(worker, n)
    return sum(counts) / (time.perf_counter() - start)


# -- a host process -----------------------------------------------------------------------------


def host_main(url: str, intents: int, actors: int, callers: int, offset: int) -> None:
    """Child mode: serve, wait for "go", enqueue ``intents``, serve until stdin closes."""
    quiet_logs()

    async def acquire(intent: JSON, ctx: TriggerContext) -> JSON:
        return None

    def commit(outcome: JSON, tx: Tx) -> None:
        tx.insert_event(kind=DONE, payload=None)

    def commit_cancelled(intent: JSON, cancellation: Cancellation, tx: Tx) -> None:
        tx.insert_event(kind="bench.cancelled", payload=None)

    def parse(payload: JSON) -> JSON:
        return payload

    spec = one_trigger_spec(KIND, parse, acquire, commit, commit_cancelled)

    async def serve() -> None:
        async with ActorHost(spec, database_url=url) as host:
            print("ready", flush=True)
            await anyio.to_thread.run_sync(sys.stdin.readline)
            queue = list(range(intents))

            async def caller() -> None:
                while queue:
                    n = queue.pop()
                    agent = host.get(f"actor-{(n + offset) % actors}")
                    await agent.enqueue_trigger(trigger_kind=KIND, payload={"pad": PAD})

            async with anyio.create_task_group() as tg:
                for _ in range(callers):
                    tg.start_soon(caller)
            print("enqueued", flush=True)
            await anyio.to_thread.run_sync(sys.stdin.read)

    anyio.run(serve)


class Host:
    def __init__(self, process: Process) -> None:
        self.process = process
        assert process.stdout is not None
        self._lines = BufferedByteReceiveStream(process.stdout)

    async def expect(self, word: str) -> None:
        with anyio.fail_after(120):
            line = (await self._lines.receive_until(b"\n", 4096)).decode().strip()
        if line != word:
            raise SystemExit(f"host said {line!r}, expected {word!r}")

    async def send(self, text: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send(text.encode())

    async def stop(self) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.aclose()
        with anyio.fail_after(60):
            await self.process.wait()


def _server_cpu(pids: list[int]) -> dict[int, float]:
    """CPU seconds used so far by those of ``pids`` that are PostgreSQL processes of this
    machine (none if the server is elsewhere)."""
    found = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"postgres" not in fh.read():
                    continue
            found[pid] = cpu_seconds(pid)
        except OSError:
            continue
    return found


async def _server_pids(conn: asyncpg.Connection) -> list[int]:
    """The server's processes: backends and background workers."""
    return [row[0] for row in await conn.fetch("SELECT pid FROM pg_stat_activity")]


async def end_to_end(
    url: str, hosts: int, intents: int, actors: int, callers: int
) -> tuple[float, float, float | None]:
    """Intents/s with ``hosts`` host processes, and CPU µs per intent of the host processes
    and of the server (None if it runs elsewhere); the database is emptied first."""
    conn = await asyncpg.connect(url)
    try:
        exists = await conn.fetchval("SELECT to_regclass($1)", f"{SCHEMA}.all_events")
        if exists:
            await conn.execute(
                f"TRUNCATE {SCHEMA}.all_events, {SCHEMA}.all_intents, {SCHEMA}.actor_ledgers,"
                f" {SCHEMA}.all_projections, {SCHEMA}.all_stream_chunks, {SCHEMA}.processes"
            )
        procs: list[Host] = []
        share = intents // hosts
        for n in range(hosts):
            process = await anyio.open_process(
                [sys.executable, str(Path(__file__).resolve()), "--child", url, str(share),
                 str(actors), str(max(1, callers // hosts)), str(n * share)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
            )  # fmt: skip
            procs.append(Host(process))
        for host in procs:
            await host.expect("ready")
        host_cpu = sum(cpu_seconds(host.process.pid) for host in procs)
        server_cpu = _server_cpu(await _server_pids(conn))
        start = time.perf_counter()
        for host in procs:
            await host.send("go\n")
        total = share * hosts
        for host in procs:
            await host.expect("enqueued")
        # Every intent is recorded; the run ends when none is pending or running. Both are
        # read through the indexes the scheduler's scan for due actors uses, so watching
        # costs the server next to nothing (a count of the done facts would scan the growing
        # events table).
        while await conn.fetchval(
            f"SELECT EXISTS (SELECT 1 FROM {SCHEMA}.all_intents WHERE {DUE} IS NOT NULL)"
            f" OR EXISTS (SELECT 1 FROM {SCHEMA}.all_intents WHERE {LEASE} IS NOT NULL)"
        ):
            await anyio.sleep(0.01)
        elapsed = time.perf_counter() - start
        host_cpu = sum(cpu_seconds(host.process.pid) for host in procs) - host_cpu
        server_end = _server_cpu(await _server_pids(conn))
        server_used = (
            sum(used - server_cpu.get(pid, 0.0) for pid, used in server_end.items())
            if server_end
            else None
        )
        done = await conn.fetchval(
            f"SELECT count(*) FROM {SCHEMA}.all_events WHERE kind = $1", DONE
        )
        if done != total:
            raise SystemExit(f"{done} intents completed, expected {total}")
        for host in procs:
            await host.stop()
    finally:
        await conn.close()
    per_intent = 1e6 / total
    return (
        total / elapsed,
        host_cpu * per_intent,
        None if server_used is None else server_used * per_intent,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--database-url")
    parser.add_argument("--intents", type=int, default=8000)
    parser.add_argument("--actors", type=int, default=100)
    parser.add_argument("--hosts", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--callers", type=int, default=100)
    parser.add_argument("--raw-seconds", type=float, default=3.0)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        url, intents, actors, callers, offset = args.child
        host_main(url, int(intents), int(actors), int(callers), int(offset))
        return
    quiet_logs()
    metric("environment", environment())
    with postgres_url(args.database_url) as url:
        raw1 = anyio.run(raw_rate, url, 1, args.raw_seconds)
        raw8 = anyio.run(raw_rate, url, 8, args.raw_seconds)
        metric("raw_asyncpg_1_connection", f"{raw1:,.0f} tx/s (insert + update)")
        metric("raw_asyncpg_8_connections", f"{raw8:,.0f} tx/s (insert + update)")
        rates: dict[int, float] = {}
        cpu: dict[int, tuple[float, float | None]] = {}
        for hosts in args.hosts:
            rate, host_cpu, server_cpu = anyio.run(
                end_to_end, url, hosts, args.intents, args.actors, args.callers
            )
            rates[hosts], cpu[hosts] = rate, (host_cpu, server_cpu)
        # The raw rate drifts on a shared VM: measured again after, each ratio is a range.
        raw8_after = anyio.run(raw_rate, url, 8, args.raw_seconds)
        metric("raw_asyncpg_8_connections_after", f"{raw8_after:,.0f} tx/s (insert + update)")
        for hosts, rate in rates.items():
            host_cpu, server_cpu = cpu[hosts]
            ratios = sorted(rate / raw for raw in (raw8, raw8_after))
            low, high = (rate / anchor for anchor in reversed(PROCRASTINATE_ANCHOR))
            metric(
                f"end_to_end_{hosts}_host{'s' if hosts > 1 else ''}",
                f"{rate:,.0f} intents/s = {ratios[0]:.2f}-{ratios[1]:.2f} x raw 8-connection "
                f"before / after (target >= 1), {low:.1f}-{high:.1f} x procrastinate's "
                "170-230 jobs/s (target >= 10)",
            )
            busy = ""
            if server_cpu is not None:
                busy = f" ({(host_cpu + server_cpu) * rate / 1e6:.2f} cores busy)"
            metric(
                f"cpu_per_intent_{hosts}_host{'s' if hosts > 1 else ''}",
                f"hosts {host_cpu:,.0f} us, server "
                + ("elsewhere" if server_cpu is None else f"{server_cpu:,.0f} us")
                + busy,
            )
        if 1 in rates and 2 in rates:
            metric("scaling_1_to_2_hosts", f"{rates[2] / rates[1]:.2f} x (target >= 1.6)")
        host_cpu, server_cpu = cpu.get(1, (0.0, None))
        if 1 in rates and server_cpu is not None:
            # Hosts and server on this machine's cores: at one host's CPU per intent, more
            # hosts can go no faster than all the cores busy.
            cores = (host_cpu + server_cpu) * rates[1] / 1e6
            metric(
                "scaling_ceiling_here",
                f"{(os.cpu_count() or 1) / cores:.2f} x (all {os.cpu_count()} cores busy, at"
                " 1 host's CPU per intent, hosts and server on this machine)",
            )
    metric("cpus", os.cpu_count())
    metric("loadavg_after", loadavg())


if __name__ == "__main__":
    main()
