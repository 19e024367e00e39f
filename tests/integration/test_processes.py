"""Real OS processes on one data directory: cross-process cancel, two hosts, SIGKILL, restarts.

Hosts run in child processes (``proc_worker.py``); the test process is usually a client
(``ActorHost(..., run_scheduler=False)``). Synchronization is by the JSON lines the workers
print on stdout; every wait is bounded by ``anyio.fail_after``; every child is killed and
reaped when a test ends, whatever happened.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import sys
from collections import Counter, defaultdict
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from actors import ActorHost
from ledger import LedgerBusyError, datetime_to_ms, ledger_relpath
from tests import helpers
from tests.helpers import fast_config
from tests.integration.proc_worker import (
    CANCELLED,
    DONE,
    QUICK,
    TERMINAL_KINDS,
    WAIT,
    AgentDO,
    pipeline,
)
from triggers import AbortError, CancelStatus
from triggers._workflow import STEP_COMPLETED
from triggers.workflows import start

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from anyio.abc import Process, TaskGroup

    from actors import Agent
    from ledger import Event, IntentState

pytestmark = [pytest.mark.anyio, pytest.mark.contract]

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().with_name("proc_worker.py")
LINE_MAX = 1 << 20


class Worker:
    """One child process running ``proc_worker.py``, and the JSON lines it has printed."""

    def __init__(self, name: str, process: Process, stderr_path: Path) -> None:
        self.name = name
        self.process = process
        self.pid = process.pid
        self.stderr_path = stderr_path
        self.lines: list[dict[str, Any]] = []
        self.eof = False
        self._changed = anyio.Event()

    def __repr__(self) -> str:
        return f"Worker({self.name}, pid={self.pid})"

    async def read_lines(self) -> None:
        """Collect stdout lines until EOF (run as a task of the ``Processes`` group)."""
        assert self.process.stdout is not None
        stream = BufferedByteReceiveStream(self.process.stdout)
        try:
            while True:
                raw = await stream.receive_until(b"\n", LINE_MAX)
                try:
                    self.lines.append(json.loads(raw))
                except ValueError:
                    self.lines.append({"event": "unparsed", "text": raw.decode(errors="replace")})
                self._notify()
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.ClosedResourceError):
            pass
        finally:
            self.eof = True
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def find(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        """The lines printed so far with this ``event`` and these field values."""
        return [
            line
            for line in self.lines
            if line.get("event") == event and all(line.get(k) == v for k, v in fields.items())
        ]

    async def expect(self, event: str, *, timeout: float = 20, **fields: Any) -> dict[str, Any]:
        """The first line with this ``event`` and these fields, waiting for it if need be."""
        with anyio.fail_after(timeout):
            while True:
                found = self.find(event, **fields)
                if found:
                    return found[0]
                if self.eof:
                    raise AssertionError(
                        f"{self} ended (rc={self.process.returncode}) without printing "
                        f"{event} {fields}; lines: {self.lines[-5:]}; stderr:\n{self.stderr()}"
                    )
                await self._changed.wait()

    async def wait_eof(self, timeout: float = 20) -> None:
        """Wait until stdout has closed (the process has exited or died); if it does not,
        fail with the stacks of its threads (``proc_worker`` dumps them as SIGABRT ends it)."""
        with anyio.move_on_after(timeout):
            while not self.eof:
                await self._changed.wait()
        if self.eof:
            return
        os.kill(self.pid, signal.SIGABRT)
        with anyio.move_on_after(10):
            await self.process.wait()  # the dump is written before the process ends
        dump = self.stderr_path.read_text(errors="replace")[-12000:]
        raise AssertionError(f"{self} still runs after {timeout} s; stderr:\n{dump}")

    async def send(self, command: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send(json.dumps(command).encode() + b"\n")

    async def stop(self) -> int:
        """Close stdin (a graceful stop), read stdout to its end and reap the process."""
        assert self.process.stdin is not None
        await self.process.stdin.aclose()
        await self.wait_eof(30)
        with anyio.fail_after(30):
            code = await self.process.wait()
        assert code == 0, f"{self} exited with {code}; stderr:\n{self.stderr()}"
        return code

    async def kill(self) -> None:
        """SIGKILL the process and reap it (so its pid no longer looks alive)."""
        assert self.process.returncode is None, (
            f"{self} had already exited ({self.process.returncode}); stderr:\n{self.stderr()}"
        )
        os.kill(self.pid, signal.SIGKILL)
        with anyio.fail_after(30):
            code = await self.process.wait()
        assert code == -signal.SIGKILL


class Processes:
    """Starts workers and guarantees every one is killed and reaped at the end."""

    def __init__(self, tmp_path: Path, data_dir: str, tg: TaskGroup) -> None:
        self.tmp_path = tmp_path
        self.data_dir = data_dir
        self.workers: list[Worker] = []
        self._tg = tg

    async def start(self, role: str, *options: str) -> Worker:
        """A worker process in ``role`` (host or client) on the shared data directory."""
        return await self.start_command(
            role,
            [sys.executable, str(WORKER), "--data-dir", str(self.data_dir), "--role", role,
             *options],
        )  # fmt: skip

    async def start_command(self, role: str, command: list[str]) -> Worker:
        name = f"{role}{len(self.workers)}"
        stderr_path = self.tmp_path / f"{name}.stderr"
        with stderr_path.open("wb") as stderr:
            process = await anyio.open_process(
                command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=stderr
            )
        worker = Worker(name, process, stderr_path)
        self.workers.append(worker)
        self._tg.start_soon(worker.read_lines)
        return worker

    async def start_host(self, *options: str) -> Worker:
        """A host process, once it has said it is ready."""
        worker = await self.start("host", *options)
        await worker.expect("ready")
        return worker

    async def reap_all(self) -> None:
        with anyio.CancelScope(shield=True):
            for worker in self.workers:
                if worker.process.returncode is None:
                    with suppress(ProcessLookupError):
                        os.kill(worker.pid, signal.SIGKILL)
                with anyio.move_on_after(30):
                    await worker.process.wait()
                await worker.process.aclose()


@asynccontextmanager
async def processes(tmp_path: Path) -> AsyncIterator[Processes]:
    async with anyio.create_task_group() as tg:
        procs = Processes(tmp_path, place(tmp_path), tg)
        try:
            yield procs
        finally:
            await procs.reap_all()
            tg.cancel_scope.cancel()


def place(tmp_path: Path) -> str:
    """Where the workers keep their ledgers: ``tmp_path/data``, or the test's database."""
    return helpers.DATABASE_URL or str(tmp_path / "data")


