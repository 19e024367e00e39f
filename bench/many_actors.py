"""Many actors: N actors, each with one intent due within the same minute; how late they fire.

    .venv/bin/python bench/many_actors.py [--actors 100000] [--window 60] [--lead SECONDS]
                                          [--enqueue-concurrency 200] [--max-wait 900]
                                          [--raw-files 2000]

Phase 1 enqueues one intent per actor (a new ledger file each), with ``at`` spread uniformly
at random over ``[t0 + lead, t0 + lead + window]``; ``lead`` covers the whole enqueue phase
(by default it is estimated from a short calibration run, so nothing is due while enqueueing).
Phase 2 lets the host (``ActorHost`` defaults) fire them; each acquire records its lateness,
``now - due``, from the due time carried in its payload. Progress goes to stderr.

Before the host starts, the physical limit is measured on the same disk
(``_common.raw_cycle_rate``): stdlib ``sqlite3`` opening, writing twice and closing one WAL
file after another, as a hibernated actor does when it fires. ``fire_rate`` (completions from
the first due time to the last completion) is compared with it; so is the arrival rate
``actors / window`` that a p99 lateness target needs sustained.
"""

from __future__ import annotations

import argparse
import functools
import random
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from _common import (
    environment,
    fd_kinds,
    loadavg,
    metric,
    one_trigger_spec,
    open_fds,
    peak_rss_mib,
    percentile,
    quiet_logs,
    rate,
    raw_cycle_rate,
    summary_ms,
)

from actors import ActorHost, AgentSpec
from ledger import ms_to_datetime

if TYPE_CHECKING:
    from collections.abc import Callable

    from actors import Agent
    from ledger import JSON, Committed
    from triggers import Cancellation, TriggerContext, Tx

KIND = "bench.tick"


def wall_ms() -> float:
    """Wall-clock time in epoch milliseconds (the host's clock, with sub-ms precision)."""
    return time.time_ns() / 1e6


class Tally:
    """What the attempts saw: lateness (on the loop) and completions (on the ledger thread)."""

    def __init__(self) -> None:
        self.lateness_ms: list[float] = []
        self.due_ms: list[int] = []
        self.completed = 0
        self._lock = threading.Lock()

    def complete(self) -> None:
        with self._lock:
            self.completed += 1


def make_spec(tally: Tally) -> AgentSpec:
    """An actor class whose trigger records how late it started and commits one fact."""

    def parse(payload: JSON) -> JSON:
        return payload

    async def acquire(intent: Any, ctx: TriggerContext) -> JSON:
        tally.lateness_ms.append(wall_ms() - intent["due"])
        tally.due_ms.append(intent["due"])
        return None

    def commit(outcome: JSON, tx: Tx) -> None:
        tx.insert_event(kind="bench.ticked", payload=None)
        tally.complete()

    def commit_cancelled(intent: JSON, cancellation: Cancellation, tx: Tx) -> None:
        tx.insert_event(kind="bench.cancelled", payload=None)

    return one_trigger_spec(KIND, parse, acquire, commit, commit_cancelled)


async def enqueue_all(
    agents: list[Agent],
    dues: list[int],
    concurrency: int,
    on_enqueued: Callable[[], None] = lambda: None,
) -> None:
    """Enqueue ``dues[i]`` for ``agents[i]``, ``concurrency`` calls at a time."""
    numbers = iter(range(len(agents)))

    async def worker() -> None:
        for i in numbers:
            await agents[i].enqueue_trigger(
                trigger_kind=KIND, payload={"due": dues[i]}, at=ms_to_datetime(dues[i])
            )
            on_enqueued()

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)


async def calibrate(
    data_dir: Path, actors: int, concurrency: int, host_options: dict[str, Any]
) -> float:
    """Enqueue rate (new actors/s) measured on ``actors`` throwaway actors due in an hour."""
    async with ActorHost(make_spec(Tally()), data_dir=data_dir, **host_options) as host:
        agents = [host.get(f"calibrate-{i}") for i in range(actors)]
        due = round(wall_ms()) + 3_600_000
        started = time.perf_counter()
        await enqueue_all(agents, [due] * actors, concurrency)
        return actors / (time.perf_counter() - started)


