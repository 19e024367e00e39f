"""The directory database: which actors exist, when each next needs a scheduler, who is alive.

``data_dir/index.db`` is a hint, never the truth. Its ``due`` column may be earlier than an
actor's real next due time (a spurious wake-up costs one read) but never later, whatever
crashes or races occur. That holds because of one rule (see ``_store.py``):

* a write that adds due work lowers ``due`` and bumps ``gen`` *while it holds the actor's
  ledger write lock, before the ledger commit*;
* a write that may raise ``due`` reads ``gen`` under that lock and, after the ledger commit,
  sets ``due`` only if ``gen`` is unchanged (the due time it sets may be read after the
  commit too: a write that added due work since then has changed ``gen``).

So a raise computed from a stale view of the ledger can never overwrite a newer lowering, and a
crash between the two files leaves ``due`` too early, never too late.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ._errors import LedgerBusyError, LedgerCorruptError, LedgerWriteError, is_locked
from ._file import Signature, connect_read_only

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

_OPEN_TIMEOUT_S = 10.0
_OPEN_RETRY_S = 0.005

_SCHEMA = """
CREATE TABLE IF NOT EXISTS actors (
    actor_id   TEXT PRIMARY KEY,
    path       TEXT NOT NULL,
    due        INTEGER,
    gen        INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS actors_by_due ON actors (due) WHERE due IS NOT NULL;
CREATE TABLE IF NOT EXISTS processes (
    id           TEXT PRIMARY KEY,
    pid          INTEGER NOT NULL,
    machine      TEXT NOT NULL,
    started      TEXT NOT NULL,
    address      TEXT,
    scheduler    INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL
) WITHOUT ROWID;
"""

_LOWER = (
    "INSERT INTO actors (actor_id, path, due, gen) VALUES (?, ?, ?, 1)"
    " ON CONFLICT (actor_id) DO UPDATE SET gen = gen + 1,"
    " due = CASE WHEN due IS NULL OR excluded.due < due THEN excluded.due ELSE due END"
)


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """A process registered on a data directory (a host or a client)."""

    id: str
    pid: int
    machine: str
    started: str
    address: str | None
    scheduler: bool
    heartbeat_at: int


class Directory(Protocol):
    """What hosts and schedulers read and write about the actors and processes of a store."""

    def due_before(self, before_ms: int, limit: int) -> list[tuple[str, int]]:
        """Actors needing the scheduler at or before ``before_ms``, earliest first."""
        ...

    def actors(self, *, after: str = "", limit: int = 1000) -> list[tuple[str, str, int | None]]:
        """``(actor_id, location, due)`` of actors after ``after``, in name order."""
        ...

    def register_process(self, info: ProcessInfo) -> None:
        """Record (or replace) a process in the registry."""

    def heartbeat(self, process_id: str, now_ms: int) -> None:
        """Record that a process is alive at ``now_ms``."""

    def unregister_process(self, process_id: str) -> None:
        """Remove a process from the registry."""

    def processes(self) -> list[ProcessInfo]:
        """Every registered process."""
        ...


class IndexDB:
    """A connection to ``index.db``; used by one ledger worker thread at a time.

    With ``read_only`` the file must exist, and nothing is written to it nor to its directory
    (see ``connect_read_only``): the reads work, the writes fail.
    """

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = path
        self.snapshot: Signature | None = None
        """As ``LedgerFile.snapshot``, for a read-only snapshot of ``index.db``."""
        connect = self._connect_read_only if read_only else self._connect
        if not read_only:
            path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + _OPEN_TIMEOUT_S
        while True:
            try:
                self.conn = connect(path)
                return
            except sqlite3.OperationalError as exc:
                # Processes opening a new data directory together race to switch index.db to
                # WAL and create its tables; SQLite answers "locked" without waiting for that.
                message = str(exc)
                if is_locked(exc) and time.monotonic() < deadline:
                    time.sleep(_OPEN_RETRY_S)
                    continue
                if is_locked(exc):
                    raise LedgerBusyError(path, _OPEN_TIMEOUT_S) from exc
                if "malformed" in message or "not a database" in message:
                    raise LedgerCorruptError(path, message) from exc
                raise LedgerWriteError(path, message, reading=read_only) from exc
            except sqlite3.DatabaseError as exc:
                raise LedgerCorruptError(path, str(exc)) from exc

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect_read_only(self, path: Path) -> sqlite3.Connection:
        conn, self.snapshot = connect_read_only(
            path, timeout=5.0, isolation_level=None, check_same_thread=False
        )
        return conn

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    # -- due times ------------------------------------------------------------------------

    def register(self, actor_id: str, relpath: str) -> None:
        """Record that an actor's ledger exists (no due time yet)."""
        self.conn.execute(
            "INSERT OR IGNORE INTO actors (actor_id, path) VALUES (?, ?)", (actor_id, relpath)
        )

    def lower_and_read_gens(
        self, lowerings: Iterable[tuple[str, str, int]], readers: Iterable[str]
    ) -> dict[str, int]:
        """Lower ``due`` (bumping ``gen``) and read ``gen`` for actors, in one transaction.

        Args:
            lowerings: ``(actor_id, relpath, due)`` for writes that added due work.
            readers: actors whose ``gen`` the caller will need for a conditional raise.
        """
        conn = self.conn
        lowerings = list(lowerings)
        # Only lowering writes: reading ``gen`` alone needs no write lock (a read sees every
        # committed lowering, which is all the conditional raise compares against).
        conn.execute("BEGIN IMMEDIATE" if lowerings else "BEGIN")
        try:
            conn.executemany(_LOWER, lowerings)
            gens = {}
            for actor_id in readers:
                row = conn.execute(
                    "SELECT gen FROM actors WHERE actor_id = ?", (actor_id,)
                ).fetchone()
                gens[actor_id] = 0 if row is None else int(row[0])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return gens

    def set_due_if_gen(self, updates: Iterable[tuple[int | None, str, int]]) -> None:
        """Set ``due`` exactly for ``(due, actor_id, gen)`` where ``gen`` is unchanged."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("UPDATE actors SET due = ? WHERE actor_id = ? AND gen = ?", updates)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def due_before(self, before_ms: int, limit: int) -> list[tuple[str, int]]:
        """Actors whose ``due`` is at or before ``before_ms``, earliest first."""
        return self.conn.execute(
            "SELECT actor_id, due FROM actors WHERE due IS NOT NULL AND due <= ?"
            " ORDER BY due LIMIT ?",
            (before_ms, limit),
        ).fetchall()

    def next_due(self) -> int | None:
        """The earliest ``due`` of any actor."""
        row = self.conn.execute("SELECT min(due) FROM actors").fetchone()
        return None if row[0] is None else int(row[0])

    def actors(self, *, after: str = "", limit: int = 1000) -> list[tuple[str, str, int | None]]:
        """``(actor_id, relpath, due)`` in name order, paging with ``after``."""
        return self.conn.execute(
            "SELECT actor_id, path, due FROM actors WHERE actor_id > ? ORDER BY actor_id LIMIT ?",
            (after, limit),
        ).fetchall()

    # -- processes ------------------------------------------------------------------------

    def register_process(self, info: ProcessInfo) -> None:
        """Record (or replace) a process in the registry."""
        self.conn.execute(
            "INSERT OR REPLACE INTO processes"
            " (id, pid, machine, started, address, scheduler, heartbeat_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                info.id,
                info.pid,
                info.machine,
                info.started,
                info.address,
                int(info.scheduler),
                info.heartbeat_at,
            ),
        )

    def heartbeat(self, process_id: str, now_ms: int) -> None:
        """Record that a process is alive at ``now_ms``."""
        self.conn.execute(
            "UPDATE processes SET heartbeat_at = ? WHERE id = ?", (now_ms, process_id)
        )

    def unregister_process(self, process_id: str) -> None:
        """Remove a process from the registry."""
        self.conn.execute("DELETE FROM processes WHERE id = ?", (process_id,))

    def processes(self) -> list[ProcessInfo]:
        """Every registered process."""
        return [
            ProcessInfo(row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6])
            for row in self.conn.execute(
                "SELECT id, pid, machine, started, address, scheduler, heartbeat_at FROM processes"
            )
        ]


def machine_id() -> str:
    """An id of this machine's current boot, to tell whether a pid can be checked here."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
    except OSError:
        boot = "no-boot-id"
    return f"{os.uname().nodename}/{boot}"


def process_started(pid: int) -> str:
    """The start time of ``pid`` (clock ticks since boot) or '' if unknown; tells pid reuse."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return ""
    # Field 22; the command name (field 2) may hold spaces, so split after its ')'.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return ""  # a killed process its parent has not reaped yet is dead all the same
    return fields[19]


def process_alive(info: ProcessInfo, here: str) -> bool | None:
    """True/False when liveness can be checked on this machine, None when it cannot."""
    if info.machine != here:
        return None
    if not os.path.exists("/proc/self/stat"):
        try:
            os.kill(info.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    started = process_started(info.pid)
    return bool(started) and started == info.started