def place_options(tmp_path: Path) -> dict[str, Any]:
    """``ActorHost`` options naming the workers' ledgers."""
    if helpers.DATABASE_URL is not None:
        return {"database_url": helpers.DATABASE_URL}
    return {"data_dir": tmp_path / "data"}


@asynccontextmanager
async def open_client(tmp_path: Path) -> AsyncIterator[ActorHost]:
    """This test process as a client of the workers' ledgers."""
    async with ActorHost(
        AgentDO, **place_options(tmp_path), run_scheduler=False, config=fast_config()
    ) as client:
        yield client


async def wait_terminal(agent: Agent, intent_event_id: int, timeout: float = 20) -> IntentState:
    with anyio.fail_after(timeout):
        return await agent.wait_for_intent(intent_event_id)


async def terminal_facts(agent: Agent) -> dict[int, list[Event]]:
    """The actor's terminal facts, by the intent they settle."""
    facts: dict[int, list[Event]] = defaultdict(list)
    for event in await agent.events(kinds=TERMINAL_KINDS):
        assert event.intent_event_id is not None
        facts[event.intent_event_id].append(event)
    return facts


def integrity_problems(data_dir: Path) -> dict[str, list[str]]:
    """``PRAGMA integrity_check`` of every ledger and index.db, opened read-only."""
    files = [*sorted((data_dir / "actors").rglob("*.db")), data_dir / "index.db"]
    problems = {}
    for path in files:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            result = [row[0] for row in conn.execute("PRAGMA integrity_check")]
        finally:
            conn.close()
        if result != ["ok"]:
            problems[str(path)] = result
    assert len(files) > 1
    return problems


