"""DBOS Transact side of the peer comparison. Runs in ``bench/peers/.venv``.

    bench/peers/.venv/bin/python bench/peers/dbos_workloads.py throughput|cancel|race
        [--backend sqlite --dir DIR | --backend postgres --url URL] [--n N] [--workers W] ...

- SQLite system database: the file is created with ``PRAGMA journal_mode=WAL`` before
  ``DBOS.launch()`` (DBOS's default is the rollback journal; WAL persists in the file), and
  DBOS leaves ``synchronous`` at SQLite's default, FULL. PostgreSQL: server defaults.
- Throughput: ``N`` workflows (one no-op step each) enqueued one by one on a queue registered
  with ``worker_concurrency=W`` and ``polling_interval_sec=0.01`` (the default 1 s poll would
  start at most ``W`` workflows a second), then every handle is awaited.
- Cancel: ``DBOS.cancel_workflow(id)`` (returns ``None``). Variant ``preemptible`` (default):
  an async step declared ``@DBOS.step(preemptible=True)`` sleeping in 10 ms slices; DBOS
  polls the workflow status once a second and cancels the step's asyncio task. Variant
  ``sync``: a synchronous step, which DBOS never interrupts (cancellation is checked at the
  next step).
- Race: a workflow with one synchronous step sleeping ``--race-seconds``.

Prints one ``PEER-RESULT {json}`` line (see ``_peer_common``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import sys
import threading
import time
import traceback
from pathlib import Path
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
from dbos import DBOS  # type: ignore[import-not-found]

SYSTEM = "DBOS"
ARGS: Any = None


class Probe:
    """What the step bodies report, keyed by trial number."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started: dict[int, threading.Event] = {}
        self.exited: dict[int, threading.Event] = {}
        self.started_at: dict[int, float] = {}
        self.learned_at: dict[int, float] = {}
        self.finished_at: dict[int, float] = {}

    def event(self, table: dict[int, threading.Event], key: int) -> threading.Event:
        with self.lock:
            return table.setdefault(key, threading.Event())

    def begin(self, key: int) -> float:
        self.started_at[key] = now()
        self.event(self.started, key).set()
        return self.started_at[key]


PROBE = Probe()


def _noop_step() -> None:
    return None


noop_step = DBOS.step()(_noop_step)


def _noop_workflow() -> None:
    noop_step()


noop_workflow = DBOS.workflow()(_noop_workflow)


def _sync_body(key: int, seconds: float) -> str:
    """A synchronous step: sleeps in slices; nothing in DBOS can tell it to stop."""
    try:
        deadline = PROBE.begin(key) + seconds
        while (left := deadline - now()) > 0:
            time.sleep(min(TICK, left))
        PROBE.finished_at[key] = now()
        return "done"
    finally:
        PROBE.event(PROBE.exited, key).set()


sync_step = DBOS.step()(_sync_body)


async def _async_body(key: int, seconds: float) -> str:
    """A preemptible async step: DBOS cancels its task when it sees the workflow cancelled."""
    try:
        deadline = PROBE.begin(key) + seconds
        while (left := deadline - now()) > 0:
            await asyncio.sleep(min(TICK, left))
        PROBE.finished_at[key] = now()
        return "done"
    except asyncio.CancelledError:
        PROBE.learned_at[key] = now()
        raise
    finally:
        PROBE.event(PROBE.exited, key).set()


async_step = DBOS.step(preemptible=True)(_async_body)


def _sync_workflow(key: int, seconds: float) -> str:
    result: str = sync_step(key, seconds)
    return result


sync_workflow = DBOS.workflow()(_sync_workflow)


async def _async_workflow(key: int, seconds: float) -> str:
    result: str = await async_step(key, seconds)
    return result


async_workflow = DBOS.workflow()(_async_workflow)


def launch(args: Any) -> None:
    """Configure and launch DBOS on the chosen system database."""
    if args.backend == "postgres":
        url = args.url
    else:
        path = Path(args.dir) / "dbos.sqlite"
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.close()
        url = f"sqlite:///{path}"
    DBOS(config={"name": "peers-bench", "system_database_url": url, "log_level": "WARNING"})
    DBOS.launch()
    logging.getLogger("dbos").setLevel(logging.WARNING)


def throughput(args: Any) -> dict[str, Any]:
    """Enqueue ``n`` workflows one by one on a queue with ``W`` workers; await them all."""
    queue = DBOS.register_queue("bench", worker_concurrency=args.workers, polling_interval_sec=0.01)
    started = now()
    handles = [queue.enqueue(noop_workflow) for _ in range(args.n)]
    enqueued = now()
    for handle in handles:
        handle.get_result()
    finished = now()
    return throughput_result(
        SYSTEM,
        args.backend,
        args.n,
        args.workers,
        enqueued - started,
        finished - started,
        queue_polling_interval_s=0.01,
    )


def final_status(workflow_id: str) -> str:
    """The workflow's recorded status once it is no longer pending (or after 10 s)."""
    deadline = now() + 10
    while True:
        status = str(DBOS.get_workflow_status(workflow_id).status)
        if status not in ("PENDING", "ENQUEUED") or now() > deadline:
            return status
        time.sleep(TICK)


def cancel_trials(args: Any) -> list[dict[str, Any]]:
    """Cancel a running workflow ``offset`` seconds into its step, or race its end."""
    if args.workload == "cancel":
        offsets = cancel_offsets(args.trials)
        seconds = args.body_seconds
        workflow = async_workflow if args.variant == "preemptible" else sync_workflow
    else:
        offsets = race_offsets(args.trials, args.race_seconds)
        seconds = args.race_seconds
        workflow = sync_workflow
    trials: list[dict[str, Any]] = []
    for key, offset in enumerate(offsets):
        handle = DBOS.start_workflow(workflow, key, seconds)
        if not PROBE.event(PROBE.started, key).wait(30):
            raise SystemExit("the step did not start")
        time.sleep(max(0.0, PROBE.started_at[key] + offset - now()))
        called = now()
        answer = DBOS.cancel_workflow(handle.workflow_id)
        returned = now()
        if not PROBE.event(PROBE.exited, key).wait(seconds + 30):
            raise SystemExit("the step did not end")
        recorded = final_status(handle.workflow_id)
        learned = PROBE.learned_at.get(key)
        finished = PROBE.finished_at.get(key)
        trials.append(
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
    return trials


def run(args: Any) -> dict[str, Any]:
    """The chosen workload's result."""
    if args.workload == "throughput":
        return throughput(args)
    if args.workload == "cancel":
        args.variant = args.variant or "preemptible"
        variant = (
            "async step, preemptible=True (1 s status poll)"
            if args.variant == "preemptible"
            else "synchronous step (not interruptible)"
        )
    else:
        variant = "synchronous step"
    return {
        "system": SYSTEM,
        "backend": args.backend,
        "workload": args.workload,
        "variant": variant,
        "trials": cancel_trials(args),
    }


def main() -> None:
    global ARGS
    args = parser(__doc__.split("\n", 1)[0]).parse_args()
    ARGS = args
    code = 1
    try:
        launch(args)
        emit(run(args))
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        # DBOS.destroy() can wait forever for the background loop of a cancelled async
        # workflow; the result is printed, so leave without tearing DBOS down.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
