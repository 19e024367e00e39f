"""Faults: the disk filling up, the clock jumping backwards, PostgreSQL restarting under load.

(A corrupt ledger file, a ledger locked by another process for a long time and running out of
file descriptors have their tests beside the ledger's: ``tests/integration/test_ledger.py``
and ``test_processes.py``.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from actors import ActorHost, define_agent_do
from ledger import LedgerWriteError
from tests.helpers import (
    CANCELLED,
    DONE,
    TERMINAL_KINDS,
    Gate,
    ManualClock,
    fast_config,
    make_trigger,
    open_host,
)
from tests.helpers import ROOT as REPO

if TYPE_CHECKING:
    from pathlib import Path

    from tests.postgres import PostgresServer

pytestmark = [pytest.mark.anyio, pytest.mark.reliability]

KIND = "test.work"

DISK_FULL = """
import json, resource, signal, sys
import anyio
from ledger import LedgerError, LedgerStore

LIMIT = 2 << 20
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def blobs(tx):
    for n in range(8):
        tx.insert_event("blob", "x" * 400_000)


async def main(data_dir):
    report = {}
    async with LedgerStore(data_dir) as store:
        await store.run("small", lambda tx: tx.insert_event("note", 1))
        try:
            await store.run("big", blobs)
        except LedgerError as exc:
            report["error"] = [type(exc).__name__, str(exc)]
        report["big_events"] = len(await store.run("big", lambda tx: tx.events(), write=False))
        event = await store.run("small", lambda tx: tx.insert_event("note", 2))
        report["small_after"] = event.id
        report["small_events"] = [
            e.payload for e in await store.run("small", lambda tx: tx.events(), write=False)
        ]
    print(json.dumps(report))


anyio.run(main, sys.argv[1])
"""


@pytest.mark.sqlite_only
def test_a_full_disk_fails_the_write_clearly_and_keeps_serving(tmp_path: Path) -> None:
    """In a real process whose files may not grow past 2 MiB (``RLIMIT_FSIZE``: the write
    fails as on a full disk), a 3 MB transaction fails with ``LedgerWriteError``, nothing of
    it is left, and the same store keeps serving other actors."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(DISK_FULL), str(tmp_path / "data")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    name, message = report["error"]
    assert name == "LedgerWriteError"
    assert "nothing was written" in message
    assert report["big_events"] == 0
    assert report["small_after"] == 2
    assert report["small_events"] == [1, 2]


@pytest.mark.contract
async def test_the_clock_jumping_backwards_loses_and_repeats_nothing(tmp_path: Path) -> None:
    """The clock jumps an hour back while an attempt runs, then two hours forward: work due
    "now" still runs, a cancel still stops the running attempt, and every intent ends with
    exactly one terminal fact."""
    clock = ManualClock()
    gate = Gate()
    trigger = make_trigger(KIND, gate.acquire)
    async with open_host(tmp_path, trigger, clock=clock) as host:
        agent = host.get("a")
        first = await agent.enqueue_trigger(trigger_kind=KIND)
        await gate.wait_started(first.id)

        clock.advance(-3_600_000)
        second = await agent.enqueue_trigger(trigger_kind=KIND)
        await gate.wait_started(second.id)
        result = await agent.cancel_trigger(trigger_kind=KIND, intent_event_id=first.id)
        assert result.status == "requested"
        with anyio.fail_after(20):
            assert (await agent.wait_for_intent(first.id)).status == "cancelled"

        clock.advance(7_200_000)
        third = await agent.enqueue_trigger(trigger_kind=KIND)
        await gate.wait_started(third.id)
        for intent in (second, third):
            gate.open(intent.id)
        with anyio.fail_after(20):
            for intent in (second, third):
                assert (await agent.wait_for_intent(intent.id)).status == "completed"
        facts = await agent.events(kinds=TERMINAL_KINDS)
    by_intent: dict[int | None, list[str]] = {}
    for fact in facts:
        by_intent.setdefault(fact.intent_event_id, []).append(fact.kind)
    assert by_intent == {first.id: [CANCELLED], second.id: [DONE], third.id: [DONE]}