# -- 1. cross-process cancel -----------------------------------------------------------------

DIRECT_ONLY = ("--lease", "60", "--poll-interval", "30", "--no-cancel-poll")


@pytest.mark.parametrize("direct_only", [False, True], ids=["default", "direct-wakeup-only"])
async def test_cancel_from_client_aborts_attempt_in_host_process(tmp_path, direct_only):
    """A client's cancel of work running in another process answers requested, aborts that
    attempt's signal there (by direct wake-up when no fallback poll can) and ends cancelled."""
    async with processes(tmp_path) as procs:
        host = await procs.start_host(*(DIRECT_ONLY if direct_only else ()))
        async with open_client(tmp_path) as client:
            agent = client.get("chat:1")
            intent = await agent.enqueue_trigger(trigger_kind=WAIT, payload={})
            started = await host.expect("started", intent=intent.id)
            assert started["redrive"] is False
            assert started["aborted_at_start"] is False

            result = await agent.cancel_trigger(
                trigger_kind=WAIT, intent_event_id=intent.id, reason="user pressed stop"
            )
            assert result.status is CancelStatus.REQUESTED

            aborted = await host.expect("aborted", intent=intent.id)
            assert aborted["reason"] == "user pressed stop"
            state = await wait_terminal(agent, intent.id)
            assert state.status == "cancelled"
            assert state.cancel_reason == "user pressed stop"
            facts = (await terminal_facts(agent))[intent.id]
            assert [(f.kind, f.payload) for f in facts] == [
                (CANCELLED, {"pid": host.pid, "reason": "user pressed stop"})
            ]
            assert list(state.terminal_event_ids) == [facts[0].id]
            requested = await agent.events(
                intent_event_id=intent.id, kinds=["trigger.cancel_requested"]
            )
            assert [e.payload["reason"] for e in requested] == ["user pressed stop"]
        await host.stop()


async def test_cancel_between_two_worker_processes(tmp_path):
    """A cancel from a client process reaches an attempt in a host process by direct wake-up
    alone (no cancel poll, 60 s lease, 30 s poll), and the client sees it end cancelled."""
    async with processes(tmp_path) as procs:
        host = await procs.start_host(*DIRECT_ONLY)
        client = await procs.start("client")
        await client.expect("ready")
        await client.send({"op": "enqueue", "actor": "job:7", "kind": WAIT, "payload": {}})
        intent_id = (await client.expect("enqueued", actor="job:7"))["intent"]
        await host.expect("started", intent=intent_id)

        cancel = {"op": "cancel", "actor": "job:7", "kind": WAIT, "intent": intent_id}
        await client.send({**cancel, "reason": "from another process"})
        answer = await client.expect("cancel", intent_event_id=intent_id)
        assert answer["status"] == "requested"
        aborted = await host.expect("aborted", intent=intent_id)
        assert aborted["reason"] == "from another process"

        await client.send({"op": "wait", "actor": "job:7", "intent": intent_id})
        terminal = await client.expect("terminal", intent_event_id=intent_id)
        assert terminal["status"] == "cancelled"
        assert terminal["cancel_reason"] == "from another process"
        await client.stop()
        await host.stop()


