"""One actor's ledger file: opening, verifying and migrating it.

Everything here is synchronous and runs on a ledger worker thread (see ``_store.py``).
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ._errors import (
    LedgerBusyError,
    LedgerCorruptError,
    LedgerError,
    LedgerWriteError,
    is_locked,
)
from ._schema import FORMAT, MIGRATIONS, SCHEMA_VERSION

if TYPE_CHECKING:
    from collections.abc import Sequence

Synchronous = Literal["NORMAL", "FULL"]

# Connections are many and mostly idle: a small page cache per ledger keeps memory bounded.
_CACHE_KIB = 256
_BUSY_MS = 50


class LedgerFile:
    """An open SQLite connection to one actor's ledger, verified to belong to that actor."""

    __slots__ = (
        "_busy_ms", "actor_id", "conn", "next_id", "no_due_pending", "path", "relpath", "rows",
        "snapshot",
    )  # fmt: skip

    def __init__(self, actor_id: str, path: Path, relpath: str, conn: sqlite3.Connection) -> None:
        self.actor_id = actor_id
        self.path = path
        self.relpath = relpath
        self.conn = conn
        # The next event id while a write transaction is open (writers are serialized, so it
        # is max(id) + 1); None when unknown. Reset at BEGIN and after a rollback.
        self.next_id: int | None = None
        # SQLite reads cost no round trip: has_due_pending always asks the file.
        self.no_due_pending: bool | None = None
        # Nor does reading an intent's row: nothing is read ahead (see ``LedgerHandle``).
        self.rows: dict[int, tuple[Any, ...]] = {}
        self._busy_ms = _BUSY_MS  # the connection's busy_timeout, as last set
        self.snapshot: Signature | None = None
        """For a read-only snapshot (``connect_read_only``): the file as it was when opened;
        what was read holds only if ``snapshot_holds`` still says so."""

    @classmethod
    def open(
        cls,
        actor_id: str,
        path: Path,
        relpath: str,
        *,
        synchronous: Synchronous,
        read_only: bool = False,
    ) -> LedgerFile:
        """Open (creating if needed) the ledger of ``actor_id`` at ``path``.

        With ``read_only``, the file must exist and nothing is written to it, nor to its
        directory (see ``connect_read_only``): it is not created, migrated or named, and its
        writes fail.

        Raises:
            LedgerCorruptError: the file is not a SQLite database, is another program's
                database, belongs to another actor, or was written by a newer version.
            LedgerBusyError: another process holds the file locked (it may be creating it).
            LedgerWriteError: the file cannot be opened at all (permissions, no file
                descriptors left, no space).
        """
        if read_only:
            conn, snapshot = _open_read_only(path, actor_id)
            file = cls(actor_id, path, relpath, conn)
            file.snapshot = snapshot
            return file
        try:
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                _create(path)
            conn = sqlite3.connect(
                path,
                timeout=_BUSY_MS / 1000,  # the busy timeout, set without a statement
                isolation_level=None,
                check_same_thread=False,
                cached_statements=64,
            )
        except (sqlite3.Error, OSError) as exc:
            raise LedgerWriteError(path, f"cannot open: {exc}") from exc
        try:
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                # Another connection (often another process creating this very file) holds
                # it in rollback mode for now: try again later.
                raise LedgerBusyError(path, 0.0)
            conn.execute(f"PRAGMA cache_size = -{_CACHE_KIB}")  # (no foreign keys to enforce)
            _migrate(conn, path, actor_id)
        except sqlite3.OperationalError as exc:
            conn.close()
            message = str(exc)
            if is_locked(exc):
                raise LedgerBusyError(path, 0.0) from exc
            if "unable to open" in message or "disk" in message or "readonly" in message:
                raise LedgerWriteError(path, message) from exc
            raise LedgerCorruptError(path, message) from exc
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise LedgerCorruptError(path, str(exc)) from exc
        except BaseException:
            conn.close()
            raise
        return cls(actor_id, path, relpath, conn)

    def begin(self, *, write: bool) -> None:
        """Open a transaction; a write transaction takes the file's write lock at once.

        Taking the write lock never waits: a batch holds the locks of the actors it has
        already begun, so waiting here while another process's batch waits for one of those
        would stall both for the whole busy timeout, actor after actor. The caller puts a
        locked actor's operations off to a later batch instead. A read transaction keeps the
        short busy timeout (readers of a WAL file wait only while another opener recovers it).

        Raises:
            sqlite3.OperationalError: the file is locked ("database is locked"), or another
                SQLite error.
        """
        wanted = 0 if write else _BUSY_MS
        if self._busy_ms != wanted:
            self.conn.execute(f"PRAGMA busy_timeout = {wanted}")
            self._busy_ms = wanted
        self.conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def write(self, sql: str, parameters: Sequence[Any], /) -> None:
        """Run a write whose result nobody reads (at once: SQLite statements cost no round
        trip)."""
        self.conn.execute(sql, parameters)

    def close(self) -> None:
        """Close the connection; the last close of a WAL file checkpoints it."""
        self.conn.close()

    def integrity_check(self) -> list[str]:
        """Run ``PRAGMA integrity_check``; returns ``["ok"]`` for a sound file."""
        return [row[0] for row in self.conn.execute("PRAGMA integrity_check")]


