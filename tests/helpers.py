"""Building blocks shared by the tests: controllable triggers and hosts on temp dirs."""

from __future__ import annotations

import pathlib
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio

from actors import ActorHost, AgentSpec, define_agent_do
from ledger import JSON, LedgerStore, Store, system_clock
from triggers import (
    Cancellation,
    DurableTrigger,
    Failure,
    RetryPolicy,
    SchedulerConfig,
    TriggerContext,
    Tx,
)

if TYPE_CHECKING:
    from pathlib import Path

    from actors import Agent

DONE = "test.done"
CANCELLED = "test.cancelled"
FAILED = "test.failed"
TERMINAL_KINDS = (DONE, CANCELLED, FAILED)

Acquire = Callable[[JSON, TriggerContext], Awaitable[JSON]]

DATABASE_URL: str | None = None
"""Set by ``tests/conftest.py`` while a contract test runs on PostgreSQL."""


class ManualClock:
    """An injectable epoch-ms clock that moves only when told."""

    def __init__(self) -> None:
        self.now = system_clock()

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        """Move the clock forward by ``ms`` milliseconds."""
        self.now += ms


class Gate:
    """Lets a test hold ``acquire`` until it says so, and know when it started.

    ``started[i]`` is set when the attempt of intent ``i`` enters acquire; the acquire then
    waits for ``release[i]`` (or for its signal to abort, raising AbortError).
    """

    def __init__(self) -> None:
        self.started: dict[int, anyio.Event] = {}
        self.release: dict[int, anyio.Event] = {}
        self.attempts: list[tuple[int, int, bool, bool]] = []
        """(intent, attempt, redrive, signal already aborted at start) per attempt."""

    def _get(self, table: dict[int, anyio.Event], intent_event_id: int) -> anyio.Event:
        event = table.get(intent_event_id)
        if event is None:
            event = table[intent_event_id] = anyio.Event()
        return event

    async def wait_started(self, intent_event_id: int) -> None:
        with anyio.fail_after(10):
            await self._get(self.started, intent_event_id).wait()

    def open(self, intent_event_id: int) -> None:
        self._get(self.release, intent_event_id).set()

    async def acquire(self, intent: JSON, ctx: TriggerContext) -> JSON:
        self.attempts.append((ctx.intent_event_id, ctx.attempt, ctx.redrive, ctx.signal.aborted))
        self._get(self.started, ctx.intent_event_id).set()
        with ctx.signal.scope():
            await self._get(self.release, ctx.intent_event_id).wait()
        return {"intent": intent, "attempt": ctx.attempt}


def commit(outcome: JSON, tx: Tx) -> None:
    tx.insert_event(kind=DONE, payload=outcome)


def commit_cancelled(intent: JSON, cancellation: Cancellation, tx: Tx) -> None:
    tx.insert_event(kind=CANCELLED, payload={"reason": cancellation.reason})


def commit_failed(intent: JSON, failure: Failure, tx: Tx) -> None:
    tx.insert_event(kind=FAILED, payload=failure.model_dump())


def identity(payload: JSON) -> JSON:
    return payload


async def noop(intent: JSON, ctx: TriggerContext) -> JSON:
    return intent


def make_trigger(
    kind: str = "test.work",
    acquire: Acquire = noop,
    *,
    cancellation: str = "cooperative",
    **extra: Any,
) -> DurableTrigger[Any, Any]:
    """A trigger that writes exactly one ``test.*`` fact per terminal transition."""
    spec: dict[str, Any] = {
        "kind": kind,
        "intent_event_kind": f"{kind}.requested",
        "cancellation": cancellation,
        "parse_intent": identity,
        "acquire": acquire,
        "commit": commit,
        "commit_cancelled": commit_cancelled,
        "commit_failed": commit_failed,
        "retry": RetryPolicy(max_attempts=3, initial_backoff=0, jitter=False),
    }
    spec.update(extra)
    return spec  # type: ignore[return-value]


def fast_config(**overrides: Any) -> SchedulerConfig:
    """Scheduler settings for tests: short lease and poll so fallbacks run quickly."""
    values: dict[str, Any] = {"lease": 3.0, "poll_interval": 0.2, "shutdown_grace": 0.5}
    values.update(overrides)
    return SchedulerConfig(**values)


@asynccontextmanager
async def open_host(
    data_dir: Path,
    *triggers: DurableTrigger[Any, Any],
    spec: AgentSpec | None = None,
    **options: Any,
) -> AsyncIterator[ActorHost]:
    """An ``ActorHost`` running the given triggers (fast test config), over ``data_dir``, or
    over the test's PostgreSQL database when a contract test runs on that backend."""
    options.setdefault("config", fast_config())
    spec = spec or define_agent_do(triggers=list(triggers))
    place: dict[str, Any] = {"data_dir": data_dir}
    if DATABASE_URL is not None:
        place = {"database_url": DATABASE_URL}
        options.pop("synchronous", None)
        options.pop("max_open_ledgers", None)
        options.pop("lock_timeout", None)
    async with ActorHost(spec, **place, **options) as host:
        yield host


def place(data_dir: Path) -> dict[str, Any]:
    """``ActorHost`` options for ``data_dir``, or for the test's PostgreSQL database when a
    contract test runs on that backend."""
    if DATABASE_URL is not None:
        return {"database_url": DATABASE_URL}
    return {"data_dir": data_dir}


def open_store(data_dir: Path, **options: Any) -> Store:
    """A ledger store over ``data_dir``, or over the test's PostgreSQL database when a
    contract test runs on that backend; enter it with ``async with``."""
    if DATABASE_URL is not None:
        from ledger.postgres import PostgresStore

        return PostgresStore(DATABASE_URL, **options)
    return LedgerStore(data_dir, **options)


async def wait_until(
    agent: Agent, check: Callable[[], Awaitable[bool]], *, timeout: float = 20
) -> None:
    """Wait until ``check()`` holds, re-checking after each change of the agent's actor (no
    polling: every committed write to the actor wakes this)."""
    store = agent._host.store
    with anyio.fail_after(timeout):
        while True:
            version = store.version(agent.actor_id)
            if await check():
                return
            await store.wait_changed(agent.actor_id, version)


ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_example(script: str, data_dir: Path) -> list[str]:
    """Run ``examples/<script>`` with ``data_dir`` in a fresh interpreter; its stdout lines.

    Fails (showing stderr) if it exits non-zero or prints a traceback.
    """
    result = subprocess.run(
        [sys.executable, f"examples/{script}", str(data_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout.splitlines()


async def wait_for_lock_waiter(url: str) -> None:
    """Return once some backend of the test database waits for a row lock (each check is a
    round trip to the server; nothing sleeps)."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        with anyio.fail_after(10):
            while not await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ):
                pass
    finally:
        await conn.close()