async def test_call_handle_across_three_processes(tmp_path):
    """A call handle made here, on work running in a host process, fires its signal and
    raises AbortError when a third process cancels (direct wake-ups only: every poll is 30 s);
    a second handle's own ``abort`` stops its work in the host process the same way."""
    async with processes(tmp_path) as procs:
        host = await procs.start_host(*DIRECT_ONLY)
        canceller = await procs.start("client")
        await canceller.expect("ready")
        slow = fast_config(poll_interval=30)
        async with ActorHost(
            AgentDO, **place_options(tmp_path), run_scheduler=False, config=slow
        ) as client:
            agent = client.get("job:9")
            handle = agent.call(trigger_kind=WAIT, payload={})
            intent_id = await handle.wait_recorded()
            await host.expect("started", intent=intent_id)
            cancel = {"op": "cancel", "actor": "job:9", "kind": WAIT, "intent": intent_id}
            await canceller.send({**cancel, "reason": "stop from C"})
            with anyio.fail_after(20):
                await handle.signal.wait()
            assert handle.signal.reason == "stop from C"
            assert (await host.expect("aborted", intent=intent_id))["reason"] == "stop from C"
            with pytest.raises(AbortError) as caught, anyio.fail_after(20):
                await handle
            assert caught.value.reason == "stop from C"

            second = agent.call(trigger_kind=WAIT, payload={})
            second_id = await second.wait_recorded()
            await host.expect("started", intent=second_id)
            assert (await second.abort("own abort")).status is CancelStatus.REQUESTED
            assert (await host.expect("aborted", intent=second_id))["reason"] == "own abort"
            with pytest.raises(AbortError, match="own abort"), anyio.fail_after(20):
                await second
        await canceller.stop()
        await host.stop()


async def test_distributed_abort_controller_across_processes(tmp_path):
    """A creates the controller and runs work with its signal, C reconnects by id and
    listens, B reconnects and aborts: A's work stops and C's signal fires, with B's reason,
    by direct wake-ups only (every poll is 30 s). All three share one controller."""
    slow = ("--poll-interval", "30")
    async with processes(tmp_path) as procs:
        a, b, c = [await procs.start("client", *slow) for _ in range(3)]
        for worker in (a, b, c):
            await worker.expect("ready")
        await a.send({"op": "dac_work", "id": "task:build-123"})
        await a.expect("dac_work_started")
        await c.send({"op": "dac_listen", "id": "task:build-123"})
        await c.expect("dac_created")
        await b.send({"op": "dac_abort", "id": "task:build-123", "reason": "Cancelled by admin"})
        await b.expect("dac_abort_done")
        stopped = await a.expect("dac_work_stopped")
        heard = await c.expect("dac_fired")
        assert stopped["reason"] == heard["reason"] == "Cancelled by admin"
        run_ids = {w.find("dac_created")[0]["run_id"] for w in (a, b, c)}
        assert len(run_ids) == 1
        for worker in (a, b, c):
            await worker.stop()


async def test_distributed_abort_survives_the_creator_sigkill(tmp_path):
    """The process that created the controller and ran work with it is killed with SIGKILL;
    the abort sent afterwards is still durable, and a process that connects later sees it."""
    async with processes(tmp_path) as procs:
        a = await procs.start("client")
        await a.expect("ready")
        await a.send({"op": "dac_work", "id": "chat:9"})
        await a.expect("dac_work_started")
        await a.kill()
        b = await procs.start("client")
        await b.expect("ready")
        await b.send({"op": "dac_abort", "id": "chat:9", "reason": "user pressed stop"})
        await b.expect("dac_abort_done")
        await b.stop()
        c = await procs.start("client")
        await c.expect("ready")
        await c.send({"op": "dac_listen", "id": "chat:9"})
        assert (await c.expect("dac_fired"))["reason"] == "user pressed stop"
        assert c.find("dac_created")[0]["run_id"] == a.find("dac_created")[0]["run_id"]
        await c.stop()