def _migrate(conn: sqlite3.Connection, path: Path, actor_id: str) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        _verify(conn, path, actor_id)
        return
    if version > SCHEMA_VERSION:
        raise LedgerCorruptError(
            path, f"schema version {version} is newer than this library's ({SCHEMA_VERSION})"
        )
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Re-read inside the write lock: another process may have created it meanwhile.
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            tables = conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
            if tables:
                raise LedgerCorruptError(path, "a SQLite database that is not a ledger")
        for target in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[target].split(";"):
                if statement.strip():
                    conn.execute(statement)
        if version == 0:
            conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [("format", FORMAT), ("actor_id", actor_id)],
            )
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    if version:
        _verify(conn, path, actor_id)


Signature = tuple[int, int, int]
"""A file's inode, size and modification time (ns): it changes with any write."""


def file_signature(path: Path) -> Signature | None:
    """The ``Signature`` of the file at ``path``; None if there is none."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def snapshot_holds(path: Path, signature: Signature) -> bool:
    """True if the file at ``path`` is still as ``signature`` describes and no writer has
    it open (it has no ``-wal`` file): what a snapshot read of it found is its content."""
    return not Path(f"{path}-wal").exists() and file_signature(path) == signature


class WriterArrivedError(sqlite3.OperationalError):
    """A writer opened the file while a reader without write access was opening it: the
    reader tries again (``is_locked`` says so), and then reads through the writer's files."""

    def __init__(self) -> None:
        super().__init__("database is locked: a writer opened it meanwhile")


def connect_read_only(path: Path, **options: Any) -> tuple[sqlite3.Connection, Signature | None]:
    """A connection that only reads the SQLite file at ``path`` and writes nothing, not even
    in its directory; ``options`` go to ``sqlite3.connect``. Returns it, with the file's
    ``Signature`` if it is a snapshot (else None).

    It opens with ``mode=ro``, which reads a WAL file as its writers leave it (its ``-wal``
    file included) but needs the ``-shm`` file to exist or to be creatable. When it is
    neither (a directory this process cannot write) and there is no ``-wal`` file either
    (every writer closed the file, and the last close moved everything into it), it opens
    the file ``immutable`` instead: as it is on disk, without locks. A writer may open and
    change the file meanwhile, so such a snapshot's reads hold only if ``snapshot_holds``
    says so afterwards; keep it for one read.

    Meant for directories this process cannot write: in one it can, SQLite leaves the
    ``-wal`` and ``-shm`` files a read-only connection created behind.

    Raises:
        WriterArrivedError: a writer opened the file while this was opening it (try again).
        sqlite3.Error: the file cannot be read (as ``sqlite3.connect`` and a first read).
    """
    uri = path.absolute().as_uri()
    conn: sqlite3.Connection = sqlite3.connect(f"{uri}?mode=ro", uri=True, **options)
    try:
        conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()
        return conn, None
    except sqlite3.OperationalError as exc:
        conn.close()
        code = exc.sqlite_errorcode
        if not (code in _NO_SHM or code & 0xFF == sqlite3.SQLITE_CANTOPEN):
            raise
        if Path(f"{path}-wal").exists():
            raise WriterArrivedError from exc  # its -shm file is there to read through now
    except BaseException:
        conn.close()
        raise
    signature = file_signature(path)
    snapshot: sqlite3.Connection = sqlite3.connect(
        f"{uri}?mode=ro&immutable=1", uri=True, **options
    )
    return snapshot, signature


