"""procrastinate side of the peer comparison (PostgreSQL). Runs in ``bench/peers/.venv``.

    bench/peers/.venv/bin/python bench/peers/procrastinate_workloads.py throughput|cancel|race
        --url URL [--n N] [--workers W] [--trials K]

- ``App(connector=PsycopgConnector(conninfo=URL))`` on a fresh database, schema applied here;
  server defaults (``fsync=on``, ``synchronous_commit=on``).
- One in-process worker, ``run_worker_async(concurrency=W)``, started before the first defer,
  with its defaults (LISTEN/NOTIFY for new jobs and abort requests, ``delete_jobs="never"``).
- Throughput: ``N`` no-op async jobs deferred one by one (``defer_async``); the clock stops
  when a poll of ``procrastinate_jobs`` (every 20 ms) counts ``N`` succeeded jobs.
- Cancel: ``job_manager.cancel_job_by_id_async(id, abort=True)`` (returns a bool). The job is
  an async task sleeping in 10 ms slices: procrastinate cancels its asyncio task on abort.
- Race: the same job sleeping ``--race-seconds``.

Prints one ``PEER-RESULT {json}`` line (see ``_peer_common``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from _peer_common import (
    TICK,
    cancel_offsets,
    emit,
    now,
    parser,
    race_offsets,
    throughput_result,
)
from procrastinate import App, PsycopgConnector  # type: ignore[import-not-found]

SYSTEM = "procrastinate"


class Probe:
    """What the job bodies report, keyed by trial number."""

    def __init__(self) -> None:
        self.started: dict[int, asyncio.Event] = {}
        self.exited: dict[int, asyncio.Event] = {}
        self.started_at: dict[int, float] = {}
        self.learned_at: dict[int, float] = {}
        self.finished_at: dict[int, float] = {}

    def event(self, table: dict[int, asyncio.Event], key: int) -> asyncio.Event:
        return table.setdefault(key, asyncio.Event())


async def count_status(app: Any, status: str) -> int:
    """Jobs with ``status`` in the jobs table."""
    rows = await app.connector.execute_query_all_async(
        "SELECT count(*) AS n FROM procrastinate_jobs WHERE status = %(status)s",
        status=status,
    )
    return int(rows[0]["n"])


async def run(args: Any) -> dict[str, Any]:
    """Apply the schema, start a worker, run the workload, stop the worker."""
    probe = Probe()
    app = App(connector=PsycopgConnector(conninfo=args.url))

    async def _noop() -> None:
        return None

    async def _unit(key: int, seconds: float) -> str:
        try:
            deadline = now() + seconds
            probe.started_at[key] = now()
            probe.event(probe.started, key).set()
            while (left := deadline - now()) > 0:
                await asyncio.sleep(min(TICK, left))
            probe.finished_at[key] = now()
            return "done"
        except asyncio.CancelledError:
            probe.learned_at[key] = now()
            raise
        finally:
            probe.event(probe.exited, key).set()

    noop = app.task(name="noop")(_noop)
    unit = app.task(name="unit")(_unit)
    async with app.open_async():
        exists = await app.connector.execute_query_one_async(
            "SELECT to_regclass('procrastinate_jobs') IS NOT NULL AS yes"
        )
        if not exists["yes"]:
            await app.schema_manager.apply_schema_async()
        worker = asyncio.create_task(
            app.run_worker_async(concurrency=args.workers, wait=True, install_signal_handlers=False)
        )
        await asyncio.sleep(0.5)  # let the worker start listening
        try:
            if args.workload == "throughput":
                started = now()
                for _ in range(args.n):
                    await noop.defer_async()
                enqueued = now()
                while await count_status(app, "succeeded") < args.n:
                    if now() - started > 900:
                        raise SystemExit("procrastinate did not finish the jobs")
                    await asyncio.sleep(0.02)
                finished = now()
                return throughput_result(
                    SYSTEM, "postgres", args.n, args.workers, enqueued - started,
                    finished - started,
                )  # fmt: skip
            return await trials(app, unit, probe, args)
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(worker, 30)


async def trials(app: Any, unit: Any, probe: Probe, args: Any) -> dict[str, Any]:
    """Abort a running job ``offset`` seconds after its body started, or race its end."""
    if args.workload == "cancel":
        offsets = cancel_offsets(args.trials)
        seconds = args.body_seconds
    else:
        offsets = race_offsets(args.trials, args.race_seconds)
        seconds = args.race_seconds
    results: list[dict[str, Any]] = []
    for key, offset in enumerate(offsets):
        job_id = await unit.defer_async(key=key, seconds=seconds)
        await asyncio.wait_for(probe.event(probe.started, key).wait(), 30)
        await asyncio.sleep(max(0.0, probe.started_at[key] + offset - now()))
        called = now()
        answer = await app.job_manager.cancel_job_by_id_async(job_id, abort=True)
        returned = now()
        await asyncio.wait_for(probe.event(probe.exited, key).wait(), seconds + 30)
        recorded = "?"
        deadline = now() + 10
        while now() < deadline:
            jobs = await app.job_manager.list_jobs_async(id=job_id)
            recorded = str(jobs[0].status)
            if recorded not in ("todo", "doing"):
                break
            await asyncio.sleep(TICK)
        learned = probe.learned_at.get(key)
        finished = probe.finished_at.get(key)
        results.append(
            {
                "offset_s": offset,
                "answer": repr(answer),
                "call_s": returned - called,
                "learned_s": None if learned is None else learned - called,
                "ran_to_end": finished is not None,
                "body_finished": finished is not None,
                "end_after_call_s": None if finished is None else finished - called,
                "recorded": recorded,
            }
        )
    return {
        "system": SYSTEM,
        "backend": "postgres",
        "workload": args.workload,
        "variant": "async job (asyncio task cancelled on abort, LISTEN/NOTIFY)",
        "trials": results,
    }


def main() -> None:
    args = parser(__doc__.split("\n", 1)[0]).parse_args()
    logging.basicConfig(level=logging.WARNING)
    emit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
