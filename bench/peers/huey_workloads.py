"""Huey (``SqliteHuey``) side of the peer comparison. Runs in ``bench/peers/.venv``.

    bench/peers/.venv/bin/python bench/peers/huey_workloads.py throughput|cancel|race --dir DIR
        [--n N] [--workers W] [--trials K] [--variant poll|plain]

- Storage: ``SqliteHuey(fsync=True)``: WAL (Huey's default journal) with ``synchronous=FULL``
  set explicitly (Huey's default ``fsync=None`` leaves SQLite's compiled default, FULL here).
- Consumer: in-process, ``huey.create_consumer(workers=W, worker_type="thread")``, default
  polling settings. Completions are counted by a ``SIGNAL_COMPLETE`` handler.
- Cancel: ``huey.revoke_by_id(id)``. Huey checks the revoke flag only when it dequeues a task,
  so a running body learns of it only by polling ``huey.is_revoked(task)`` (one SQLite read per
  check, every 10 ms here; variant ``poll``, the default) and stops by raising
  ``CancelExecution``. Variant ``plain``: the body does not poll, and runs to its end.

Prints one ``PEER-RESULT {json}`` line (see ``_peer_common``).
"""

from __future__ import annotations

import threading
import time
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
from huey import SqliteHuey  # type: ignore[import-not-found]
from huey.exceptions import (  # type: ignore[import-not-found]
    CancelExecution,
    TaskException,
)
from huey.signals import (  # type: ignore[import-not-found]
    SIGNAL_CANCELED,
    SIGNAL_COMPLETE,
    SIGNAL_ERROR,
    SIGNAL_REVOKED,
)

SYSTEM = "Huey"


class Probe:
    """What the bodies and Huey's signals report, keyed by trial number / task id."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.completed = 0
        self.all_done = threading.Event()
        self.target = 0
        self.started: dict[int, threading.Event] = {}
        self.started_at: dict[int, float] = {}
        self.learned_at: dict[int, float] = {}
        self.finished_at: dict[int, float] = {}
        self.ended: dict[str, threading.Event] = {}
        self.signal: dict[str, str] = {}

    def start_event(self, key: int) -> threading.Event:
        with self.lock:
            return self.started.setdefault(key, threading.Event())

    def end_event(self, task_id: str) -> threading.Event:
        with self.lock:
            return self.ended.setdefault(task_id, threading.Event())


def setup(args: Any, probe: Probe) -> tuple[Any, Any, Any]:
    """The Huey instance, the no-op task and the cooperative task."""
    huey = SqliteHuey(name="peers", filename=str(Path(args.dir) / "huey.db"), fsync=True)

    def on_end(signal: str, task: Any, exc: Any = None) -> None:
        if signal == SIGNAL_COMPLETE:
            with probe.lock:
                probe.completed += 1
                if probe.completed >= probe.target:
                    probe.all_done.set()
        probe.signal[task.id] = signal
        probe.end_event(task.id).set()

    huey.signal(SIGNAL_COMPLETE, SIGNAL_CANCELED, SIGNAL_ERROR, SIGNAL_REVOKED)(on_end)

    def noop() -> None:
        return None

    def unit(key: int, task: Any = None) -> str:
        probe.started_at[key] = now()
        probe.start_event(key).set()
        length = args.body_seconds if args.workload == "cancel" else args.race_seconds
        deadline = probe.started_at[key] + length
        while (left := deadline - now()) > 0:
            time.sleep(min(TICK, left))
            if args.variant != "plain" and huey.is_revoked(task):
                probe.learned_at[key] = now()
                raise CancelExecution()
        probe.finished_at[key] = now()
        return "done"  # stored as the task's result: the record of completion

    return huey, huey.task()(noop), huey.task(context=True)(unit)


def throughput(args: Any) -> dict[str, Any]:
    """Enqueue ``n`` no-op tasks one by one while the consumer drains them."""
    probe = Probe()
    probe.target = args.n
    huey, noop, _ = setup(args, probe)
    consumer = huey.create_consumer(workers=args.workers, worker_type="thread")
    consumer.start()
    try:
        started = now()
        for _ in range(args.n):
            noop()
        enqueued = now()
        if not probe.all_done.wait(900):
            raise SystemExit(f"only {probe.completed} of {args.n} tasks completed")
        finished = now()
    finally:
        consumer.stop(graceful=True)
    return throughput_result(
        SYSTEM, "sqlite", args.n, args.workers, enqueued - started, finished - started
    )


def cancel_trials(args: Any) -> list[dict[str, Any]]:
    """Revoke a running task ``offset`` seconds after its body started, or race its end."""
    probe = Probe()
    huey, _, unit = setup(args, probe)
    if args.workload == "cancel":
        offsets = cancel_offsets(args.trials)
    else:
        offsets = race_offsets(args.trials, args.race_seconds)
    consumer = huey.create_consumer(workers=args.workers, worker_type="thread")
    consumer.start()
    trials: list[dict[str, Any]] = []
    try:
        for key, offset in enumerate(offsets):
            handle = unit(key)
            if not probe.start_event(key).wait(30):
                raise SystemExit("the task did not start")
            time.sleep(max(0.0, probe.started_at[key] + offset - now()))
            called = now()
            answer = huey.revoke_by_id(handle.id)
            returned = now()
            if not probe.end_event(handle.id).wait(60):
                raise SystemExit("the task did not end")
            learned = probe.learned_at.get(key)
            try:
                result = huey.result(handle.id, preserve=True)
                recorded = "completed (result stored)" if result == "done" else "no result"
            except TaskException:  # Huey stores the CancelExecution as the task's error
                recorded = "cancelled (CancelExecution stored)"
            revoked = huey.is_revoked(handle.id)
            if revoked:
                recorded += " + revoke flag"
            trials.append(
                {
                    "offset_s": offset,
                    "answer": repr(answer),
                    "call_s": returned - called,
                    "learned_s": None if learned is None else learned - called,
                    "ran_to_end": key in probe.finished_at,
                    "body_finished": key in probe.finished_at,
                    "end_after_call_s": (
                        probe.finished_at[key] - called if key in probe.finished_at else None
                    ),
                    "recorded": recorded,
                    "signal": probe.signal.get(handle.id),
                }
            )
    finally:
        consumer.stop(graceful=True)
    return trials


def main() -> None:
    args = parser(__doc__.split("\n", 1)[0]).parse_args()
    if args.workload == "throughput":
        emit(throughput(args))
        return
    variant = args.variant or "poll"
    args.variant = variant
    emit(
        {
            "system": SYSTEM,
            "backend": "sqlite",
            "workload": args.workload,
            "variant": (
                "body polls huey.is_revoked every 10 ms"
                if variant == "poll"
                else "body does not poll (revoke alone)"
            ),
            "trials": cancel_trials(args),
        }
    )


if __name__ == "__main__":
    main()
