"""Cancel latency: from ``cancel_trigger`` returning ``requested`` to the running ``acquire``
seeing its signal abort; and the CPU an idle host burns.

    .venv/bin/python bench/cancel_latency.py [--samples 200] [--idle-seconds 5]
                                             [--skip-in-process] [--skip-cross-process]
                                             [--skip-idle] [--postgres [URL]]

With ``--postgres`` every host and client uses PostgreSQL instead of SQLite files: the given
database URL, or a throwaway server started from the installed binaries.

(a) in-process: one host runs the trigger and the bench cancels it from the same event loop.
(b) cross-process: a host subprocess runs the trigger and prints, on stdout, the
    CLOCK_MONOTONIC time at which the signal fired; this process is a client
    (``run_scheduler=False``) that cancels and notes when the cancel returned. CLOCK_MONOTONIC
    is system-wide on Linux, so the two readings compare directly.
(c) idle CPU: a host subprocess with nothing to do; its user+system CPU time over a window,
    as a percentage of one core.

The acquire awaits ``ctx.signal.wait()`` and reads the clock as soon as it resumes. Each
sample waits for the previous intent to settle, so samples do not overlap.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from _common import (
    add_postgres_option,
    cpu_seconds,
    environment,
    loadavg,
    metric,
    one_trigger_spec,
    place_options,
    postgres_url,
    quiet_logs,
    summary_ms,
)
from anyio.streams.buffered import BufferedByteReceiveStream

from actors import ActorHost, AgentSpec
from triggers import CancelStatus

if TYPE_CHECKING:
    from collections.abc import Callable

    from anyio.abc import Process

    from ledger import JSON
    from triggers import Cancellation, TriggerContext, Tx

KIND = "bench.wait"
WARMUP = 5


def now_ns() -> int:
    """CLOCK_MONOTONIC in nanoseconds (the same clock in every process on the machine)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def make_spec(on_started: Callable[[int], None], on_fired: Callable[[int, int], None]) -> AgentSpec:
    """An actor class whose trigger waits for its signal and reports when it fired."""

    def parse(payload: JSON) -> JSON:
        return payload

    async def acquire(intent: JSON, ctx: TriggerContext) -> JSON:
        on_started(ctx.intent_event_id)
        await ctx.signal.wait()
        on_fired(ctx.intent_event_id, now_ns())
        ctx.signal.throw_if_aborted()
        return None

    def commit(outcome: JSON, tx: Tx) -> None:
        tx.insert_event(kind="bench.done", payload=None)

    def commit_cancelled(intent: JSON, cancellation: Cancellation, tx: Tx) -> None:
        tx.insert_event(kind="bench.cancelled", payload={"reason": cancellation.reason})

    return one_trigger_spec(KIND, parse, acquire, commit, commit_cancelled)


# -- (a) in-process ---------------------------------------------------------------------------


class Probe:
    """Events an in-process acquire sets when it starts and when its signal fires."""

    def __init__(self) -> None:
        self.started: dict[int, anyio.Event] = {}
        self.fired: dict[int, anyio.Event] = {}
        self.fired_ns: dict[int, int] = {}

    def _event(self, table: dict[int, anyio.Event], intent_event_id: int) -> anyio.Event:
        return table.setdefault(intent_event_id, anyio.Event())

    def on_started(self, intent_event_id: int) -> None:
        self._event(self.started, intent_event_id).set()

    def on_fired(self, intent_event_id: int, at_ns: int) -> None:
        self.fired_ns[intent_event_id] = at_ns
        self._event(self.fired, intent_event_id).set()

    async def wait_started(self, intent_event_id: int) -> None:
        await self._event(self.started, intent_event_id).wait()

    async def wait_fired(self, intent_event_id: int) -> int:
        await self._event(self.fired, intent_event_id).wait()
        return self.fired_ns[intent_event_id]


async def in_process(data_dir: Path | str, samples: int) -> tuple[list[float], list[float]]:
    """Latencies (seconds) from the cancel's return and from its call, in one process."""
    probe = Probe()
    from_return: list[float] = []
    from_call: list[float] = []
    spec = make_spec(probe.on_started, probe.on_fired)
    async with ActorHost(spec, **place_options(data_dir)) as host:
        agent = host.get("bench-cancel")
        for i in range(samples + WARMUP):
            with anyio.fail_after(30):
                intent = await agent.enqueue_trigger(trigger_kind=KIND, payload={"i": i})
                await probe.wait_started(intent.id)
                called = now_ns()
                result = await agent.cancel_trigger(
                    trigger_kind=KIND, intent_event_id=intent.id, reason="bench"
                )
                returned = now_ns()
                if result.status is not CancelStatus.REQUESTED:
                    raise SystemExit(f"cancel answered {result.status}, expected requested")
                fired = await probe.wait_fired(intent.id)
                state = await agent.wait_for_intent(intent.id)
                if state.status != "cancelled":
                    raise SystemExit(f"intent ended {state.status}, expected cancelled")
            if i >= WARMUP:
                from_return.append((fired - returned) / 1e9)
                from_call.append((fired - called) / 1e9)
    return from_return, from_call


# -- (b) and (c): a host in another process -----------------------------------------------------


