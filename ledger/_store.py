"""The ledger store: every actor's ledger under one data directory, with group commit.

Callers submit operations: synchronous functions ``fn(tx: LedgerTx) -> T`` for one actor. A
pump task per shard takes everything queued, hands it to a worker thread in one hop, and runs
it there as one SQLite transaction per actor (each operation inside its own savepoint, so one
failing operation rolls back alone). A thread hop costs more than a whole SQLite transaction
on small machines, so batching hops and commits is what makes the async facade fast.

The directory database (``_index.py``) is kept in step with the ledgers by the rule stated
there; this module is the only writer of both.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio
import anyio.to_thread
import structlog

from ._errors import (
    LedgerBusyError,
    LedgerCorruptError,
    LedgerError,
    LedgerNotFoundError,
    LedgerWriteError,
    is_locked,
)
from ._file import LedgerFile, Synchronous, snapshot_holds
from ._index import Directory, IndexDB
from ._naming import check_actor_id, ledger_relpath
from ._tx import LedgerTx, TxEffects
from ._worker import Worker

if TYPE_CHECKING:
    from ._models import JSON, Projection

T = TypeVar("T")
_log = structlog.get_logger("ledger")

_CLOSERS = 4
"""Threads closing evicted ledgers."""

Clock = Callable[[], int]
"""Returns the current time in epoch milliseconds."""


def system_clock() -> int:
    """Wall-clock time in epoch milliseconds."""
    return time.time_ns() // 1_000_000


class LedgerClosedError(LedgerError):
    """The store is not open (not yet, or no more) for the operation; nothing was written."""

    def __init__(self) -> None:
        super().__init__(
            "the ledger store is not open: its host is not running (enter it with"
            " `async with ActorHost(...)` first); nothing was written"
        )


@dataclass(slots=True)
class Committed:
    """What one actor's transaction changed, reported to commit listeners after commit."""

    actor_id: str
    effects: TxEffects


Write = bool | Callable[[], bool]
"""Whether an operation writes: fixed, or asked on the worker thread right before its
transaction begins (each time: an operation put off to a later batch is asked again). The
function must not raise; an operation that answered False must not write."""
Reads = int | tuple[int, ...] | None
"""The intent id(s) whose schedule row an operation reads (``Store.run(reads=)``)."""


def group_writes(requests: Sequence[_Request[Any]]) -> bool:
    """Whether any of one actor's operations writes (every question is asked)."""
    write = False
    for request in requests:
        wanted = request.write
        if callable(wanted):
            wanted = wanted()
        write = write or bool(wanted)
    return write


class _Request(Generic[T]):
    __slots__ = (
        "actor_id", "after", "busy_since", "create", "done", "error", "fn", "reads", "result",
        "write",
    )  # fmt: skip

    def __init__(
        self,
        actor_id: str,
        fn: Callable[[LedgerTx], T],
        write: Write,
        done: asyncio.Event,
        after: Callable[[T | None, BaseException | None], None] | None = None,
        create: bool = True,
        reads: Reads = None,
    ) -> None:
        self.create = create
        self.reads = reads
        """The intent(s) whose row the operation reads: a backend may fetch them with the
        lock."""
        self.actor_id = actor_id
        self.fn = fn
        self.write = write
        self.done = done
        self.after = after
        self.result: T | None = None
        self.error: BaseException | None = None
        self.busy_since: float | None = None


@dataclass(slots=True)
class _Shard:
    number: int
    pending: list[_Request[Any]] = field(default_factory=list)
    # asyncio's own events (the store runs on asyncio, see ``_worker.py``): these are set
    # and replaced on every batch, and anyio's wrapper costs several times more.
    done: asyncio.Event = field(default_factory=asyncio.Event)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    files: OrderedDict[str, LedgerFile] = field(default_factory=OrderedDict)
    idle: dict[str, None] = field(default_factory=dict)
    """Open ledgers last seen with nothing pending or running, least recently used first:
    they hibernate before the others."""
    index: IndexDB | None = None
    raises: list[tuple[int | None, str, int]] = field(default_factory=list)
    """Index ``due`` raises put off until after the answers went out (see ``_commit_all``)."""
    held: dict[str, float] = field(default_factory=dict)
    """Actors whose ledger another process held locked, with the ``time.monotonic()`` at
    which their queued operations may be tried again; the rest of the queue goes on."""


