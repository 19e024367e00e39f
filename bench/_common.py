"""Shared helpers of the benchmark scripts: percentiles, process statistics, output."""

from __future__ import annotations

import contextlib
import cProfile
import hashlib
import io
import json
import logging
import os
import platform
import pstats
import resource
import sqlite3
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from actors import define_agent_do
from ledger._worker import Worker

if TYPE_CHECKING:
    import argparse
    from collections.abc import Awaitable, Callable, Iterator, Sequence

    from actors import AgentSpec

T = TypeVar("T")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, nearest-rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def summary_ms(values_s: Sequence[float]) -> str:
    """``p50 / p99 / max`` of durations given in seconds, printed in milliseconds."""
    ms = [v * 1000 for v in values_s]
    return (
        f"p50 {statistics.median(ms):.3f} ms  p99 {percentile(ms, 99):.3f} ms  "
        f"max {max(ms):.3f} ms  (n={len(ms)})"
    )


def peak_rss_mib() -> float:
    """Peak resident set size of this process, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def open_fds() -> int:
    """File descriptors open in this process now."""
    return len(os.listdir("/proc/self/fd"))


def metric(name: str, value: object) -> None:
    """Print one ``name: value`` line (the format every benchmark uses)."""
    print(f"{name}: {value}", flush=True)


# -- additions for the benchmark scripts ---------------------------------------------------------


def quiet_logs() -> None:
    """Drop structlog output below WARNING, so per-attempt log lines cost (almost) nothing."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def rate(count: float, seconds: float) -> str:
    """``count / seconds`` as a rate per second."""
    return f"{count / seconds:,.0f} /s" if seconds > 0 else "inf"


# The 200-byte JSON payload of one fact, as the storage baseline writes it.
RAW_PAYLOAD = json.dumps({"kind": "bench", "pad": "x" * 172}, separators=(",", ":"))


def _create_raw_tables(conn: sqlite3.Connection) -> None:
    """The events and intents tables of the raw baselines, shaped like the ledger's."""
    conn.execute(
        "CREATE TABLE events (id INTEGER PRIMARY KEY, ts INTEGER NOT NULL, kind TEXT NOT NULL,"
        " payload TEXT NOT NULL, intent_event_id INTEGER)"
    )
    conn.execute(
        "CREATE TABLE intents (id INTEGER PRIMARY KEY, status TEXT NOT NULL,"
        " attempts INTEGER NOT NULL DEFAULT 0, updated_at INTEGER)"
    )


def raw_sqlite_rate(
    path: Path, synchronous: str, *, seconds: float = 3.0, intents: int = 1000
) -> float:
    """Writes/s of the physical baseline: stdlib ``sqlite3``, one connection, one thread.

    One write = one transaction holding one event INSERT (about 200 bytes of pre-serialized
    JSON) and one UPDATE of an intent row (``intents`` rows, round-robin); WAL mode with the
    given ``synchronous`` setting; run for ``seconds``. This is the method of
    ``perf-baselines.md`` §1 (a), with the ledger's index on ``events.intent_event_id``.
    """
    if path.exists():
        path.unlink()
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        _create_raw_tables(conn)
        # The ledger's events table carries this index too (it serves reads by intent).
        conn.execute(
            "CREATE INDEX events_by_intent ON events (intent_event_id)"
            " WHERE intent_event_id IS NOT NULL"
        )
        conn.executemany(
            "INSERT INTO intents (id, status) VALUES (?, 'pending')",
            [(i,) for i in range(intents)],
        )
        count = 0
        started = time.perf_counter()
        deadline = started + seconds
        now = started
        while now < deadline:
            for _ in range(100):
                target = count % intents
                conn.execute("BEGIN")
                conn.execute(
                    "INSERT INTO events (ts, kind, payload, intent_event_id) VALUES (?, ?, ?, ?)",
                    (count, "bench.done", RAW_PAYLOAD, target),
                )
                conn.execute(
                    "UPDATE intents SET status = 'running', attempts = attempts + 1,"
                    " updated_at = ? WHERE id = ?",
                    (count, target),
                )
                conn.execute("COMMIT")
                count += 1
            now = time.perf_counter()
        return count / (now - started)
    finally:
        conn.close()


