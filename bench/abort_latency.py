"""Distributed abort latency: from ``DistributedAbortController.abort()`` to its signal firing.

    .venv/bin/python bench/abort_latency.py [--samples 200] [--skip-in-process]
                                            [--postgres [URL]]

(a) in-process: one host holds the signal and aborts the controller itself.
(b) cross-process: a listener subprocess (a client host) reads the signal of controller
    ``bench:<i>`` and prints, on stdout, the CLOCK_MONOTONIC time at which it fired; this
    process, another client, aborts it. CLOCK_MONOTONIC is system-wide on Linux, so the two
    readings compare directly. No process runs a scheduler: an abort needs none.

Each sample uses a fresh controller and waits until the listener's signal is armed (its
follower blocked on the ledger) before aborting. Target: p99 <= 5 ms across processes.

With ``--postgres`` both processes use PostgreSQL (the given URL, or a throwaway server from
the installed binaries) instead of SQLite files.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from _common import (
    add_postgres_option,
    environment,
    metric,
    place_options,
    postgres_url,
    quiet_logs,
    summary_ms,
)
from anyio.streams.buffered import BufferedByteReceiveStream

from actors import ActorHost, define_agent_do
from triggers import AbortSignal, DistributedAbortController

if TYPE_CHECKING:
    from anyio.abc import Process

WARMUP = 5
SPEC = define_agent_do()


def now_ns() -> int:
    """CLOCK_MONOTONIC in nanoseconds (the same clock in every process on the machine)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def note_time(into: list[int], _: AbortSignal) -> None:
    into.append(now_ns())


async def in_process(where: Path | str, samples: int) -> list[float]:
    """Latencies (seconds) from the abort call to the signal, in one process."""
    latencies: list[float] = []
    async with ActorHost(SPEC, **place_options(where), run_scheduler=False) as host:
        for i in range(samples + WARMUP):
            # Its own ids: on PostgreSQL both phases share one database.
            controller = await DistributedAbortController.create(f"bench-in:{i}", host=host)
            fired: list[int] = []
            signal = controller.signal
            signal.add_listener(functools.partial(note_time, fired))
            await anyio.wait_all_tasks_blocked()
            called = now_ns()
            await controller.abort("bench")
            with anyio.fail_after(30):
                await signal.wait()
            if i >= WARMUP:
                latencies.append((fired[0] - called) / 1e9)
    return latencies


def child(where: str) -> None:
    """Subprocess mode: for each ``listen <id>`` line on stdin, arm that controller's signal,
    print ``armed <id>``, then ``fired <id> <ns>`` when it fires."""
    quiet_logs()

    async def serve() -> None:
        async with ActorHost(SPEC, **place_options(where), run_scheduler=False) as host:
            print("ready", flush=True)
            while line := await anyio.to_thread.run_sync(sys.stdin.readline):
                name = line.split()[1]
                controller = await DistributedAbortController.create(name, host=host)

                def report(_: AbortSignal, name: str = name) -> None:
                    print(f"fired {name} {now_ns()}", flush=True)

                controller.signal.add_listener(report)
                await anyio.wait_all_tasks_blocked()
                print(f"armed {name}", flush=True)

    anyio.run(serve)


class Listener:
    """The listener subprocess and a line reader over its stdout."""

    def __init__(self, process: Process) -> None:
        self.process = process
        assert process.stdout is not None
        self._lines = BufferedByteReceiveStream(process.stdout)

    async def expect(self, word: str) -> list[str]:
        with anyio.fail_after(30):
            parts = (await self._lines.receive_until(b"\n", 4096)).decode().split()
        if not parts or parts[0] != word:
            raise SystemExit(f"listener said {parts!r}, expected {word!r}")
        return parts

    async def send(self, line: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send(line.encode() + b"\n")

    async def stop(self) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.aclose()
        with anyio.fail_after(30):
            code = await self.process.wait()
        if code:
            raise SystemExit(f"listener exited with {code}")


async def cross_process(where: Path | str, samples: int) -> tuple[list[float], list[float]]:
    """Latencies (seconds) from the abort's call and from its return, across processes."""
    process = await anyio.open_process(
        [sys.executable, str(Path(__file__).resolve()), "--child", str(where)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=None,
    )
    listener = Listener(process)
    from_call: list[float] = []
    from_return: list[float] = []
    try:
        await listener.expect("ready")
        async with ActorHost(SPEC, **place_options(where), run_scheduler=False) as host:
            for i in range(samples + WARMUP):
                name = f"bench:{i}"
                controller = await DistributedAbortController.create(name, host=host)
                await listener.send(f"listen {name}")
                await listener.expect("armed")
                called = now_ns()
                await controller.abort("bench")
                returned = now_ns()
                fired = await listener.expect("fired")
                if fired[1] != name:
                    raise SystemExit(f"listener reported {fired!r} for {name}")
                if i >= WARMUP:
                    from_call.append((int(fired[2]) - called) / 1e9)
                    from_return.append((int(fired[2]) - returned) / 1e9)
    finally:
        await listener.stop()
    return from_call, from_return


async def main(samples: int, skip_in_process: bool, postgres: str | None) -> None:
    metric("environment", environment())
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="abort-latency-")))
        places: dict[str, Path | str] = {"in": tmp / "in", "cross": tmp / "cross"}
        if postgres is not None:
            url = stack.enter_context(postgres_url(postgres or None))
            places = dict.fromkeys(places, url)
            metric("backend", "postgresql (both processes on one database)")
        if not skip_in_process:
            latencies = await in_process(places["in"], samples)
            metric("abort -> signal, in-process, from the call", summary_ms(latencies))
        from_call, from_return = await cross_process(places["cross"], samples)
        metric("abort -> signal, cross-process, from the call", summary_ms(from_call))
        metric("abort -> signal, cross-process, from the return", summary_ms(from_return))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--skip-in-process", action="store_true")
    add_postgres_option(parser)
    parser.add_argument("--child", metavar="PLACE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
    else:
        quiet_logs()
        anyio.run(main, args.samples, args.skip_in_process, args.postgres)