async def test_distributed_abort_create_races_across_processes(tmp_path):
    """Four processes create the same controller at the same moment: one controller."""
    async with processes(tmp_path) as procs:
        workers = [await procs.start("client") for _ in range(4)]
        for worker in workers:
            await worker.expect("ready")
        async with anyio.create_task_group() as tg:
            for worker in workers:
                tg.start_soon(worker.send, {"op": "dac_create", "id": "race"})
        created = [await worker.expect("dac_created") for worker in workers]
        assert len({line["run_id"] for line in created}) == 1
        async with open_client(tmp_path) as client:
            assert len(await client.get("race").intents()) == 1
        for worker in workers:
            await worker.stop()


async def test_workflow_run_survives_a_sigkill_mid_step(tmp_path):
    """A host running a workflow is killed with SIGKILL during its second step. The next host
    replays the run: the first step's recorded result is reused (it never runs again), the
    interrupted second step runs again, and the run completes with both results."""
    async with processes(tmp_path) as procs:
        first = await procs.start_host()
        async with open_client(tmp_path) as client:
            run = await start(pipeline, ["t1"], actor=client.get("wf:1"))
            await first.expect("wf_step", step="one")
            await first.expect("wf_step", step="two")
            await first.kill()
            second = await procs.start_host()
            await second.expect("wf_step", step="two")
            await second.send({"op": "release", "actor": "wf:t1", "intent": 0})
            with anyio.fail_after(30):
                assert await run.result() == ["one:t1", "two:t1"]
            assert first.find("wf_step", step="one") != []
            assert second.find("wf_step", step="one") == [], "a recorded step ran again"
            completed = await client.get("wf:1").events(kinds=[STEP_COMPLETED])
            assert [e.payload["seq"] for e in completed] == [1, 2]
        await second.stop()


# -- 2. two hosts on one data directory ------------------------------------------------------


async def test_two_host_processes_run_each_intent_once(tmp_path):
    """Two host processes sharing a data directory complete every intent, each with one
    terminal fact, and no acquire runs twice for the same intent."""
    rng = random.Random(2)
    async with processes(tmp_path) as procs:
        hosts = [await procs.start_host(), await procs.start_host()]
        intents: list[tuple[str, int]] = []
        async with open_client(tmp_path) as client:
            for n in range(200):
                actor = f"actor-{n % 10}"
                if n % 2:
                    event = await client.get(actor).enqueue_trigger(trigger_kind=QUICK)
                else:
                    seconds = rng.choice([0, 0.005, 0.02])
                    event = await client.get(actor).enqueue_trigger(
                        trigger_kind=WAIT, payload={"seconds": seconds}
                    )
                intents.append((actor, event.id))
            for actor, intent_id in intents:
                state = await wait_terminal(client.get(actor), intent_id, timeout=60)
                assert state.status == "completed", state
            facts: dict[tuple[str, int], list[Event]] = {}
            for actor in {actor for actor, _ in intents}:
                for intent_id, events in (await terminal_facts(client.get(actor))).items():
                    facts[actor, intent_id] = events
        for host in hosts:
            await host.stop()  # reads each host's stdout to its end

    assert set(facts) == set(intents)
    assert all([e.kind for e in events] == [DONE] for events in facts.values())
    starts = Counter(
        (line["actor"], line["intent"]) for host in hosts for line in host.find("started")
    )
    assert set(starts) == set(intents)
    assert [key for key, count in starts.items() if count > 1] == []
    # The fact of each intent was written by the host whose acquire ran it.
    started_by = {
        (line["actor"], line["intent"]): line["pid"]
        for host in hosts
        for line in host.find("started")
    }
    assert all(facts[key][0].payload["pid"] == started_by[key] for key in intents)


# -- 3 and 4. SIGKILL mid-acquire, then a restart --------------------------------------------

LONG_LEASE = ("--lease", "60")