class Monitor:
    """Samples open fds (peak) and prints progress to stderr every few seconds."""

    def __init__(self, tally: Tally, total: int) -> None:
        self.tally = tally
        self.total = total
        self.phase = "enqueue"
        self.enqueued = 0
        self.peak_fds = 0
        self.peak_kinds: dict[str, int] = {}
        self.fd_errors = 0
        self.max_lag = 0.0
        self.last_fd_error = ""
        self._started = time.perf_counter()

    def count_enqueue(self) -> None:
        self.enqueued += 1

    async def run(self) -> None:
        last_print = 0.0
        while True:
            try:
                fds = open_fds()
                if fds > self.peak_fds:
                    self.peak_fds = fds
                    self.peak_kinds = fd_kinds()
            except OSError as exc:  # listing /proc/self/fd needs a descriptor too
                self.fd_errors += 1
                self.last_fd_error = str(exc)
            now = time.perf_counter()
            if now - last_print >= 5:
                last_print = now
                lateness = self.tally.lateness_ms
                late = f" last lateness {lateness[-1]:.0f} ms" if lateness else ""
                print(
                    f"[{now - self._started:7.1f} s] {self.phase}: enqueued {self.enqueued}/"
                    f"{self.total} fired {len(lateness)} completed {self.tally.completed}{late}"
                    f"  rss {peak_rss_mib():.0f} MiB fds {self.peak_fds} load {loadavg()}",
                    file=sys.stderr,
                    flush=True,
                )
            before = time.perf_counter()
            await anyio.sleep(0.5)
            self.max_lag = max(self.max_lag, time.perf_counter() - before - 0.5)