def raw_cycle_rate(directory: Path, synchronous: str, *, files: int = 2000) -> float:
    """Cycles/s of the physical limit for waking hibernated actors: stdlib ``sqlite3``.

    ``files`` WAL files are created first (untimed), each with an events table and one
    intent row, and synced. Then, timed, each file in turn is opened (``synchronous`` and
    WAL set as the ledger does), written by two transactions of one event INSERT and one
    UPDATE each (the claim, then the settle) and closed. The last close of a WAL file
    checkpoints it, syncs it and deletes the ``-wal`` and ``-shm`` files: the cost an actor
    pays when it wakes from hibernation and goes back to sleep.
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"actor-{i}.db" for i in range(files)]
    for path in paths:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            _create_raw_tables(conn)
            conn.execute("INSERT INTO intents (id, status) VALUES (1, 'pending')")
        finally:
            conn.close()
    os.sync()
    started = time.perf_counter()
    for count, path in enumerate(paths):
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            conn.execute("PRAGMA journal_mode = WAL")
            for kind, status in (("bench.claimed", "running"), ("bench.done", "completed")):
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(
                    "INSERT INTO events (ts, kind, payload, intent_event_id) VALUES (?, ?, ?, 1)",
                    (count, kind, RAW_PAYLOAD),
                )
                conn.execute(
                    "UPDATE intents SET status = ?, attempts = attempts + 1, updated_at = ?"
                    " WHERE id = 1",
                    (status, count),
                )
                conn.execute("COMMIT")
        finally:
            conn.close()
    return files / (time.perf_counter() - started)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far, seconds (from /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    # Fields 14 and 15 (utime, stime); index 0 here is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) used so far by each live thread of this process, summed
    by role: ``loop`` (the main thread, which runs the event loop), ``shards`` (the ledger's
    shard threads: SQL and the triggers' commit functions) and ``other``. Empty where
    ``/proc`` has no per-thread figures."""
    roles = {"loop": 0.0, "shards": 0.0, "other": 0.0}
    tick = os.sysconf("SC_CLK_TCK")
    for thread in threading.enumerate():
        try:
            with open(f"/proc/self/task/{thread.native_id}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile, or no /proc
        seconds = (int(fields[11]) + int(fields[12])) / tick
        if thread is threading.main_thread():
            roles["loop"] += seconds
        elif thread.name.startswith("ledger-shard"):
            roles["shards"] += seconds
        else:
            roles["other"] += seconds
    return roles if any(roles.values()) else {}


def thread_split(before: dict[str, float], after: dict[str, float], count: int) -> str:
    """The CPU per item each role used between two ``thread_cpu_seconds`` readings (a thread
    that ended in between is missing from ``after``: read both while the host runs)."""
    if not before or not after:
        return "n/a"
    return ", ".join(
        f"{role} {(after[role] - before.get(role, 0.0)) / count * 1e6:,.0f} us"
        for role in ("loop", "shards", "other")
    )


class ThreadProfile:
    """cProfile of the event-loop thread and, separately, of the worker threads.

    ``cProfile`` only sees the thread that enables it, and the ledger runs its transactions on
    its shard worker threads (``ledger._worker.Worker``). While ``active()``, ``Worker.run`` is
    wrapped so each call it makes is profiled by a per-thread profiler.
    """

    def __init__(self) -> None:
        self.loop = cProfile.Profile()
        self.workers: list[cProfile.Profile] = []
        self.worker_busy = 0.0
        self._local = threading.local()
        self._lock = threading.Lock()

    def _profiler(self) -> cProfile.Profile:
        profiler: cProfile.Profile | None = getattr(self._local, "profiler", None)
        if profiler is None:
            profiler = self._local.profiler = cProfile.Profile()
            with self._lock:
                self.workers.append(profiler)
        return profiler

    def _wrap(self, func: Callable[..., T]) -> Callable[..., T]:
        def call(*args: Any) -> T:
            profiler = self._profiler()
            started = time.perf_counter()
            profiler.enable()
            try:
                return func(*args)
            finally:
                profiler.disable()
                with self._lock:
                    self.worker_busy += time.perf_counter() - started

        return call

    @staticmethod
    def maybe(profile: ThreadProfile | None) -> contextlib.AbstractContextManager[None]:
        """``profile.active()``, or a no-op context when ``profile`` is None."""
        return contextlib.nullcontext() if profile is None else profile.active()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Profile the current thread and every call run on a shard worker thread."""
        original = Worker.run

        async def patched(worker: Worker, func: Callable[..., T], *args: Any) -> T:
            return await original(worker, self._wrap(func), *args)

        Worker.run = patched  # type: ignore[method-assign,assignment]
        self.loop.enable()
        try:
            yield
        finally:
            self.loop.disable()
            Worker.run = original  # type: ignore[method-assign]

    def report(self, top: int = 25, elapsed: float | None = None) -> None:
        """Print the ``top`` functions by own time, loop thread first, then worker threads."""
        out = io.StringIO()
        print(f"--- profile: event-loop thread, top {top} by tottime ---", file=out)
        pstats.Stats(self.loop, stream=out).sort_stats("tottime").print_stats(top)
        if self.workers:
            busy = f"{self.worker_busy:.3f} s in worker calls"
            if elapsed:
                busy += f" ({self.worker_busy / elapsed:.0%} of {elapsed:.3f} s wall)"
            print(f"--- profile: worker threads ({busy}), top {top} by tottime ---", file=out)
            stats = pstats.Stats(self.workers[0], stream=out)
            for profiler in self.workers[1:]:
                stats.add(profiler)
            stats.sort_stats("tottime").print_stats(top)
        print(out.getvalue(), flush=True)


def environment() -> str:
    """Python and SQLite versions, the code's git commit, CPUs and load.

    A modified working tree shows as ``<commit>+dirty:<hash of the diff>``, so runs of the same
    uncommitted code can be told apart from runs of different code.
    """
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=root
        ).stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        diff = git("diff", "HEAD", "--", "actors", "triggers", "ledger")
        if diff:
            commit += "+dirty:" + hashlib.sha1(diff.encode()).hexdigest()[:8]
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return (
        f"python {platform.python_version()}, sqlite {sqlite3.sqlite_version}, "
        f"code {commit}, cpus {os.cpu_count()}, loadavg {loadavg()}"
    )


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages (other work on the machine skews results)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def fd_kinds() -> dict[str, int]:
    """Open file descriptors of this process by kind (ledger db / -wal / -shm, sockets...)."""
    kinds: dict[str, int] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.endswith(".db"):
            kind = "db"
        elif target.endswith("-wal"):
            kind = "wal"
        elif target.endswith("-shm"):
            kind = "shm"
        else:
            kind = target.split(":", 1)[0] if ":" in target else "other"
        kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items()))


def one_trigger_spec(
    kind: str,
    parse: Callable[[Any], Any],
    acquire: Callable[[Any, Any], Awaitable[Any]],
    commit: Callable[[Any, Any], None],
    commit_cancelled: Callable[[Any, Any, Any], None],
) -> AgentSpec:
    """An actor class with one cooperative trigger of ``kind`` built from these functions."""
    trigger: Any = {
        "kind": kind,
        "intent_event_kind": f"{kind}.requested",
        "cancellation": "cooperative",
        "parse_intent": parse,
        "acquire": acquire,
        "commit": commit,
        "commit_cancelled": commit_cancelled,
    }
    return define_agent_do(triggers=[trigger])


def add_postgres_option(parser: argparse.ArgumentParser) -> None:
    """``--postgres [URL]``: run on PostgreSQL (the URL, or a throwaway server, see
    ``postgres_url``) instead of SQLite files."""
    parser.add_argument(
        "--postgres",
        nargs="?",
        const="",
        metavar="URL",
        help="use PostgreSQL (this URL, or a throwaway server) instead of SQLite",
    )


def place_options(place: str | Path) -> dict[str, Any]:
    """``ActorHost`` options for a place: a data directory, or a ``postgresql://`` URL."""
    if isinstance(place, str) and place.startswith("postgresql://"):
        return {"database_url": place}
    return {"data_dir": place}


@contextlib.contextmanager
def postgres_url(given: str | None) -> Iterator[str]:
    """``given``, or a fresh database on a throwaway server from the installed PostgreSQL
    binaries (started here, stopped and removed on exit)."""
    if given:
        yield given
        return
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.postgres import INSTALL, PostgresServer, find_bindir

    bindir = find_bindir()
    if bindir is None:
        raise SystemExit(f"PostgreSQL server binaries are not installed ({INSTALL})")
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server.create_database()
    finally:
        server.stop()