_NO_SHM = (sqlite3.SQLITE_READONLY_DIRECTORY, sqlite3.SQLITE_READONLY_CANTINIT)
"""What SQLite answers a read-only WAL reader that cannot create or set up the ``-shm``
file (besides ``SQLITE_CANTOPEN``)."""


def _open_read_only(path: Path, actor_id: str) -> tuple[sqlite3.Connection, Signature | None]:
    """A read-only connection to the existing ledger of ``actor_id``, verified like any,
    with its snapshot ``Signature`` (see ``connect_read_only``).

    Raises:
        LedgerCorruptError: as ``LedgerFile.open``.
        LedgerBusyError: another process holds the file, or wrote it while it was read.
        LedgerWriteError: the file cannot be opened, or needs a migration (which writes).
    """
    try:
        conn, snapshot = connect_read_only(
            path,
            timeout=_BUSY_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
            cached_statements=64,
        )
    except sqlite3.OperationalError as exc:
        if is_locked(exc):
            raise LedgerBusyError(path, 0.0) from exc
        message = str(exc)
        if "unable to open" in message or "disk" in message or "readonly" in message:
            raise LedgerWriteError(path, f"cannot open: {message}", reading=True) from exc
        raise LedgerCorruptError(path, str(exc)) from exc
    except sqlite3.DatabaseError as exc:
        raise LedgerCorruptError(path, str(exc)) from exc
    except OSError as exc:
        raise LedgerWriteError(path, f"cannot open: {exc}", reading=True) from exc
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0 and conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]:
            raise LedgerCorruptError(path, "a SQLite database that is not a ledger")
        if version > SCHEMA_VERSION:
            raise LedgerCorruptError(
                path, f"schema version {version} is newer than this library's ({SCHEMA_VERSION})"
            )
        if version < SCHEMA_VERSION:
            raise LedgerWriteError(
                path, f"schema version {version} must be migrated first, which needs writing"
            )
        _verify(conn, path, actor_id, read_only=True)
    except (LedgerError, sqlite3.Error) as exc:
        conn.close()
        if snapshot is not None and not snapshot_holds(path, snapshot):
            # Read while a writer changed it: what looked wrong may be a torn read.
            raise LedgerBusyError(path, 0.0) from exc
        if isinstance(exc, LedgerError):
            raise
        if isinstance(exc, sqlite3.OperationalError) and is_locked(exc):
            raise LedgerBusyError(path, 0.0) from exc
        raise LedgerCorruptError(path, str(exc)) from exc
    except BaseException:
        conn.close()
        raise
    return conn, snapshot


def _verify(
    conn: sqlite3.Connection, path: Path, actor_id: str, *, read_only: bool = False
) -> None:
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError as exc:
        if is_locked(exc):
            raise  # another process holds the file for now: ``open`` reports it as busy
        raise LedgerCorruptError(path, f"no ledger metadata ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise LedgerCorruptError(path, "a SQLite database that is not a ledger")
    if "actor_id" not in meta and read_only:
        return  # fresh from the template, so empty: a reader need not name it
    if "actor_id" not in meta:
        # Fresh from the template: the first opener names it (once, under the write lock).
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('actor_id', ?)", (actor_id,)
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    if meta.get("actor_id") != actor_id:
        raise LedgerCorruptError(
            path, f"it belongs to actor {meta.get('actor_id')!r}, not {actor_id!r}"
        )


_template_lock = threading.Lock()
_template_bytes: bytes | None = None


def _template() -> bytes:
    """An empty ledger file (WAL mode, current schema, no actor yet), built once per process."""
    global _template_bytes
    with _template_lock:
        if _template_bytes is None:
            with tempfile.TemporaryDirectory() as directory:
                path = Path(directory, "template.db")
                conn = sqlite3.connect(path, isolation_level=None)
                conn.execute("PRAGMA journal_mode = WAL")
                for migration in MIGRATIONS:
                    for statement in migration.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                conn.execute("INSERT INTO meta (key, value) VALUES ('format', ?)", (FORMAT,))
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.close()
                _template_bytes = path.read_bytes()
        return _template_bytes


def _create(path: Path) -> None:
    """Create a new ledger file at ``path`` from the template, atomically.

    The file appears complete or not at all (written aside, then hard-linked into place); if
    another process created it first, theirs is kept. Copying a prepared file is several
    times faster than creating the schema in a fresh database.
    """
    aside = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.new")
    aside.write_bytes(_template())
    try:
        os.link(aside, path)
    except FileExistsError:
        pass
    finally:
        aside.unlink()