def by_due(tally: Tally, first_ms: int, window_s: float, parts: int = 6) -> str:
    """p99 lateness of the intents due in each ``1/parts`` of the window, in ms."""
    buckets: list[list[float]] = [[] for _ in range(parts)]
    span = window_s * 1000 / parts
    for due, late in zip(tally.due_ms, tally.lateness_ms, strict=True):
        buckets[min(parts - 1, max(0, int((due - first_ms) // span)))].append(late)
    cells = " | ".join(f"{percentile(b, 99):.0f}" if b else "-" for b in buckets)
    return f"p99 ms per {window_s / parts:g} s of due time: {cells}"


async def run(args: argparse.Namespace, root: Path) -> None:
    actors: int = args.actors
    begun = time.perf_counter()
    lead: float | None = args.lead
    host_options: dict[str, Any] = {
        "shards": args.shards,
        "max_open_ledgers": args.max_open_ledgers,
    }
    if lead is None:
        sample = min(actors, 1000)
        calibration = await calibrate(
            root / "calibration", sample, args.enqueue_concurrency, host_options
        )
        lead = 5 + 1.3 * actors / calibration
        metric("calibration_enqueue_rate", f"{calibration:,.0f} actors/s (n={sample})")
    metric("lead", f"{lead:.1f} s (first intent due this long after enqueueing starts)")
    raw = 0.0
    if args.raw_files:
        raw = raw_cycle_rate(root / "raw", "NORMAL", files=args.raw_files)
        metric(
            "raw_cycle_rate",
            f"{raw:,.0f} actors/s (stdlib sqlite3: open, claim + settle transactions, close;"
            f" n={args.raw_files})",
        )

    tally = Tally()
    monitor = Monitor(tally, actors)
    async with ActorHost(make_spec(tally), data_dir=root / "data", **host_options) as host:
        all_done = anyio.Event()

        def on_commit(committed: list[Committed]) -> None:
            if tally.completed >= actors:
                all_done.set()

        host.store.add_commit_listener(on_commit)
        agents = [host.get(f"actor-{i}") for i in range(actors)]
        t0 = wall_ms()
        rng = random.Random(42)
        first = t0 + lead * 1000
        dues = [round(first + rng.random() * args.window * 1000) for _ in range(actors)]
        async with anyio.create_task_group() as tg:
            tg.start_soon(monitor.run)
            started = time.perf_counter()
            await enqueue_all(agents, dues, args.enqueue_concurrency, monitor.count_enqueue)
            enqueue_s = time.perf_counter() - started
            enqueue_end_ms = wall_ms()
            monitor.phase = "firing"
            metric("enqueue", f"{rate(actors, enqueue_s)} ({actors} actors in {enqueue_s:.1f} s)")
            earliest = min(dues)
            if enqueue_end_ms > earliest:
                metric(
                    "warning",
                    f"enqueueing ended {enqueue_end_ms - earliest:.0f} ms after the first due "
                    "time: raise --lead (early lateness includes enqueue time)",
                )
            deadline = (max(dues) - wall_ms()) / 1000 + args.max_wait
            with anyio.move_on_after(max(deadline, 1.0)):
                await all_done.wait()
            finished_ms = wall_ms()
            tg.cancel_scope.cancel()
        peak_fds = monitor.peak_fds

    lateness = [ms / 1000 for ms in tally.lateness_ms]
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    metric("fired", f"{len(lateness)} of {actors}")
    metric("completed", f"{tally.completed} of {actors}")
    if lateness:
        metric("lateness", summary_ms(lateness) + "  (target p99 <= 100 ms)")
        metric("lateness_p90", f"{percentile([v * 1000 for v in lateness], 90):.3f} ms")
    if lateness:
        metric("lateness_by_due", by_due(tally, min(dues), args.window))
    metric("max_loop_lag", f"{monitor.max_lag * 1000:.1f} ms (event loop blocked, sampled)")
    metric("peak_rss", f"{peak_rss_mib():.0f} MiB (target <= 1024 MiB)")
    metric("peak_open_fds", f"{peak_fds} {monitor.peak_kinds} (RLIMIT_NOFILE {nofile})")
    if monitor.fd_errors:
        metric("fd_errors", f"{monitor.fd_errors} samples failed: {monitor.last_fd_error}")
    metric("last_completion", f"{(finished_ms - max(dues)) / 1000:.3f} s after the last due time")
    needed = actors / args.window
    span_s = (finished_ms - min(dues)) / 1000
    fired_rate = tally.completed / span_s if span_s > 0 else 0.0
    metric(
        "fire_rate",
        f"{fired_rate:,.0f} actors/s from the first due time to the last completion"
        f" (arrivals: {needed:,.0f} actors/s)",
    )
    if raw:
        metric("ratio_fire_rate_to_raw", f"{fired_rate / raw:.2f}")
        metric("ratio_arrivals_to_raw", f"{needed / raw:.2f} (above 1: beyond the storage limit)")
    metric("elapsed", f"{time.perf_counter() - begun:.1f} s (calibration, enqueue, firing)")
    metric("loadavg_after", loadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--actors", type=int, default=100_000)
    parser.add_argument("--window", type=float, default=60.0, help="seconds the dues spread over")
    parser.add_argument("--lead", type=float, help="seconds from enqueue start to first due")
    parser.add_argument("--enqueue-concurrency", type=int, default=200)
    parser.add_argument(
        "--max-wait", type=float, default=900.0, help="seconds to wait after the last due"
    )
    parser.add_argument("--data-dir", help="keep the ledgers here instead of a temp dir")
    parser.add_argument(
        "--raw-files",
        type=int,
        default=2000,
        help="files in the raw open-write-close baseline (0: skip it)",
    )
    parser.add_argument(
        "--shards", type=int, default=1, help="ActorHost shards (default: the default, 1)"
    )
    parser.add_argument(
        "--max-open-ledgers", type=int, default=512, help="ActorHost max_open_ledgers (512)"
    )
    args = parser.parse_args()
    quiet_logs()
    metric("environment", environment())
    metric(
        "config",
        f"actors={args.actors} window={args.window}s shards={args.shards} "
        f"max_open_ledgers={args.max_open_ledgers}",
    )
    if args.data_dir:
        anyio.run(functools.partial(run, args, Path(args.data_dir)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-many-") as tmp:
        anyio.run(functools.partial(run, args, Path(tmp)))


if __name__ == "__main__":
    main()