async def test_sigkill_mid_acquire_is_redriven_by_the_next_host(tmp_path):
    """After a host is SIGKILLed mid-acquire, a new host sees the owner is dead and redrives
    the intent long before the 60 s lease could expire; it ends with one terminal fact."""
    async with processes(tmp_path) as procs, open_client(tmp_path) as client:
        host_a = await procs.start_host(*LONG_LEASE)
        agent = client.get("chat:kill")
        intent = await agent.enqueue_trigger(trigger_kind=WAIT, payload={"seconds": 3600})
        first = await host_a.expect("started", intent=intent.id)
        assert first["redrive"] is False
        await host_a.kill()
        assert (await agent.intent(intent.id)).status == "running"

        host_b = await procs.start("host", *LONG_LEASE)
        redrive = await host_b.expect("started", intent=intent.id, timeout=20)
        assert redrive["redrive"] is True
        assert redrive["aborted_at_start"] is False
        assert redrive["attempt"] == first["attempt"]
        await host_b.send({"op": "release", "actor": agent.actor_id, "intent": intent.id})

        state = await wait_terminal(agent, intent.id)
        assert state.status == "completed"
        facts = (await terminal_facts(agent))[intent.id]
        assert [(f.kind, f.payload["pid"]) for f in facts] == [(DONE, host_b.pid)]
        assert list(state.terminal_event_ids) == [facts[0].id]
        await host_b.stop()
    assert host_b.find("started", intent=intent.id) == [redrive]


async def test_ctrl_c_on_a_host_script_releases_the_running_attempt(tmp_path):
    """SIGINT to a plain ``anyio.run`` host script (Ctrl-C) cancels its main task: the host
    stops in order, as leaving it does (the attempt's signal aborts with reason "shutdown"
    after the grace and the intent is released, uncounted), and the process exits; the next
    host runs the intent at once, not after the 60 s lease."""
    async with processes(tmp_path) as procs, open_client(tmp_path) as client:
        host_a = await procs.start_host(*LONG_LEASE)
        agent = client.get("chat:ctrl-c")
        intent = await agent.enqueue_trigger(trigger_kind=WAIT, payload={"seconds": 3600})
        await host_a.expect("started", intent=intent.id)
        os.kill(host_a.pid, signal.SIGINT)
        await host_a.wait_eof()
        with anyio.fail_after(30):
            code = await host_a.process.wait()
        assert code != -signal.SIGKILL
        assert "KeyboardInterrupt" in host_a.stderr()
        state = await agent.intent(intent.id)
        assert (state.status, state.attempts) == ("pending", 0)

        host_b = await procs.start("host", *LONG_LEASE)
        again = await host_b.expect("started", intent=intent.id)
        assert (again["attempt"], again["redrive"]) == (1, True)
        await host_b.send({"op": "release", "actor": agent.actor_id, "intent": intent.id})
        assert (await wait_terminal(agent, intent.id)).status == "completed"
        await host_b.stop()


async def test_a_second_ctrl_c_during_the_grace_ends_the_host_script(tmp_path):
    """A second SIGINT while the host gives its attempt the shutdown grace ends the process
    at once (asyncio's runner then cancels every task, past the host's shields) rather than
    leaving it hanging; the claim it held is redriven by the next host, which sees its owner
    dead, and the intent ends with one terminal fact."""
    async with processes(tmp_path) as procs, open_client(tmp_path) as client:
        host_a = await procs.start_host(*LONG_LEASE, "--shutdown-grace", "60")
        agent = client.get("chat:ctrl-c-twice")
        intent = await agent.enqueue_trigger(trigger_kind=WAIT, payload={"seconds": 3600})
        await host_a.expect("started", intent=intent.id)
        os.kill(host_a.pid, signal.SIGINT)
        await host_a.expect("stopping")
        os.kill(host_a.pid, signal.SIGINT)
        await host_a.wait_eof()
        with anyio.fail_after(30):
            assert await host_a.process.wait() != -signal.SIGKILL
        assert "KeyboardInterrupt" in host_a.stderr()

        host_b = await procs.start("host", *LONG_LEASE)
        again = await host_b.expect("started", intent=intent.id)
        assert again["redrive"] is True
        await host_b.send({"op": "release", "actor": agent.actor_id, "intent": intent.id})
        assert (await wait_terminal(agent, intent.id)).status == "completed"
        facts = (await terminal_facts(agent))[intent.id]
        assert [(f.kind, f.payload["pid"]) for f in facts] == [(DONE, host_b.pid)]
        await host_b.stop()