def child(data_dir: str) -> None:
    """Subprocess mode: serve ``data_dir`` (or a database URL), report on stdout, stop when
    stdin closes."""
    quiet_logs()

    def on_started(intent_event_id: int) -> None:
        print(f"started {intent_event_id}", flush=True)

    def on_fired(intent_event_id: int, at_ns: int) -> None:
        print(f"fired {intent_event_id} {at_ns}", flush=True)

    async def serve() -> None:
        async with ActorHost(make_spec(on_started, on_fired), **place_options(data_dir)):
            print("ready", flush=True)
            await anyio.to_thread.run_sync(sys.stdin.read)

    anyio.run(serve)


class Child:
    """A host subprocess and a line reader over its stdout."""

    def __init__(self, process: Process) -> None:
        self.process = process
        assert process.stdout is not None
        self._lines = BufferedByteReceiveStream(process.stdout)

    async def line(self) -> list[str]:
        with anyio.fail_after(30):
            return (await self._lines.receive_until(b"\n", 4096)).decode().split()

    async def expect(self, word: str) -> list[str]:
        parts = await self.line()
        if not parts or parts[0] != word:
            raise SystemExit(f"host subprocess said {parts!r}, expected {word!r}")
        return parts

    async def stop(self) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.aclose()
        with anyio.fail_after(30):
            code = await self.process.wait()
        if code:
            raise SystemExit(f"host subprocess exited with {code}")


async def start_child(data_dir: Path | str) -> Child:
    process = await anyio.open_process(
        [sys.executable, str(Path(__file__).resolve()), "--child", str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=None,
    )
    host = Child(process)
    await host.expect("ready")
    return host


async def cross_process(data_dir: Path | str, samples: int) -> tuple[list[float], list[float]]:
    """Latencies (seconds) from the cancel's return and from its call, across processes."""
    host = await start_child(data_dir)
    from_return: list[float] = []
    from_call: list[float] = []

    def unused(*_: object) -> None:
        raise AssertionError("the client runs no attempts")

    try:
        spec = make_spec(unused, unused)
        async with ActorHost(spec, **place_options(data_dir), run_scheduler=False) as client:
            agent = client.get("bench-cancel")
            for i in range(samples + WARMUP):
                with anyio.fail_after(30):
                    intent = await agent.enqueue_trigger(trigger_kind=KIND, payload={"i": i})
                    started = await host.expect("started")
                    assert int(started[1]) == intent.id
                    called = now_ns()
                    result = await agent.cancel_trigger(
                        trigger_kind=KIND, intent_event_id=intent.id, reason="bench"
                    )
                    returned = now_ns()
                    if result.status is not CancelStatus.REQUESTED:
                        raise SystemExit(f"cancel answered {result.status}, expected requested")
                    fired = await host.expect("fired")
                    assert int(fired[1]) == intent.id
                    state = await agent.wait_for_intent(intent.id)
                    if state.status != "cancelled":
                        raise SystemExit(f"intent ended {state.status}, expected cancelled")
                if i >= WARMUP:
                    from_return.append((int(fired[2]) - returned) / 1e9)
                    from_call.append((int(fired[2]) - called) / 1e9)
    finally:
        await host.stop()
    return from_return, from_call


async def idle_cpu(data_dir: Path | str, seconds: float) -> tuple[float, float]:
    """(% of one core used by an idle host over ``seconds``, the window's wall seconds)."""
    host = await start_child(data_dir)
    try:
        await anyio.sleep(1.0)  # let start-up work (imports, first polls) finish
        cpu0, wall0 = cpu_seconds(host.process.pid), time.monotonic()
        await anyio.sleep(seconds)
        cpu1, wall1 = cpu_seconds(host.process.pid), time.monotonic()
    finally:
        await host.stop()
    return 100 * (cpu1 - cpu0) / (wall1 - wall0), wall1 - wall0


def signed_summary(values_s: list[float]) -> str:
    """``summary_ms``, noting how many samples fired before the cancel call returned."""
    early = sum(1 for v in values_s if v < 0)
    return summary_ms(values_s) + (f"  [{early} fired before the return]" if early else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--skip-in-process", action="store_true")
    parser.add_argument("--skip-cross-process", action="store_true")
    parser.add_argument("--skip-idle", action="store_true")
    add_postgres_option(parser)
    parser.add_argument("--child", metavar="DATA_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    quiet_logs()
    metric("environment", environment())
    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-cancel-")))
        places: dict[str, Path | str] = {name: root / name for name in "abc"}
        if args.postgres is not None:
            url = stack.enter_context(postgres_url(args.postgres or None))
            places = dict.fromkeys("abc", url)
            metric("backend", "postgresql (every host and client on one database)")
        if not args.skip_in_process:
            ret, call = anyio.run(functools.partial(in_process, places["a"], args.samples))
            metric("in_process_from_return", signed_summary(ret) + "  (target p99 <= 1 ms)")
            metric("in_process_from_call", signed_summary(call))
        if not args.skip_cross_process:
            ret, call = anyio.run(functools.partial(cross_process, places["b"], args.samples))
            metric("cross_process_from_return", signed_summary(ret) + "  (target p99 <= 5 ms)")
            metric("cross_process_from_call", signed_summary(call))
        if not args.skip_idle:
            percent, window = anyio.run(functools.partial(idle_cpu, places["c"], args.idle_seconds))
            tick = 100 / (os.sysconf("SC_CLK_TCK") * window)
            metric("idle_host_cpu", f"{percent:.2f} % of one core over {window:.1f} s "
                   f"(resolution {tick:.2f} %; target <= 2 %)")  # fmt: skip
    metric("loadavg_after", loadavg())


if __name__ == "__main__":
    main()