async def test_postgres_restarting_under_load_loses_nothing(
    postgres_server: PostgresServer,
) -> None:
    """Two hosts run a stream of work; the server restarts in the middle (every connection
    cut). Callers retry what failed with the same idempotency key. Afterwards every intent
    ended once, with exactly one terminal fact, and nothing is stuck."""
    url = postgres_server.create_database()
    spec = define_agent_do(triggers=[make_trigger(KIND)])
    config = fast_config()
    keys: dict[str, tuple[str, int]] = {}
    restarted = anyio.Event()

    async def enqueue(host: ActorHost, n: int) -> None:
        key, actor = f"job-{n}", f"actor-{n % 7}"
        with anyio.fail_after(60):
            while True:
                try:
                    event = await host.get(actor).enqueue_trigger(
                        trigger_kind=KIND, payload=n, idempotency_key=key
                    )
                except LedgerWriteError:
                    # Retried once the server is back (the store reconnects before it answers).
                    await restarted.wait()
                    continue
                keys[key] = (actor, event.id)
                return

    async with (
        ActorHost(spec, database_url=url, config=config) as one,
        ActorHost(spec, database_url=url, config=config) as two,
    ):
        async with anyio.create_task_group() as tg:
            for n in range(120):
                tg.start_soon(enqueue, one if n % 2 else two, n)
                if n == 60:
                    await anyio.wait_all_tasks_blocked()
                    await anyio.to_thread.run_sync(postgres_server.restart)
                    restarted.set()
        states: dict[str, Any] = {}
        with anyio.fail_after(60):
            for key, (actor, intent_id) in keys.items():
                states[key] = await one.get(actor).wait_for_intent(intent_id)
        facts: dict[tuple[str, int | None], list[str]] = {}
        stuck = []
        for actor in {actor for actor, _ in keys.values()}:
            agent = two.get(actor)
            for fact in await agent.events(kinds=TERMINAL_KINDS):
                facts.setdefault((actor, fact.intent_event_id), []).append(fact.kind)
            stuck += await agent.intents(status="running")
            stuck += await agent.intents(status="pending")
    assert len(keys) == 120
    assert {state.status for state in states.values()} == {"completed"}
    assert stuck == []
    assert sorted(facts) == sorted(keys.values())
    assert all(kinds == [DONE] for kinds in facts.values())


async def test_a_postgres_outage_longer_than_a_reconnect_leaves_the_host_running(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server stays down longer than one reconnect tries for: the host's housekeeping
    reports the registry unreadable and carries on (before, the reconnect's timeout ended
    the host). Once the server is back, the same host runs new work and stops cleanly."""
    from ledger import _pg

    monkeypatch.setattr(_pg, "_RECONNECT_S", 0.2)  # a reconnect gives up after about 1.2 s
    url = postgres_server.create_database()
    spec = define_agent_do(triggers=[make_trigger(KIND)])
    async with ActorHost(spec, database_url=url, config=fast_config()) as host:
        agent = host.get("chat")
        first = await agent.enqueue_trigger(trigger_kind=KIND)
        with anyio.fail_after(20):
            assert (await agent.wait_for_intent(first.id)).status == "completed"

        unreadable = anyio.Event()
        refresh = host._refresh_and_recover

        async def watched() -> bool:
            readable = await refresh()
            if not readable:
                unreadable.set()
            return readable

        monkeypatch.setattr(host, "_refresh_and_recover", watched)
        await anyio.to_thread.run_sync(postgres_server.halt)
        try:
            with anyio.fail_after(30):
                await unreadable.wait()  # a reconnect gave up: the registry was unreadable
        finally:
            await anyio.to_thread.run_sync(postgres_server.resume)
        with anyio.fail_after(30):
            # The store reconnects before it answers: no error to retry.
            second = await agent.enqueue_trigger(trigger_kind=KIND)
            assert (await agent.wait_for_intent(second.id)).status == "completed"
        facts = await agent.events(kinds=TERMINAL_KINDS)
    assert [(f.intent_event_id, f.kind) for f in facts] == [(first.id, DONE), (second.id, DONE)]