async def test_cancel_while_no_host_runs_reaches_the_redrive(tmp_path):
    """A cancel of work whose host was SIGKILLed answers requested; the next host's redrive
    starts with its signal already aborted and the intent ends cancelled with the reason."""
    async with processes(tmp_path) as procs, open_client(tmp_path) as client:
        host_a = await procs.start_host(*LONG_LEASE)
        agent = client.get("chat:orphan")
        intent = await agent.enqueue_trigger(trigger_kind=WAIT, payload={"seconds": 3600})
        await host_a.expect("started", intent=intent.id)
        await host_a.kill()

        result = await agent.cancel_trigger(
            trigger_kind=WAIT, intent_event_id=intent.id, reason="nobody is home"
        )
        assert result.status is CancelStatus.REQUESTED
        assert (await agent.intent(intent.id)).status == "running"
        assert host_a.find("aborted") == []

        host_b = await procs.start("host", *LONG_LEASE)
        redrive = await host_b.expect("started", intent=intent.id, timeout=20)
        assert redrive["redrive"] is True
        assert redrive["aborted_at_start"] is True
        aborted = await host_b.expect("aborted", intent=intent.id)
        assert aborted["reason"] == "nobody is home"

        state = await wait_terminal(agent, intent.id)
        assert state.status == "cancelled"
        facts = (await terminal_facts(agent))[intent.id]
        assert [(f.kind, f.payload) for f in facts] == [
            (CANCELLED, {"pid": host_b.pid, "reason": "nobody is home"})
        ]
        await host_b.stop()


# -- what the kill tests turned up: redrive limit, ledger locks, unreaped hosts --------------


async def test_cancel_requested_survives_the_redrive_limit(tmp_path):
    """A cancel answered requested still ends the intent cancelled when its lost claims hit
    the redrive limit: a requested cancel never turns into a failure."""
    options = ("--lease", "60", "--max-redrives", "0")
    async with processes(tmp_path) as procs, open_client(tmp_path) as client:
        host_a = await procs.start_host(*options)
        agent = client.get("chat:poison")
        intent = await agent.enqueue_trigger(trigger_kind=WAIT, payload={"seconds": 3600})
        await host_a.expect("started", intent=intent.id)
        await host_a.kill()
        result = await agent.cancel_trigger(
            trigger_kind=WAIT, intent_event_id=intent.id, reason="stop the poison"
        )
        assert result.status is CancelStatus.REQUESTED

        host_b = await procs.start_host(*options)
        state = await wait_terminal(agent, intent.id)
        facts = (await terminal_facts(agent))[intent.id]
        await host_b.stop()
    assert [(f.kind, f.payload.get("reason")) for f in facts] == [(CANCELLED, "stop the poison")]
    assert state.status == "cancelled"


# Holds a write transaction on one SQLite file until its stdin closes.
LOCKER = """
import json, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print(json.dumps({"event": "locked"}), flush=True)
sys.stdin.read()
conn.execute("ROLLBACK")
"""


@pytest.mark.sqlite_only
async def test_enqueue_while_another_process_holds_the_ledger_lock(tmp_path):
    """While another process holds an actor's ledger write-locked past the lock timeout, an
    enqueue raises LedgerBusyError; it never returns (or fails with) a missing result."""
    async with (
        processes(tmp_path) as procs,
        ActorHost(
            AgentDO, data_dir=tmp_path / "data", run_scheduler=False, lock_timeout=1.0
        ) as client,
    ):
        agent = client.get("chat:locked")
        first = await agent.enqueue_trigger(trigger_kind=QUICK)
        path = tmp_path / "data" / ledger_relpath(agent.actor_id)
        locker = await procs.start_command("locker", [sys.executable, "-c", LOCKER, str(path)])
        await locker.expect("locked")
        with anyio.fail_after(20), pytest.raises(LedgerBusyError):
            await agent.enqueue_trigger(trigger_kind=QUICK)
        await locker.stop()
        intents = await agent.intents()
    assert [state.intent_event_id for state in intents] == [first.id]