@dataclass(slots=True)
class _Open:
    file: LedgerFile
    requests: list[_Request[Any]]
    effects: TxEffects
    needs_index: bool = False
    gen: int = 0
    """The actor's index ``gen``, read under the write lock when ``needs_index``."""


_RAISE_DELAY = 0.005
"""Seconds an idle shard waits for new work before applying its put-off ``due`` raises."""
_HOLD = 0.01
"""Seconds before the operations of an actor whose ledger another process held locked are
tried again."""
_MAX_PUT_OFF = 1024


class Store:
    """What every storage backend shares: per-shard queues, batching pumps, change notices.

    Callers submit operations, synchronous functions ``fn(tx: LedgerTx) -> T`` of one actor;
    a pump task per shard takes everything queued and has the backend run it as a batch
    (``_run_batch``). ``LedgerStore`` keeps each actor in its own SQLite file;
    ``ledger.postgres.PostgresStore`` keeps every actor in one PostgreSQL database.
    """

    location: str
    """Where the ledgers live, for messages: a directory, or a database URL without password."""
    notifies_cancels = False
    """True if the store itself tells the claim's owner of each cancel it commits (so the
    host does not forward them)."""

    def __init__(
        self,
        *,
        projections: Sequence[Projection[Any]],
        shards: int,
        clock: Clock,
        batch_actors: int,
    ) -> None:
        if shards < 1 or batch_actors < 1:
            raise ValueError("shards must be at least 1")
        self.projections = tuple(projections)
        self.clock = clock
        self.key_retention_ms = 0
        """How long an ended intent keeps its idempotency key, for enqueues inside
        operations (``LedgerTx.key_retention_ms``); its host sets it."""
        self._batch_actors = batch_actors
        self._shards = [_Shard(i) for i in range(shards)]
        self._listeners: list[Callable[[list[Committed]], None]] = []
        self._hooks: list[Callable[[list[Committed]], None]] = []
        self._followers: dict[tuple[str, str], list[Callable[[JSON], None]]] = {}
        self._versions: dict[str, int] = {}
        self._changed: dict[str, anyio.Event] = {}
        self._closing = False
        self._tg: anyio.abc.TaskGroup | None = None

    async def _start_pumps(self) -> None:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        for shard in self._shards:
            self._tg.start_soon(self._pump, shard)

    async def _stop_pumps(self) -> None:
        """Let the pumps drain what is queued, then end them."""
        self._closing = True
        for shard in self._shards:
            shard.wake.set()
        assert self._tg is not None
        await self._tg.__aexit__(None, None, None)

    async def __aenter__(self) -> Store:
        raise NotImplementedError

    async def __aexit__(self, *exc_info: object) -> None:
        raise NotImplementedError

    def add_commit_listener(self, listener: Callable[[list[Committed]], None]) -> None:
        """Call ``listener`` on the event loop after each batch with what it committed."""
        self._listeners.append(listener)

    def add_commit_hook(self, hook: Callable[[list[Committed]], None]) -> None:
        """Call ``hook`` with what each batch committed as soon as it committed, on the
        thread that ran it (a worker thread on SQLite), before anyone hears the answers.

        For work that must not wait for the event loop, such as waking other processes. It
        must be quick, must not block and must be thread-safe; its errors are logged.
        """
        self._hooks.append(hook)

    def _run_hooks(self, committed: list[Committed]) -> None:
        for hook in self._hooks:
            try:
                hook(committed)
            except Exception:
                _log.exception("commit_hook_failed")

    def follow_notices(
        self, actor_id: str, topic: str, callback: Callable[[JSON], None]
    ) -> Callable[[], None]:
        """Call ``callback(data)`` on the event loop for each notice of ``topic`` announced
        by a committed transaction of ``actor_id`` (``LedgerTx.announce``), here or in another
        process whose wake-up vouches for it. Returns a function that stops following.

        Notices are a fast path only: they may be lost, so a follower also re-reads the
        ledger when ``wait_changed`` says the actor changed.
        """
        key = (actor_id, topic)
        callbacks = self._followers.setdefault(key, [])
        callbacks.append(callback)

        def stop() -> None:
            with contextlib.suppress(ValueError):
                callbacks.remove(callback)
            if not callbacks and self._followers.get(key) is callbacks:
                del self._followers[key]

        return stop

    def deliver_notices(self, actor_id: str, notices: Sequence[tuple[str, JSON]]) -> None:
        """Hand committed notices of ``actor_id`` to this process's followers."""
        for topic, data in notices:
            for callback in list(self._followers.get((actor_id, topic), ())):
                try:
                    callback(data)
                except Exception:
                    _log.exception("notice_follower_failed", actor=actor_id, topic=topic)

    async def exists(self, actor_id: str) -> bool:
        """True if ``actor_id`` has a ledger."""
        raise NotImplementedError

    async def run_index(self, fn: Callable[[Directory], T]) -> T:
        """Run ``fn`` with the directory of actors, due times and processes."""
        raise NotImplementedError

    async def _run_batch(
        self, shard: _Shard, batch: list[_Request[Any]]
    ) -> tuple[list[Committed], list[_Request[Any]], Collection[str]]:
        """Run a batch; returns what committed, the requests put off, and the actors among
        them whose ledger another process held locked (they are held back for ``_HOLD``)."""
        raise NotImplementedError

    async def _idle(self, shard: _Shard) -> bool:
        """Work for an idle shard; returns True if it did some (the pump then looks again)."""
        return False

    # -- operations -----------------------------------------------------------------------

    async def run(
        self,
        actor_id: str,
        fn: Callable[[LedgerTx], T],
        *,
        write: bool = True,
        after: Callable[[T | None, BaseException | None], None] | None = None,
        create: bool = True,
        reads: Reads = None,
    ) -> T:
        """Run ``fn`` in a transaction of ``actor_id``'s ledger and return its result.

        ``fn`` runs on a worker thread, in a savepoint of a batch transaction: if it raises,
        its writes are rolled back and the error is raised here; otherwise its writes are
        committed before this returns. If the caller is cancelled while waiting, the operation
        may still run; ``after(result, error)``, when given, is called exactly once on the
        event loop when the operation has run or failed, whether or not the caller still waits.

        With ``create=False`` an actor without a ledger is not created: ``LedgerNotFoundError``
        is raised instead (for reads and for answers such as ``not_found``).

        ``reads`` names the intent (or a tuple of intents) whose row ``fn`` reads with
        ``tx.intent_row`` (a hint: a backend that pays a round trip per statement fetches the
        rows with the actor's lock).

        Raises:
            LedgerNotFoundError: ``create=False`` and the actor has no ledger.
            LedgerCorruptError: the actor's ledger file is damaged or foreign.
            LedgerBusyError: another process held the ledger locked for too long.
            LedgerWriteError: SQLite refused the write (disk full, I/O error).
            LedgerClosedError: the store is closed.
        """
        try:
            request = self._queue(actor_id, fn, write, create, after, reads)
        except (TypeError, ValueError, LedgerClosedError) as exc:
            if after is not None:
                after(None, exc)
            raise
        while True:
            # A request put off (its ledger locked by another process) moves to a later
            # batch's event; wait until the batch that really ran it has finished.
            done = request.done
            await done.wait()
            if request.done is done:
                break
        if request.error is not None:
            raise request.error
        return request.result  # type: ignore[return-value]

    def submit(
        self,
        actor_id: str,
        fn: Callable[[LedgerTx], T],
        after: Callable[[T | None, BaseException | None], None],
        *,
        write: Write = True,
        reads: Reads = None,
    ) -> None:
        """Queue ``fn`` like ``run`` without waiting: ``after(result, error)`` is called on
        the event loop once it has run (the store drains queued operations before closing).

        ``write`` may be a function, asked on the worker thread right before the transaction
        begins (again if the operation is put off): an operation that may find it has nothing
        to write then takes no write lock, unless another operation of its actor does.

        Raises:
            LedgerClosedError: the store is closed (``after`` is not called).
            ValueError, TypeError: the actor name is invalid (``after`` is not called).
        """
        self._queue(actor_id, fn, write, True, after, reads)

    def _queue(
        self,
        actor_id: str,
        fn: Callable[[LedgerTx], T],
        write: Write,
        create: bool,
        after: Callable[[T | None, BaseException | None], None] | None,
        reads: Reads = None,
    ) -> _Request[T]:
        check_actor_id(actor_id)  # before anything is queued
        if self._closing or self._tg is None:
            raise LedgerClosedError
        shard = self._shards[hash(actor_id) % len(self._shards)]
        request: _Request[T] = _Request(actor_id, fn, write, shard.done, after, create, reads)
        shard.pending.append(request)
        if not shard.wake.is_set():
            shard.wake.set()
        return request

    # -- change notification --------------------------------------------------------------

    def version(self, actor_id: str) -> int:
        """A counter that grows whenever this process learns that the actor changed."""
        return self._versions.get(actor_id, 0)

    async def wait_changed(self, actor_id: str, version: int) -> None:
        """Return once ``version(actor_id)`` is past ``version``."""
        while self._versions.get(actor_id, 0) <= version:
            event = self._changed.get(actor_id)
            if event is None:
                event = self._changed[actor_id] = anyio.Event()
            await event.wait()

    def notify_changed(self, actor_id: str) -> None:
        """Tell local waiters that ``actor_id`` changed (used for other processes' writes)."""
        self._versions[actor_id] = self._versions.get(actor_id, 0) + 1
        event = self._changed.pop(actor_id, None)
        if event is not None:
            event.set()

    def notify_all(self) -> None:
        """Wake every local waiter (after a wake-up too large to say which actors changed)."""
        for actor_id in list(self._changed):
            self.notify_changed(actor_id)

    # -- the pump -------------------------------------------------------------------------

    async def _pump(self, shard: _Shard) -> None:
        # Shielded: what is queued runs whatever cancels the task around the store (an
        # attempt's settle must land); the pump ends when ``_stop_pumps`` has it drain.
        with anyio.CancelScope(shield=True):
            await self._pump_until_closed(shard)

    async def _pump_until_closed(self, shard: _Shard) -> None:
        while True:
            if not shard.pending and await self._idle(shard):
                continue
            if not shard.pending:
                if self._closing:
                    return
                await shard.wake.wait()
                shard.wake = asyncio.Event()
                continue
            batch = self._take_batch(shard)
            if not batch:
                # All that is queued is for actors locked by another process: wait until the
                # first of them may be tried again, or for new work.
                shard.wake = asyncio.Event()
                with anyio.move_on_after(min(shard.held.values()) - time.monotonic()):
                    await shard.wake.wait()
                continue
            if not shard.pending and shard.wake.is_set():
                shard.wake = asyncio.Event()  # it announced what this batch took
            done, shard.done = shard.done, asyncio.Event()
            for request in shard.pending:
                request.done = shard.done  # left for a later batch: wait for that one
            try:
                committed, deferred, locked = await self._run_batch(shard, batch)
            except Exception as exc:  # a bug or an unexpected SQLite state: fail the batch
                for request in batch:
                    request.error, request.result = exc, None
                committed, deferred, locked = [], [], ()
            if locked:
                retry_at = time.monotonic() + _HOLD
                for actor_id in locked:
                    shard.held[actor_id] = retry_at
            if deferred:
                # Put off (ledger locked elsewhere, or over the open-file budget): they run
                # in a later batch, whose event they now wait for.
                for request in deferred:
                    request.done = shard.done
                shard.pending[:0] = deferred
            for item in committed:
                if item.effects.notices and self._followers:
                    self.deliver_notices(item.actor_id, item.effects.notices)
            done.set()
            for request in batch:
                if request.after is not None and request.done is done:
                    try:
                        request.after(request.result, request.error)
                    except Exception:  # a bug there must not end the pump: others wait on it
                        _log.exception("after_callback_failed", actor=request.actor_id)
            for item in committed:
                effects = item.effects
                # Any change of an intent's state (claims and reschedules too) wakes local
                # waiters; peers hear only of new facts, chunks and terminal transitions.
                if (effects.events or effects.chunks or effects.terminal
                        or effects.due_may_rise or effects.new_due is not None):  # fmt: skip
                    self.notify_changed(item.actor_id)
            if committed:
                for listener in self._listeners:
                    listener(committed)

    def _take_batch(self, shard: _Shard) -> list[_Request[Any]]:
        """Take the queued requests of at most ``budget`` actors (oldest first); the rest wait
        for the next batch, so a batch never holds more ledgers open than the budget. The
        requests of held actors (locked by another process a moment ago) stay queued."""
        pending = shard.pending
        budget = self._batch_actors
        held = shard.held
        if held:
            now = time.monotonic()
            for actor_id in [actor_id for actor_id, until in held.items() if until <= now]:
                del held[actor_id]
        if not held:
            actors: set[str] = set()
            for request in pending:
                actors.add(request.actor_id)
                if len(actors) > budget:
                    break
            else:
                shard.pending = []
                return pending
        chosen: set[str] = set()
        batch: list[_Request[Any]] = []
        rest: list[_Request[Any]] = []
        for request in pending:
            actor_id = request.actor_id
            if actor_id not in held and (actor_id in chosen or len(chosen) < budget):
                chosen.add(actor_id)
                batch.append(request)
            else:
                rest.append(request)
        shard.pending = rest
        return batch


