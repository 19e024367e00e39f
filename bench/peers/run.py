"""Peer comparison: this project against Huey, DBOS and procrastinate on the same workloads.

    .venv/bin/python bench/peers/run.py [--quick] [--n N] [--trials K] [--race-trials K]
                                        [--workers W] [--skip-sqlite] [--skip-postgres]
                                        [--database-url URL]
    python3 dev.py bench peers/run [--quick]        # the same thing

The peers are installed (pinned, ``requirements.txt``) into their own virtual environment,
``bench/peers/.venv``, created on first use and reinstalled when ``requirements.txt`` changes;
they never enter the project's ``.venv``. Every workload runs in a fresh subprocess (this
project's in the project's ``.venv``, the peers' in ``bench/peers/.venv``) on a fresh SQLite
directory or a fresh PostgreSQL database, and prints one JSON line. Workloads:

1. throughput: ``N`` no-op units enqueued one at a time (each enqueue durable before the
   next) while ``W`` workers run them; clock from the first enqueue to the last completion.
2. cancel: a unit waits cooperatively (as the peer allows); it is cancelled 0.2-0.5 s after
   its body started. Does it stop, and how long from the cancel call until the body learns?
3. race: a unit working ``--race-seconds`` is cancelled at about the moment it ends. What did
   the cancel call answer, what was recorded, do they disagree?

At the end: one table of raw figures and ratios (this project / peer), and the raw storage
limit of the same run (stdlib ``sqlite3`` and asyncpg). See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(HERE))

import anyio  # noqa: E402
import asyncpg  # noqa: E402
from _common import environment, metric, postgres_url, raw_sqlite_rate  # noqa: E402
from _peer_common import MARKER  # noqa: E402
from postgres import raw_rate  # noqa: E402

PEER_VENV = HERE / ".venv"
PEER_PYTHON = PEER_VENV / "bin" / "python"
REQUIREMENTS = HERE / "requirements.txt"
STAMP = PEER_VENV / ".requirements-sha1"
OURS = "this project"
CANCELLED_WORDS = ("cancelled", "aborted", "no result")


def ensure_peer_venv() -> None:
    """Create ``bench/peers/.venv`` and install the pinned peers, unless already done."""
    digest = hashlib.sha1(REQUIREMENTS.read_bytes()).hexdigest()
    if PEER_PYTHON.exists() and STAMP.exists() and STAMP.read_text() == digest:
        return
    print(f"installing the peers into {PEER_VENV} ...", file=sys.stderr, flush=True)
    if not PEER_PYTHON.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    subprocess.run(
        [str(PEER_PYTHON), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)], check=True
    )
    STAMP.write_text(digest)


def peer_versions() -> str:
    """The pinned versions from ``requirements.txt``."""
    pins = [line.split("#")[0].strip() for line in REQUIREMENTS.read_text().splitlines()]
    return ", ".join(p for p in pins if p)


class Runner:
    """Runs workload scripts in subprocesses on fresh storage and collects their results."""

    def __init__(self, args: argparse.Namespace, tmp: Path, pg_url: str | None) -> None:
        self.args = args
        self.tmp = tmp
        self.pg_url = pg_url
        self.count = 0

    async def _fresh_database(self) -> str:
        assert self.pg_url is not None
        name = f"peers_{int(time.time())}_{self.count}"
        conn = await asyncpg.connect(self.pg_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.pg_url.rsplit("/", 1)[0] + "/" + name

    def run(self, system: str, backend: str, workload: str, variant: str = "") -> dict[str, Any]:
        """One workload of one system, in a subprocess; returns its JSON result."""
        self.count += 1
        script, python = {
            OURS: ("ours_workloads.py", Path(sys.executable)),
            "Huey": ("huey_workloads.py", PEER_PYTHON),
            "DBOS": ("dbos_workloads.py", PEER_PYTHON),
            "procrastinate": ("procrastinate_workloads.py", PEER_PYTHON),
        }[system]
        a = self.args
        cmd = [
            str(python), str(HERE / script), workload, "--backend", backend,
            "--n", str(a.n), "--workers", str(a.workers),
            "--trials", str(a.race_trials if workload == "race" else a.trials),
            "--body-seconds", str(a.body_seconds), "--race-seconds", str(a.race_seconds),
        ]  # fmt: skip
        if variant:
            cmd += ["--variant", variant]
        if backend == "postgres":
            cmd += ["--url", anyio.run(self._fresh_database)]
        else:
            place = self.tmp / f"run-{self.count}"
            place.mkdir()
            cmd += ["--dir", str(place)]
        label = f"{system} / {backend} / {workload}{' / ' + variant if variant else ''}"
        print(f"running {label} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
        lines = [x for x in proc.stdout.splitlines() if x.startswith(MARKER)]
        if proc.returncode != 0 or not lines:
            tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-25:])
            raise SystemExit(f"{label} failed (exit {proc.returncode}):\n{tail}")
        result: dict[str, Any] = json.loads(lines[-1][len(MARKER) :])
        result["wall_s"] = time.perf_counter() - started
        metric(f"raw {label}", json.dumps(result, separators=(",", ":")))
        return result


# -- summaries --------------------------------------------------------------------------------


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def cancel_summary(result: dict[str, Any]) -> tuple[str, float | None]:
    """``stopped k/K, learned median`` (or why never), and the median in seconds."""
    trials = result["trials"]
    learned = [t["learned_s"] for t in trials if t["learned_s"] is not None]
    stopped = sum(1 for t in trials if not t["ran_to_end"])
    head = f"stopped {stopped}/{len(trials)}"
    if learned:
        median = statistics.median(learned)
        return f"{head}, learned p50 {fmt_ms(median)} max {fmt_ms(max(learned))}", median
    ends = [t["end_after_call_s"] for t in trials if t.get("end_after_call_s") is not None]
    tail = f", ran to its end {fmt_ms(statistics.median(ends))} after the call" if ends else ""
    return f"{head}, learned: never{tail}", None


def verdict(system: str, trial: dict[str, Any]) -> str:
    """Whether what the cancel answered and what was recorded agree with what the body did."""
    answer, recorded = trial["answer"], trial["recorded"]
    recorded_cancel = recorded.lower().startswith(CANCELLED_WORDS)
    if trial["body_finished"] and recorded_cancel:
        return "DISAGREE: work finished, recorded cancelled"
    if "revoke flag" in recorded and not recorded_cancel:
        return "DISAGREE: result stored and revoke flag kept"
    if system == OURS:
        if answer.startswith("cancelled") and not recorded_cancel:
            return "DISAGREE: answered cancelled, recorded otherwise"
        if answer.startswith("already_completed") and f"({recorded})" not in answer:
            return "DISAGREE: terminal status differs from the record"
    if answer == "None":
        return "agree (cancel answers nothing)"
    return "agree"


def race_summary(result: dict[str, Any]) -> tuple[str, str]:
    """``answer -> recorded`` counts, and verdict counts."""
    pairs = collections.Counter(f"{t['answer']} -> {t['recorded']}" for t in result["trials"])
    verdicts = collections.Counter(verdict(result["system"], t) for t in result["trials"])
    return (
        "; ".join(f"{k}: {v}" for k, v in sorted(pairs.items())),
        "; ".join(f"{k}: {v}" for k, v in sorted(verdicts.items())),
    )


def ratio(ours: float | None, peer: float | None) -> str:
    if ours is None or peer is None or peer == 0:
        return "-"
    return f"{ours / peer:.3g}"


def print_tables(
    results: dict[tuple[str, str, str], dict[str, Any]], raw: dict[str, float]
) -> None:
    """The comparison table (ratios are this project / peer), the race table, the limits."""
    print("\n## Throughput and cancel (ratio = this project / peer)\n")
    print("| backend | peer | workload | this project | peer | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for backend in ("sqlite", "postgres"):
        ours_tp = results.get((OURS, backend, "throughput"))
        ours_cancel = results.get((OURS, backend, "cancel"))
        for (system, b, workload), result in results.items():
            if system == OURS or b != backend:
                continue
            if workload == "throughput" and ours_tp:
                print(
                    f"| {backend} | {system} | throughput, N={result['n']}, W={result['workers']}"
                    f" | {ours_tp['rate']:,.0f} /s | {result['rate']:,.0f} /s"
                    f" | {ratio(ours_tp['rate'], result['rate'])} (higher is better) |"
                )
            elif workload.startswith("cancel") and ours_cancel:
                mine, mine_s = cancel_summary(ours_cancel)
                theirs, theirs_s = cancel_summary(result)
                print(
                    f"| {backend} | {system} | cancel running: {result['variant']} | {mine}"
                    f" | {theirs} | {ratio(mine_s, theirs_s)} (lower is better) |"
                )
    print("\n## Cancel racing completion (answer -> recorded: trials)\n")
    print("| backend | system | unit | answer -> recorded | verdicts |")
    print("| --- | --- | --- | --- | --- |")
    for (system, backend, workload), result in results.items():
        if workload == "race":
            pairs, verdicts = race_summary(result)
            print(f"| {backend} | {system} | {result['variant']} | {pairs} | {verdicts} |")
    print("\n## Raw storage limit (same run)\n")
    print("| storage | raw limit | this project end to end | this project / raw |")
    print("| --- | --- | --- | --- |")
    for backend, label in (("sqlite", "SQLite WAL FULL"), ("postgres", "PostgreSQL")):
        if backend not in raw:
            continue
        ours_tp = results.get((OURS, backend, "throughput"))
        rate = ours_tp["rate"] if ours_tp else None
        what = (
            "stdlib sqlite3, 1 txn = INSERT + UPDATE"
            if backend == "sqlite"
            else "asyncpg, 1 connection, 1 txn = INSERT + UPDATE"
        )
        print(
            f"| {label} ({what}) | {raw[backend]:,.0f} writes/s"
            f" | {'-' if rate is None else f'{rate:,.0f} units/s'} | {ratio(rate, raw[backend])} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="small N and few trials (~3 min)")
    parser.add_argument("--n", type=int, help="throughput units (default 2000, quick 200)")
    parser.add_argument("--trials", type=int, help="cancel trials (default 10, quick 3)")
    parser.add_argument("--race-trials", type=int, help="race trials (default 50, quick 10)")
    parser.add_argument("--workers", type=int, default=2, help="units running at once")
    parser.add_argument("--body-seconds", type=float, help="cancel body length (default 1.5)")
    parser.add_argument("--race-seconds", type=float, default=0.04, help="race body length")
    parser.add_argument("--raw-seconds", type=float, default=3.0)
    parser.add_argument("--skip-sqlite", action="store_true")
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--database-url", help="a PostgreSQL server to use (it creates databases)")
    args = parser.parse_args()
    q = args.quick
    args.n = args.n or (200 if q else 2000)
    args.trials = args.trials or (3 if q else 10)
    args.race_trials = args.race_trials or (10 if q else 50)
    args.body_seconds = args.body_seconds or 1.5
    if q:
        args.raw_seconds = min(args.raw_seconds, 2.0)

    ensure_peer_venv()
    metric("environment", environment())
    metric("peers", peer_versions())
    metric(
        "config",
        f"n={args.n} workers={args.workers} trials={args.trials} race_trials="
        f"{args.race_trials} body={args.body_seconds}s race_body={args.race_seconds}s",
    )
    results: dict[tuple[str, str, str], dict[str, Any]] = {}
    raw: dict[str, float] = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    try:
        if not args.skip_sqlite:
            runner = Runner(args, tmp, None)
            raw["sqlite"] = raw_sqlite_rate(tmp / "raw.db", "FULL", seconds=args.raw_seconds)
            metric("raw_sqlite_full", f"{raw['sqlite']:,.0f} writes/s")
            plan = [
                (OURS, "throughput", ""), (OURS, "cancel", ""), (OURS, "race", ""),
                ("Huey", "throughput", ""), ("Huey", "cancel", "poll"),
                ("Huey", "cancel", "plain"), ("Huey", "race", ""),
                ("DBOS", "throughput", ""), ("DBOS", "cancel", "preemptible"),
                ("DBOS", "cancel", "sync"), ("DBOS", "race", ""),
            ]  # fmt: skip
            for system, workload, variant in plan:
                key = workload + (f":{variant}" if variant and system != OURS else "")
                results[(system, "sqlite", key)] = runner.run(system, "sqlite", workload, variant)
        if not args.skip_postgres:
            with postgres_url(args.database_url) as url:
                runner = Runner(args, tmp, url)
                raw["postgres"] = anyio.run(raw_rate, url, 1, args.raw_seconds)
                metric("raw_asyncpg_1_connection", f"{raw['postgres']:,.0f} tx/s")
                plan = [
                    (OURS, "throughput", ""), (OURS, "cancel", ""), (OURS, "race", ""),
                    ("DBOS", "throughput", ""), ("DBOS", "cancel", "preemptible"),
                    ("DBOS", "race", ""),
                    ("procrastinate", "throughput", ""), ("procrastinate", "cancel", ""),
                    ("procrastinate", "race", ""),
                ]  # fmt: skip
                for system, workload, variant in plan:
                    key = workload + (f":{variant}" if variant else "")
                    results[(system, "postgres", key)] = runner.run(
                        system, "postgres", workload, variant
                    )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_tables(results, raw)


if __name__ == "__main__":
    main()