# A parent that does not reap its child until SIGTERM: the child stays a zombie once killed.
# (asyncio reaps its own children at once, so the test needs a parent in between.)
LAZY_PARENT = """
import os, signal, subprocess, sys
child = subprocess.Popen(sys.argv[1:])
os.close(1)  # only the child writes the stdout pipe: it closes when the child dies

def stop(*_):
    if child.returncode is None:
        child.kill()
    child.wait()
    os._exit(0)

signal.signal(signal.SIGTERM, stop)
while True:
    signal.pause()
"""


async def test_sigkilled_host_not_yet_reaped_counts_as_dead(tmp_path):
    """A SIGKILLed host that its parent has not reaped yet (a zombie) is dead: a new host
    redrives its claim without waiting for the 60 s lease."""
    async with processes(tmp_path) as procs, open_client(tmp_path) as client:
        worker_command = [sys.executable, str(WORKER), "--data-dir", str(procs.data_dir)]
        parent = await procs.start_command(
            "lazy-parent", [sys.executable, "-c", LAZY_PARENT, *worker_command, "--role",
                            "host", *LONG_LEASE],
        )  # fmt: skip
        try:
            host_a_pid = (await parent.expect("ready"))["pid"]
            agent = client.get("chat:zombie")
            intent = await agent.enqueue_trigger(trigger_kind=WAIT, payload={"seconds": 3600})
            await parent.expect("started", intent=intent.id)
            pidfd = os.pidfd_open(host_a_pid)
            try:
                os.kill(host_a_pid, signal.SIGKILL)
                with anyio.fail_after(20):
                    await anyio.wait_readable(pidfd)  # readable once host A has exited
            finally:
                os.close(pidfd)
            await parent.wait_eof()
            state = Path(f"/proc/{host_a_pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            assert state == "Z"  # dead, not reaped

            host_b = await procs.start("host", *LONG_LEASE)
            redrive = await host_b.expect("started", intent=intent.id, timeout=10)
            assert redrive["redrive"] is True
            await host_b.send({"op": "release", "actor": agent.actor_id, "intent": intent.id})
            assert (await wait_terminal(agent, intent.id)).status == "completed"
            await host_b.stop()
        finally:
            with anyio.CancelScope(shield=True), suppress(ProcessLookupError):
                os.kill(parent.pid, signal.SIGTERM)  # kills and reaps host A, then exits
                with anyio.move_on_after(20):
                    await parent.process.wait()


# -- 5. due times survive restarts -----------------------------------------------------------


async def test_due_time_recorded_while_no_host_runs_fires_after_start(tmp_path):
    """Work enqueued for later while no host (and, later, no client) runs is run by a host
    started afterwards, at its due time, re-armed from the ledgers (30 s fallback poll)."""
    due = datetime.now(UTC) + timedelta(seconds=1.5)
    async with open_client(tmp_path) as client:
        intent = await client.get("cron").enqueue_trigger(trigger_kind=QUICK, at=due)
        assert (await client.get("cron").intent(intent.id)).status == "pending"

    async with processes(tmp_path) as procs:
        host = await procs.start_host("--poll-interval", "30")
        async with open_client(tmp_path) as client:
            agent = client.get("cron")
            state = await wait_terminal(agent, intent.id)
            assert state.status == "completed"
            facts = (await terminal_facts(agent))[intent.id]
            assert [f.kind for f in facts] == [DONE]
            assert facts[0].ts >= datetime_to_ms(due)
        await host.stop()
    assert len(host.find("started", intent=intent.id)) == 1