class LedgerStore(Store):
    """All actor ledgers under ``data_dir``; an async context manager.

    Args:
        data_dir: the directory holding ``index.db`` and ``actors/``; created if missing.
        projections: folds kept current in every write transaction.
        synchronous: ``"NORMAL"`` (default: durable against process crashes, as fast as
            SQLite's WAL allows) or ``"FULL"`` (also durable against power loss).
        max_open: most ledger connections kept open; idle ones beyond it are closed (each
            open WAL connection holds three file descriptors). Up to ``max_open / 8`` more
            may be closing in the background at a time.
        shards: worker threads; actors are spread over them by name.
        clock: the time source, epoch milliseconds.
        lock_timeout: seconds an operation waits for a ledger locked by another process
            before failing with ``LedgerBusyError``.
        read_only: only read, for a data directory this process cannot write: every file
            is opened read-only (``ledger._file.connect_read_only``), nothing is created,
            migrated or registered, and each connection is closed at the end of its batch
            (one may be a snapshot of the file, which would not see later writes). Writes
            fail with ``LedgerWriteError``; ``index.db`` must exist to be read.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        projections: Sequence[Projection[Any]] = (),
        synchronous: Synchronous = "NORMAL",
        max_open: int = 512,
        shards: int = 1,
        clock: Clock = system_clock,
        lock_timeout: float = 10.0,
        read_only: bool = False,
    ) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', not {synchronous!r}")
        if max_open < 1 or shards < 1:
            raise ValueError("max_open and shards must be at least 1")
        super().__init__(
            projections=projections,
            shards=shards,
            clock=clock,
            batch_actors=max(1, max_open // max(1, shards)),
        )
        self.data_dir = Path(data_dir).resolve()
        self.location = str(self.data_dir)
        self.synchronous: Synchronous = synchronous
        self.max_open = max_open
        self.lock_timeout = lock_timeout
        self.read_only = read_only
        # Evicted ledgers are closed on their own threads: the last close of a WAL file
        # checkpoints and syncs it (about a millisecond, mostly waiting on the disk), which
        # must not stall everyone's batch; several closers overlap those waits.
        self._to_close: queue.SimpleQueue[LedgerFile | None] = queue.SimpleQueue()
        self._closers: list[threading.Thread] = []
        self._workers: list[Worker] = []

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> LedgerStore:
        if not self.read_only:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        self._closers = [
            threading.Thread(target=self._close_evicted, name="ledger-closer", daemon=True)
            for _ in range(_CLOSERS)
        ]
        for closer in self._closers:
            closer.start()
        # One thread per shard runs all of its SQLite work, in order.
        self._workers = [Worker(f"ledger-shard-{shard.number}") for shard in self._shards]
        await self._start_pumps()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            # The pumps drain what is queued; a cancelled caller's cancellation is raised
            # again once they have ended, and must not skip closing the ledgers.
            await self._stop_pumps()
        finally:
            with anyio.CancelScope(shield=True):
                for shard, worker in zip(self._shards, self._workers, strict=True):
                    await worker.run(self._close_shard, shard)
                    await worker.stop()
                for _ in self._closers:
                    self._to_close.put(None)
                for closer in self._closers:
                    await anyio.to_thread.run_sync(closer.join)

    async def exists(self, actor_id: str) -> bool:
        """True if ``actor_id`` has a ledger file."""
        return (self.data_dir / ledger_relpath(actor_id)).exists()

    async def run_index(self, fn: Callable[[Directory], T]) -> T:
        """Run ``fn`` with the directory database on a worker thread.

        The ``due`` raises put off by busy shards are applied first, so a poll of due times
        does not send the scheduler to actors whose work has settled meanwhile (each such
        look would reopen a hibernated ledger for nothing).

        Raises:
            LedgerClosedError: the store is not open.
        """
        if self._closing or self._tg is None:
            raise LedgerClosedError
        shard = self._shards[0]
        for other in self._shards[1:]:
            if other.raises:  # each shard's raises are its own worker's to apply
                await self._workers[other.number].run(self._apply_raises, other)

        def call() -> T:
            self._apply_raises(shard)
            return fn(self._index(shard))

        if self.read_only:
            return await self._workers[shard.number].run(self._read_index, shard, fn)
        return await self._workers[shard.number].run(call)

    def _read_index(self, shard: _Shard, fn: Callable[[Directory], T]) -> T:
        """``fn`` on a read-only ``index.db`` connection of its own, closed after it; read
        again if it was a snapshot that a writer changed meanwhile (see ``read_only``)."""
        deadline = time.monotonic() + self.lock_timeout
        while True:
            index = IndexDB(self.data_dir / "index.db", read_only=True)
            try:
                result = fn(index)
                error: BaseException | None = None
            except (LedgerError, sqlite3.Error) as exc:
                result, error = None, exc
            finally:
                index.close()
            snapshot = index.snapshot
            if snapshot is None or snapshot_holds(index.path, snapshot):
                if error is not None:
                    raise error
                return result  # type: ignore[return-value]
            if time.monotonic() > deadline:
                raise LedgerBusyError(index.path, self.lock_timeout) from error
            time.sleep(_HOLD)  # a writer is at it: read again in a moment

    async def _run_batch(
        self, shard: _Shard, batch: list[_Request[Any]]
    ) -> tuple[list[Committed], list[_Request[Any]], Collection[str]]:
        return await self._workers[shard.number].run(self._execute, shard, batch)

    async def _idle(self, shard: _Shard) -> bool:
        if not shard.raises:
            return False
        # Idle with ``due`` raises put off: give new work a moment to come first.
        with anyio.move_on_after(_RAISE_DELAY):
            await shard.wake.wait()
        if not shard.pending:
            await self._workers[shard.number].run(self._apply_raises, shard)
        return True

    # -- worker thread side ---------------------------------------------------------------

    def _index(self, shard: _Shard) -> IndexDB:
        if shard.index is None:
            shard.index = IndexDB(self.data_dir / "index.db", read_only=self.read_only)
        return shard.index

    def _open_file(self, shard: _Shard, actor_id: str, keep: set[str], create: bool) -> LedgerFile:
        file = shard.files.get(actor_id)
        if file is not None:
            shard.files.move_to_end(actor_id)
            if actor_id in shard.idle:  # still idle, but just used: the last of them to go
                del shard.idle[actor_id]
                shard.idle[actor_id] = None
            return file
        budget = max(1, self.max_open // len(self._shards))
        while len(shard.files) >= budget:
            # The least recently used idle actor goes first, so an actor whose claimed
            # attempt has yet to settle keeps its file; else the least recently used.
            victim = next((a for a in shard.idle if a not in keep), None)
            if victim is None:
                victim = next((a for a in shard.files if a not in keep), None)
            if victim is None:
                break
            shard.idle.pop(victim, None)
            evicted = shard.files.pop(victim)
            if self._to_close.qsize() < budget // 8:
                self._to_close.put(evicted)
            else:
                evicted.close()  # the closer is behind: keep file descriptors bounded
        relpath = str(ledger_relpath(actor_id))
        path = self.data_dir / relpath
        is_new = not path.exists()
        if is_new and not create:
            raise LedgerNotFoundError(actor_id)
        if is_new and self.read_only:
            raise LedgerWriteError(path, "the ledger store is read-only")
        file = LedgerFile.open(
            actor_id, path, relpath, synchronous=self.synchronous, read_only=self.read_only
        )
        if is_new:
            self._index(shard).register(actor_id, relpath)
        shard.files[actor_id] = file
        return file

    def _close_evicted(self) -> None:
        while (file := self._to_close.get()) is not None:
            # Closing cannot lose committed data: the next open recovers from the WAL.
            with contextlib.suppress(sqlite3.Error):
                file.close()

    def _close_shard(self, shard: _Shard) -> None:
        shard.idle.clear()
        while shard.files:
            _, file = shard.files.popitem(last=False)
            file.close()
        if shard.index is not None:
            shard.index.close()
            shard.index = None

    def _execute(
        self, shard: _Shard, batch: list[_Request[Any]]
    ) -> tuple[list[Committed], list[_Request[Any]], set[str]]:
        """Run one batch: one transaction per actor, then the index bookkeeping.

        Returns what committed, the requests put off to a later batch, and the actors whose
        ledger another process held locked (the pump holds them back briefly).
        """
        if len(shard.raises) >= _MAX_PUT_OFF:
            self._apply_raises(shard)  # never idle: keep the backlog bounded
        groups: dict[str, list[_Request[Any]]] = {}
        for request in batch:
            groups.setdefault(request.actor_id, []).append(request)
        deferred: list[_Request[Any]] = []
        busy: list[_Request[Any]] = []
        opened: list[_Open] = []
        budget = max(1, self.max_open // len(self._shards))
        keep: set[str] = set()
        files: list[tuple[LedgerFile, list[_Request[Any]]]] = []
        # Every ledger is opened before any transaction begins, so no lock of this batch is
        # held while an open wakes a hibernated file, waits for a file another process is
        # creating, or registers a new actor in index.db.
        for actor_id, requests in groups.items():
            if len(keep) >= budget:
                deferred += requests  # never hold more ledgers open than the budget
                continue
            keep.add(actor_id)
            try:
                create = any(r.create for r in requests)
                files.append((self._open_file(shard, actor_id, keep, create), requests))
            except LedgerBusyError as exc:
                self._defer_busy(exc.path, requests, busy)
            except LedgerError as exc:
                for request in requests:
                    request.error = exc
            except Exception as exc:
                error = LedgerWriteError(self.data_dir / ledger_relpath(actor_id), repr(exc))
                for request in requests:
                    request.error = error
        now_ms = self.clock()  # after the opens: the operations' clock is not stale by them
        try:
            for file, requests in files:
                state = self._begin(file, requests, now_ms, busy)
                if state is not None:
                    opened.append(state)
            self._commit_all(shard, opened)
        except BaseException:
            for state in opened:
                if state.file.conn.in_transaction:
                    state.file.conn.execute("ROLLBACK")
            if self.read_only:
                self._close_files(shard, files)
            raise
        committed = [
            Committed(state.file.actor_id, state.effects) for state in opened if state.requests
        ]
        if committed and self._hooks:
            self._run_hooks(committed)  # first: other processes hear before anything else
        for state in opened:
            if state.requests and state.needs_index:
                self._put_off_raise(shard, state, now_ms)
            elif state.effects.new_due is not None:
                shard.idle.pop(state.file.actor_id, None)
        if self.read_only:
            self._close_files(shard, files)  # none outlives its batch (see ``read_only``)
            for file, requests in files:
                if file.snapshot is not None and not snapshot_holds(file.path, file.snapshot):
                    # A writer changed the file while this snapshot read it: read again.
                    for request in requests:
                        request.result = request.error = None
                    self._defer_busy(file.path, requests, busy)
        return committed, deferred + busy, {request.actor_id for request in busy}

    @staticmethod
    def _close_files(shard: _Shard, files: list[tuple[LedgerFile, list[_Request[Any]]]]) -> None:
        """Close a read-only batch's ledgers and forget them (see ``read_only``)."""
        for file, _ in files:
            shard.files.pop(file.actor_id, None)
            shard.idle.pop(file.actor_id, None)
            file.close()

    def _defer_busy(
        self, path: Path, requests: list[_Request[Any]], busy: list[_Request[Any]]
    ) -> None:
        """Put requests off while another process holds the ledger, up to the lock timeout."""
        now = time.monotonic()
        for request in requests:
            if request.busy_since is None:
                request.busy_since = now
            waited = now - request.busy_since
            if waited > self.lock_timeout:
                request.error = LedgerBusyError(path, waited)
            else:
                busy.append(request)

    def _begin(
        self,
        file: LedgerFile,
        requests: list[_Request[Any]],
        now_ms: int,
        deferred: list[_Request[Any]],
    ) -> _Open | None:
        """Open the actor's transaction and run its operations in savepoints."""
        conn = file.conn
        write = group_writes(requests)
        try:
            file.begin(write=write)
        except sqlite3.OperationalError as exc:
            if not is_locked(exc):
                error = _wrap(file.path, exc)
                for request in requests:
                    request.error = error
                return None
            self._defer_busy(file.path, requests, deferred)
            return None
        file.next_id = None
        state = _Open(file, requests, TxEffects())
        if len(requests) == 1:
            # One operation: the transaction itself is its savepoint.
            request = requests[0]
            tx = LedgerTx(file, now_ms, self.projections, self.key_retention_ms)
            try:
                request.result = request.fn(tx)
                tx.flush_projections()
            except BaseException as exc:
                if conn.in_transaction:  # SQLite ends it itself on a full disk or I/O error
                    conn.execute("ROLLBACK")
                request.error = _wrap(file.path, exc) if isinstance(exc, sqlite3.Error) else exc
                return None
            state.effects = tx.effects
        else:
            for request in requests:
                tx = LedgerTx(file, now_ms, self.projections, self.key_retention_ms)
                conn.execute("SAVEPOINT op")
                try:
                    request.result = request.fn(tx)
                    tx.flush_projections()
                except BaseException as exc:
                    failure = _wrap(file.path, exc) if isinstance(exc, sqlite3.Error) else exc
                    if not conn.in_transaction:
                        # SQLite rolled the whole transaction back (a full disk, an I/O
                        # error): the operations before this one are undone too.
                        for done in requests:
                            done.result, done.error = None, failure
                        return None
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    file.next_id = None
                    request.error = failure
                    request.result = None
                    continue
                conn.execute("RELEASE op")
                state.effects.merge(tx.effects)
        # Raising ``due`` needs ``gen`` read under the write lock (in ``_commit_all``).
        state.needs_index = write and state.effects.due_may_rise
        return state

    def _commit_all(self, shard: _Shard, opened: list[_Open]) -> None:
        """Index lowering under the ledger locks, ledger commits, then conditional raises."""
        lowerings = [
            (s.file.actor_id, s.file.relpath, s.effects.new_due)
            for s in opened
            if s.effects.new_due is not None
        ]
        readers = [s.file.actor_id for s in opened if s.needs_index]
        gens: dict[str, int] = {}
        if lowerings or readers:
            index = self._index(shard)
            try:
                gens = index.lower_and_read_gens(lowerings, readers)
            except sqlite3.Error as exc:
                error = _wrap(index.path, exc)
                for state in opened:
                    state.file.conn.execute("ROLLBACK")
                    for request in state.requests:
                        request.error = error
                    state.requests = []
                return
        for state in opened:
            conn = state.file.conn
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                error = _wrap(state.file.path, exc)
                for request in state.requests:
                    request.error = error
                    request.result = None
                state.requests = []
                continue
            if state.needs_index:
                state.gen = gens[state.file.actor_id]

    def _put_off_raise(self, shard: _Shard, state: _Open, now_ms: int) -> None:
        """Read the actor's next due time after its commit and queue the conditional raise;
        note whether the actor is left idle (nothing pending, nothing running).

        Read after the commit, not under the lock, so it delays no one: any write that added
        due work since ``gen`` was read under the lock changed ``gen``, which voids the raise.
        Raising ``due`` only makes it later, and a ``due`` left early is harmless (a wasted
        look), so the raises wait until the answers are out: they run in a hop of their own
        once the shard is idle (or in a batch, when too many have piled up).
        """
        shard.idle.pop(state.file.actor_id, None)
        try:
            next_due = LedgerTx(state.file, now_ms, ()).next_due()
        except sqlite3.Error:
            return  # ``due`` stays early: harmless
        if next_due is None:
            shard.idle[state.file.actor_id] = None
        shard.raises.append((next_due, state.file.actor_id, state.gen))

    def _apply_raises(self, shard: _Shard) -> None:
        """Apply the put-off ``due`` raises; each still applies only if ``gen`` is unchanged."""
        raises, shard.raises = shard.raises, []
        if raises:
            # A failure here only leaves ``due`` too early: harmless, so not raised.
            with contextlib.suppress(sqlite3.Error):
                self._index(shard).set_due_if_gen(raises)


def _wrap(path: Path, exc: BaseException) -> LedgerError:
    message = str(exc)
    if isinstance(exc, sqlite3.DatabaseError) and (
        "malformed" in message or "not a database" in message
    ):
        return LedgerCorruptError(path, message)
    return LedgerWriteError(path, message)
