"""``ActorHost``: serves the actors of one actor class from a data directory."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import signal
import threading
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from ledger import (
    Clock,
    Committed,
    Directory,
    LedgerClosedError,
    LedgerError,
    LedgerStore,
    ProcessInfo,
    Store,
    duration_ms,
    ledger_relpath,
    system_clock,
)
from triggers import Scheduler, SchedulerConfig
from triggers._streaks import FailureStreak

from ._agent import Agent
from ._errors import HostClosedError
from ._gc import check_threshold, raised_threshold
from ._spec import AgentSpec
from ._wakeup import Message, WakeupSocket, classify

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator
    from pathlib import Path
    from types import FrameType

    from anyio.abc import TaskGroup

    from ._pgwake import NotifyWakeup

_log = structlog.get_logger("actors")


def _check_count(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, not {value}")


@contextlib.contextmanager
def _interrupts_at_the_loop() -> Iterator[None]:
    """Meanwhile, the Python handler of SIGINT runs as a callback of the event loop, not in
    whatever code the main thread happens to run.

    A second Ctrl-C while the host gives its attempts their grace raises KeyboardInterrupt
    from the handler asyncio's runner installs. Raised in the host's own exit, it would be
    caught by the exit's stack and held until the grace ends; raised in a callback, it ends
    the event loop at once. Only the main thread can do this; elsewhere nothing changes.
    """
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield
        return
    handler = previous
    loop = asyncio.get_running_loop()

    def deferred(signum: int, frame: FrameType | None) -> None:
        if loop.is_closed():
            handler(signum, frame)
        else:
            loop.call_soon_threadsafe(handler, signum, frame)

    signal.signal(signal.SIGINT, deferred)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is deferred:
            signal.signal(signal.SIGINT, previous)


class ActorHost:
    """Serves the actors of one actor class; an async context manager.

    The ledgers live in SQLite files under ``data_dir`` (the embedded default), or in one
    PostgreSQL database at ``database_url`` (hosts on any number of machines). Give exactly
    one of the two.

    With ``run_scheduler=True`` (the default) it claims and runs due work; with
    ``run_scheduler=False`` it is a client that enqueues, cancels and reads. Any number of
    hosts and clients may share one data directory or database, in one process or many.

    Args:
        spec: the actor class, from ``define_agent_do``.
        data_dir: where the SQLite ledgers live (created if missing).
        database_url: a ``postgresql://`` URL; needs the ``postgres`` extra (asyncpg).
        run_scheduler: run the trigger scheduler in this process.
        synchronous: SQLite durability: ``"NORMAL"`` (default; a commit survives a process
            crash, and the OS crash window is the last moments of writes) or ``"FULL"``
            (every commit is flushed to disk before it returns).
        config: scheduler tuning (concurrency, lease, poll interval, shutdown grace...).
        max_open_ledgers: most ledger files kept open; idle actors beyond it hibernate
            (SQLite).
        shards: ledger worker threads (SQLite) or database connections running batches
            side by side (PostgreSQL; default 2).
        clock: epoch-millisecond time source.
        idempotency_retention: how long an ended intent keeps its idempotency key (a
            ``timedelta`` or seconds).
        lock_timeout: seconds to wait for a ledger locked by another process.
        gc_threshold: while the host runs, the first threshold of Python's cyclic garbage
            collector is at least this (CPython's default is 700). A busy host keeps
            thousands of short-lived objects in flight that reference counting frees; at
            700 the collector traverses them again and again (measured: 14 % of a busy
            host's CPU). The setting is the process's: the last host to stop puts back the
            thresholds it found, unless they were changed meanwhile. None leaves the
            collector alone.
    """

    def __init__(
        self,
        spec: AgentSpec,
        *,
        data_dir: str | Path | None = None,
        database_url: str | None = None,
        run_scheduler: bool = True,
        synchronous: str = "NORMAL",
        config: SchedulerConfig | None = None,
        max_open_ledgers: int = 512,
        shards: int | None = None,
        clock: Clock = system_clock,
        idempotency_retention: timedelta | float = timedelta(days=1),
        lock_timeout: float = 10.0,
        gc_threshold: int | None = 10_000,
    ) -> None:
        if not isinstance(spec, AgentSpec):
            raise TypeError("spec must come from define_agent_do(...)")
        _check_count(max_open_ledgers, "max_open_ledgers")
        if shards is not None:
            _check_count(shards, "shards")
        if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, int | float):
            raise TypeError(f"lock_timeout must be a number of seconds, not {lock_timeout!r}")
        if not math.isfinite(lock_timeout) or lock_timeout < 0:
            raise ValueError(f"lock_timeout must be a number of seconds >= 0, not {lock_timeout!r}")
        retention_ms = duration_ms(idempotency_retention, "idempotency_retention")
        if config is not None and not isinstance(config, SchedulerConfig):
            raise TypeError(f"config must be a SchedulerConfig, not {type(config).__name__}")
        check_threshold(gc_threshold)
        self.gc_threshold = gc_threshold
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', not {synchronous!r}")
        self.spec = spec
        self.config = config or SchedulerConfig()
        self.run_scheduler = run_scheduler
        if (data_dir is None) == (database_url is None):
            raise TypeError("give exactly one of data_dir= and database_url=")
        self.store: Store
        if database_url is not None:
            if not isinstance(database_url, str) or not database_url.startswith(
                ("postgresql://", "postgres://")
            ):
                raise ValueError("database_url must be a postgresql:// URL")
            from ledger.postgres import PostgresStore

            self.store = PostgresStore(
                database_url,
                projections=spec.projections,
                shards=2 if shards is None else shards,
                clock=clock,
                # The kinds an eager claim asks about: those this host's scheduler runs.
                due_kinds=spec.registry.kinds if run_scheduler else None,
            )
        else:
            assert data_dir is not None
            self.store = LedgerStore(
                data_dir,
                projections=spec.projections,
                synchronous="FULL" if synchronous == "FULL" else "NORMAL",
                max_open=max_open_ledgers,
                shards=1 if shards is None else shards,
                clock=clock,
                lock_timeout=lock_timeout,
            )
        self.key_retention_ms = retention_ms
        self.store.key_retention_ms = retention_ms  # for keys given to a commit's tx.enqueue
        self.scheduler: Scheduler | None = None
        self._wake: WakeupSocket | NotifyWakeup | None = None
        self._peers: list[ProcessInfo] = []
        self._refresh_failures = FailureStreak(_log, "registry_refresh_failed")
        self._late: collections.deque[tuple[str, int, str, str | None]] = collections.deque()
        """Cancels for owners the wake-up hook found no address for (filled on any thread)."""
        self._dead: set[str] = set()
        self._tg: TaskGroup | None = None
        self._guards: set[anyio.CancelScope] | None = set()
        """The scopes of the tasks run by ``start_soon``; None once they were ended."""
        self._stack: contextlib.AsyncExitStack | None = None
        self._entered = False

    @property
    def data_dir(self) -> Path:
        """The data directory (absolute).

        Raises:
            AttributeError: the host keeps its ledgers in PostgreSQL.
        """
        if not isinstance(self.store, LedgerStore):
            raise AttributeError("this host keeps its ledgers in PostgreSQL: no data_dir")
        return self.store.data_dir

    @property
    def location(self) -> str:
        """Where the ledgers live: the data directory, or the database URL (no password)."""
        return self.store.location

    @property
    def poll_interval(self) -> float:
        """Seconds between fallback polls when no wake-up arrives."""
        return self.config.poll_interval

    @property
    def process_id(self) -> str:
        """This process's id in the registry of the data directory (or database).

        Raises:
            HostClosedError: the host has not been entered yet.
        """
        if self._wake is None:
            raise HostClosedError
        return self._wake.process_id

    def get(self, name: str) -> Agent:
        """The handle of the actor called ``name``: any non-empty string without NUL that
        UTF-8 can encode (no lone surrogates).

        Raises:
            TypeError: ``name`` is not a str.
            ValueError: ``name`` is empty, holds NUL or holds a lone surrogate.
        """
        ledger_relpath(name)
        return Agent(self, name)

    async def actors(self, *, after: str = "", limit: int = 1000) -> list[str]:
        """Names of the actors that have a ledger in the data directory, in name order.

        Args:
            after: only names after this one (for paging).
            limit: the most names returned.

        Raises:
            TypeError, ValueError: ``after`` is not a str, or ``limit`` not an int >= 0.
            HostClosedError: the host is not running.
        """
        if not isinstance(after, str):
            raise TypeError(f"after must be a str, not {type(after).__name__}")
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"limit must be an int, not {type(limit).__name__}")
        if limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")
        try:
            rows = await self.store.run_index(lambda index: index.actors(after=after, limit=limit))
        except LedgerClosedError:
            raise HostClosedError from None
        return [row[0] for row in rows]

    def task_group(self) -> TaskGroup:
        """The host's task group, for work that must end when the host does.

        Its tasks are cancelled at once if the task holding the host is cancelled; for work
        that must keep going while running attempts get their shutdown grace (following
        an intent an attempt waits for), use ``start_soon``.

        Raises:
            HostClosedError: the host is not running.
        """
        if self._tg is None or self._stack is None:
            raise HostClosedError
        return self._tg

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run ``await fn(*args)`` as a task of the host, until it returns or the host has
        stopped.

        Such a task outlives a cancellation of the task holding the host until the host
        has stopped in order (the attempts' grace and settles included), as the host's own
        tasks do: the work running attempts wait on keeps going until they end. It may be
        started until then too (an attempt may start a call during the grace).

        Raises:
            HostClosedError: the host is not running.
        """
        if self._tg is None or self._guards is None:
            raise HostClosedError
        self._tg.start_soon(self._guarded, fn, args)

    def _spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """``start_soon`` for the host's own tasks, started from callbacks: nothing once the
        host is stopping."""
        if self._tg is not None and self._guards is not None:
            self._tg.start_soon(self._guarded, fn, args)

    async def _guarded(
        self, fn: Callable[..., Awaitable[object]], args: tuple[object, ...]
    ) -> None:
        guards = self._guards
        if guards is None:
            return  # the host stopped before this task began
        scope = anyio.CancelScope(shield=True)  # cancelled by ``_end_tasks``
        guards.add(scope)
        try:
            with scope:
                await fn(*args)
        finally:
            guards.discard(scope)

    def _end_tasks(self) -> None:
        """The scheduler has shut down: end the host's tasks."""
        guards, self._guards = self._guards, None
        for scope in guards or ():
            scope.cancel()

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> ActorHost:
        if self._entered:
            raise RuntimeError(
                "an ActorHost can be entered only once; create a new one to start again"
            )
        self._entered = True
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            stack.enter_context(raised_threshold(self.gc_threshold))
            await stack.enter_async_context(self.store)
            wake: WakeupSocket | NotifyWakeup
            if isinstance(self.store, LedgerStore):
                wake = WakeupSocket(scheduler=self.run_scheduler)
            else:
                from ledger.postgres import PostgresStore

                from ._pgwake import NotifyWakeup

                assert isinstance(self.store, PostgresStore)
                wake = NotifyWakeup(self.store.url, scheduler=self.run_scheduler)
                self.store.notify_cancels(wake.process_id, wake.cancel_notice)
                await wake.open()
                stack.push_async_callback(wake.aclose)
            self._wake = wake
            stack.callback(wake.close)
            info = wake.info(self.store.clock())
            await self.store.run_index(lambda index: index.register_process(info))
            stack.push_async_callback(self._unregister)
            await self._refresh_peers()
            self.store.add_commit_listener(self._on_commit)
            self.store.add_commit_hook(self._send_wakeups)
            # Peers re-read the registry only now and then: tell them we exist, so wake-ups
            # for our calls, tails and claims reach us from the start.
            for peer in self._peers:
                if peer.address is not None:
                    wake.send(peer.address, Message(hello=True))
            tg = anyio.create_task_group()
            stack.callback(self._forget_task_group)  # runs once the group has ended
            await stack.enter_async_context(tg)
            self._tg = tg
            stack.callback(tg.cancel_scope.cancel)
            # Runs after the scheduler's shutdown (pushed later, so run earlier): until then
            # the host hears cancels and keeps its peers, also when its task was cancelled.
            stack.callback(self._end_tasks)
            self._spawn(wake.receive_forever, self._on_message)
            if self.run_scheduler:
                self.scheduler = Scheduler(
                    self.store,
                    self.spec.registry,
                    host_id=wake.process_id,
                    bindings=self.spec.bindings,
                    config=self.config,
                    dead_owners=lambda: sorted(self._dead),
                )
                await tg.start(self.scheduler.serve)
                stack.push_async_callback(self.scheduler.shutdown)
                if self._dead:
                    await self.scheduler.rescan(self.config.lease)
            self._spawn(self._housekeeping)
        except BaseException:
            await stack.__aexit__(None, None, None)
            raise
        self._stack = stack
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._stack is not None
        stack, self._stack = self._stack, None
        try:
            with _interrupts_at_the_loop():
                await stack.__aexit__(None, None, None)
        finally:
            self._tg = None

    def _forget_task_group(self) -> None:
        """The task group has ended: work the store reports while it drains starts no task."""
        self._tg = None

    async def _unregister(self) -> None:
        assert self._wake is not None
        process_id = self._wake.process_id
        scheduler = self.scheduler
        if scheduler is not None and (scheduler.running or scheduler.abandoned):
            # Attempts were killed before they settled (a second Ctrl-C): their claims stand.
            # Registered, this process is soon seen dead and they are redriven at once;
            # unregistered, they would wait for their leases to run out.
            left = scheduler.running + scheduler.abandoned
            _log.warning("claims_left_to_redrive", attempts=left)
            return
        with anyio.CancelScope(shield=True), contextlib.suppress(LedgerError, OSError):
            await self.store.run_index(lambda index: index.unregister_process(process_id))

    # -- peers and wake-ups ---------------------------------------------------------------

    async def _refresh_peers(self) -> set[str]:
        """Re-read the registry; returns ids newly known to be dead."""
        assert self._wake is not None
        wake = self._wake
        now = self.store.clock()
        stale_ms = round(self.config.lease * 10 * 1000)

        def read(index: Directory) -> list[ProcessInfo]:
            index.heartbeat(wake.process_id, now)
            processes = index.processes()
            for info in processes:
                # Forget processes dead long enough for every claim of theirs to have expired.
                if info.id != wake.process_id and info.heartbeat_at < now - stale_ms:
                    peers_dead = classify([info], wake.machine, wake.process_id)[1]
                    if peers_dead:
                        index.unregister_process(info.id)
            return processes

        processes = await self.store.run_index(read)
        self._peers, dead = classify(processes, wake.machine, wake.process_id)
        new = dead - self._dead
        self._dead = dead
        return new

    async def _refresh_and_recover(self) -> bool:
        """Re-read the registry and redrive the claims of processes newly found dead.

        Returns False when the registry could not be read.
        """
        try:
            newly_dead = await self._refresh_peers()
        except LedgerError as exc:
            self._refresh_failures.failed(error=str(exc))
            return False
        self._refresh_failures.succeeded()
        if newly_dead and self.scheduler is not None:
            _log.info("dead_processes_found", processes=sorted(newly_dead))
            await self.scheduler.rescan(self.config.lease)
        return True

    async def _housekeeping(self) -> None:
        """Heartbeat, peer refresh, dead-process recovery and the cancel poll fallback."""
        interval = min(1.0, self.config.poll_interval)
        while True:
            await anyio.sleep(interval)
            if await self._refresh_and_recover() and self.scheduler is not None:
                await self._poll_cancels(self.scheduler)

    async def _poll_cancels(self, scheduler: Scheduler) -> None:
        """Fallback for lost wake-ups: abort running attempts whose cancel was recorded."""
        by_actor: dict[str, list[int]] = {}
        for actor_id, intent_event_id in scheduler.running_attempts():
            by_actor.setdefault(actor_id, []).append(intent_event_id)
        # All at once: the checks share batches, rather than one batch each in turn.
        async with anyio.create_task_group() as tg:
            for actor_id, ids in by_actor.items():
                tg.start_soon(self._deliver_verified, actor_id, ids)

    async def _deliver_verified(self, actor_id: str, ids: list[int]) -> None:
        scheduler = self.scheduler
        if scheduler is None:
            return
        own = self.process_id

        def read(tx: Any) -> list[tuple[int, str | None]]:
            found = []
            for intent_event_id in ids:
                row = tx.intent_row(intent_event_id)
                if (
                    row is not None
                    and row.status == "running"
                    and row.claimed_by == own
                    and row.cancel_requested_at is not None
                ):
                    found.append((row.id, row.cancel_reason))
            return found

        try:
            found = await self.store.run(
                actor_id, read, write=False, create=False, reads=tuple(ids)
            )
        except LedgerError as exc:
            _log.warning("cancel_check_failed", actor=actor_id, error=str(exc))
            return
        for intent_event_id, reason in found:
            scheduler.deliver_cancel(actor_id, intent_event_id, reason)

    def _on_commit(self, committed: list[Committed]) -> None:
        """After each local commit batch, on the loop: the local scheduler's hints and
        cancels, and the cancels whose owner the wake-up hook did not know yet."""
        if self.scheduler is not None:
            self.scheduler.on_commit(committed)  # other processes' cancels: _send_wakeups
        late: list[tuple[str, int, str, str | None]] = []
        while self._late:
            late.append(self._late.popleft())
        if late and self._tg is not None:
            # The owner registered after our last refresh: look it up, then deliver.
            self._spawn(self._send_late, late)

    def _send_wakeups(self, committed: list[Committed]) -> None:
        """Right after each local commit, on the thread that committed it: wake the peers.

        Sent before the writer hears its answer, so a cancel or an abort reaches the process
        that waits for it without first waiting for this event loop. Everything sent is
        committed, so the message is marked verified (the receiver's transport decides
        whether to believe it).
        """
        wake = self._wake
        if wake is None:
            return
        peers = self._peers
        own = wake.process_id
        remote = [
            (item.actor_id, intent_event_id, owner, reason)
            for item in committed
            for intent_event_id, owner, reason in item.effects.cancels or ()
            if owner is not None and owner != own and not self.store.notifies_cancels
        ]
        if not peers and not remote:
            return
        due = [(c.actor_id, c.effects.new_due) for c in committed if c.effects.new_due is not None]
        changed = [
            c.actor_id
            for c in committed
            if c.effects.events or c.effects.chunks or c.effects.terminal
        ]
        notices = [
            (c.actor_id, topic, data) for c in committed for topic, data in c.effects.notices or ()
        ]
        known = set()
        for peer in peers:
            if peer.address is None:
                continue
            known.add(peer.id)
            message = Message(
                due=due if peer.scheduler else [],
                changed=changed,
                cancels=[(a, i, r) for a, i, owner, r in remote if owner == peer.id],
                notices=notices,
                verified=True,
            )
            if message.due or message.changed or message.cancels or message.notices:
                wake.send(peer.address, message)
        self._late.extend(entry for entry in remote if entry[2] not in known)

    async def _send_late(self, cancels: list[tuple[str, int, str, str | None]]) -> None:
        if not await self._refresh_and_recover():
            return
        assert self._wake is not None
        for peer in self._peers:
            mine = [(a, i, r) for a, i, owner, r in cancels if owner == peer.id]
            if mine and peer.address is not None:
                self._wake.send(peer.address, Message(cancels=mine, verified=True))

    def _on_message(self, message: Message) -> None:
        """A wake-up from another process: hints, unless verified (then trusted as it is)."""
        store = self.store
        scheduler = self.scheduler
        if message.hello:
            self._spawn(self._refresh_and_recover)
            return
        if message.everything:
            if scheduler is not None:
                self._spawn(scheduler.rescan, 0.0)
                # Cancels sent while we could not hear them (a lost database connection).
                self._spawn(self._poll_cancels, scheduler)
            store.notify_all()
            return
        if scheduler is not None:
            for actor_id, due in message.due:
                scheduler.hint(actor_id, due)
        if message.verified:
            for actor_id, topic, data in message.notices:
                store.deliver_notices(actor_id, [(topic, data)])
        for actor_id in message.changed:
            store.notify_changed(actor_id)
        cancels = message.cancels
        if message.verified and scheduler is not None:
            # Believed as it is; but the attempt may not be registered here yet (the cancel
            # can overtake our claim's answer): then read the ledger once, behind that claim.
            cancels = [entry for entry in cancels if not scheduler.deliver_cancel(*entry)]
        if cancels and self._tg is not None:
            by_actor: dict[str, list[int]] = {}
            for actor_id, intent_event_id, _ in cancels:
                by_actor.setdefault(actor_id, []).append(intent_event_id)
            for actor_id, ids in by_actor.items():
                self._spawn(self._deliver_verified, actor_id, ids)
