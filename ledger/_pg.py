"""PostgreSQL storage: every actor's ledger in one database, for hosts on many machines.

The ledger's statements (``_tx.py``) are written once. Here they run against views that show
one actor's rows of tables keyed by ``(actor_id, ...)``: each batch sets ``dt.actor`` for the
actor it works on, and the views filter by it (inserts take it as the default ``actor_id``).
Every table leads with ``actor_id``, so the schema can be distributed by actor unchanged.

Writers of one actor are serialized by a row lock on its ``actor_ledgers`` row, held to the
end of the transaction (a batch that only reads takes share locks): event ids grow in commit
order across any number of hosts, and a claim or a terminal transition can never race
another host's.
A batch takes all its locks at its start, in one round trip (``enter_batch``), in actor-name
order, so two batches never deadlock.

A batch of operations (many actors) is one transaction: group commit, as on SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio

from ._bridge import run_bridged, wait_for
from ._errors import (
    LedgerBusyError,
    LedgerError,
    LedgerNotFoundError,
    LedgerUnavailableError,
    LedgerWriteError,
    PayloadError,
)
from ._index import ProcessInfo
from ._store import (
    Clock,
    Committed,
    LedgerClosedError,
    Store,
    _Request,
    _Shard,
    group_writes,
    system_clock,
)
from ._tx import LedgerTx, TxEffects

if TYPE_CHECKING:
    from collections.abc import Awaitable, Iterable, Iterator, Sequence

    import asyncpg

    from ._index import Directory
    from ._models import Projection

T = TypeVar("T")

SCHEMA = "durable_triggers"
"""The PostgreSQL schema holding every table of the store."""

_MAX_ID = (1 << 63) - 1  # PostgreSQL's bigint
_MIGRATION_LOCK = 0x64745F6D6967  # pg_advisory_lock key: one migrator at a time
_LOCK_TIMEOUT = "10s"
_RECONNECT_S = 10.0
_STATEMENT_TIMEOUT_S = 60.0
"""How long a store connection waits for the server's answer to one statement. Past it the
connection is dropped and treated as lost (the store reconnects): a server that stops
answering without closing (a network partition, a frozen server) must not hold a host,
and its stop, forever. Well above the lock timeout, the longest a statement waits here."""

# Each entry upgrades from version (index) to version (index + 1).
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE actor_ledgers (
        actor_id      text   PRIMARY KEY,
        created_at    bigint NOT NULL,
        last_event_id bigint NOT NULL DEFAULT 0
    );
    CREATE TABLE all_events (
        actor_id        text   NOT NULL DEFAULT current_setting('dt.actor', true),
        id              bigint NOT NULL,
        ts              bigint NOT NULL,
        kind            text   NOT NULL,
        payload         text   NOT NULL,
        intent_event_id bigint,
        PRIMARY KEY (actor_id, id)
    );
    CREATE INDEX all_events_by_intent ON all_events (actor_id, intent_event_id)
        WHERE intent_event_id IS NOT NULL;
    -- The actor's row carries its last event id: a writer locking the row reads it fresh
    -- (a row version committed after the writer's snapshot is re-read under the lock).
    CREATE FUNCTION note_event() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE actor_ledgers SET last_event_id = NEW.id
        WHERE actor_id = NEW.actor_id AND last_event_id < NEW.id;
        RETURN NULL;
    END $$;
    CREATE TRIGGER all_events_note AFTER INSERT ON all_events
        FOR EACH ROW EXECUTE FUNCTION note_event();
    CREATE TABLE all_intents (
        actor_id            text    NOT NULL DEFAULT current_setting('dt.actor', true),
        id                  bigint  NOT NULL,
        trigger_kind        text    NOT NULL,
        status              text    NOT NULL,
        due_at              bigint  NOT NULL,
        created_at          bigint  NOT NULL,
        attempts            integer NOT NULL DEFAULT 0,
        redrives            integer NOT NULL DEFAULT 0,
        redrive             integer NOT NULL DEFAULT 0,
        claim_token         text,
        claimed_by          text,
        lease_until         bigint,
        cancel_requested_at bigint,
        cancel_reason       text,
        cancel_requested_by text,
        idempotency_key     text,
        finished_at         bigint,
        terminal_event_ids  text,
        PRIMARY KEY (actor_id, id)
    );
    CREATE INDEX all_intents_pending ON all_intents (actor_id, due_at, id)
        WHERE status = 'pending';
    CREATE INDEX all_intents_running ON all_intents (actor_id, lease_until)
        WHERE status = 'running';
    CREATE INDEX all_intents_due ON all_intents (due_at) WHERE status = 'pending';
    CREATE INDEX all_intents_leases ON all_intents (lease_until) WHERE status = 'running';
    CREATE UNIQUE INDEX all_intents_by_key ON all_intents (actor_id, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE TABLE all_projections (
        actor_id      text   NOT NULL DEFAULT current_setting('dt.actor', true),
        name          text   NOT NULL,
        state         text   NOT NULL,
        last_event_id bigint NOT NULL,
        PRIMARY KEY (actor_id, name)
    );
    CREATE TABLE all_stream_chunks (
        actor_id        text   NOT NULL DEFAULT current_setting('dt.actor', true),
        intent_event_id bigint NOT NULL,
        seq             bigint NOT NULL,
        data            text   NOT NULL,
        PRIMARY KEY (actor_id, intent_event_id, seq)
    );
    CREATE TABLE processes (
        id           text    PRIMARY KEY,
        pid          integer NOT NULL,
        machine      text    NOT NULL,
        started      text    NOT NULL,
        address      text,
        scheduler    boolean NOT NULL,
        heartbeat_at bigint  NOT NULL
    );
    CREATE VIEW events AS
        SELECT id, ts, kind, payload, intent_event_id FROM all_events
        WHERE actor_id = current_setting('dt.actor', true);
    CREATE VIEW intents AS
        SELECT id, trigger_kind, status, due_at, created_at, attempts, redrives, redrive,
               claim_token, claimed_by, lease_until, cancel_requested_at, cancel_reason,
               cancel_requested_by, idempotency_key, finished_at, terminal_event_ids
        FROM all_intents WHERE actor_id = current_setting('dt.actor', true);
    CREATE VIEW projections AS
        SELECT name, state, last_event_id FROM all_projections
        WHERE actor_id = current_setting('dt.actor', true);
    CREATE VIEW stream_chunks AS
        SELECT intent_event_id, seq, data FROM all_stream_chunks
        WHERE actor_id = current_setting('dt.actor', true);
    """,
    # The indexes for the scan of every actor's due work are keyed on expressions only that
    # scan states. Statistics usually find no intent pending or running, so an index whose
    # predicate is ``status = 'pending'`` looks empty; the planner would then take it for one
    # actor's due work too and scan every actor's (see ``_PENDING`` in ``_tx.py``).
    #
    # One round trip locks every actor of a batch, in the order given (callers sort the
    # names: one lock order for every batch, so none deadlock), and reads the schedule rows
    # its operations are known to read. Each statement of a VOLATILE function takes a fresh
    # snapshot: the rows and the due check are read after the locks are held.
    """
    DROP INDEX all_intents_due;
    DROP INDEX all_intents_leases;
    CREATE INDEX all_intents_due ON all_intents ((CASE WHEN status = 'pending' THEN due_at END))
        WHERE (CASE WHEN status = 'pending' THEN due_at END) IS NOT NULL;
    CREATE INDEX all_intents_leases
        ON all_intents ((CASE WHEN status = 'running' THEN lease_until END))
        WHERE (CASE WHEN status = 'running' THEN lease_until END) IS NOT NULL;
    CREATE FUNCTION enter_batch(
        actors text[], writers boolean[], creators boolean[], now_ms bigint,
        read_actors text[], read_ids bigint[], due_kinds text[]
    ) RETURNS TABLE (
        actor text, last_event_id bigint, no_due_pending boolean,
        id bigint, trigger_kind text, status text, due_at bigint, created_at bigint,
        attempts integer, redrives integer, redrive integer, claim_token text,
        claimed_by text, lease_until bigint, cancel_requested_at bigint, cancel_reason text,
        cancel_requested_by text, idempotency_key text, finished_at bigint,
        terminal_event_ids text
    ) LANGUAGE plpgsql VOLATILE AS $$
    #variable_conflict use_column
    DECLARE
        a record;
        r record;
        last bigint;
    BEGIN
        FOR a IN SELECT * FROM unnest(actors, writers, creators) WITH ORDINALITY
                AS u(name, writer, creator, n) ORDER BY n LOOP
            IF a.writer THEN
                SELECT l.last_event_id INTO last FROM actor_ledgers l
                    WHERE l.actor_id = a.name FOR UPDATE;
                IF NOT FOUND AND a.creator THEN
                    INSERT INTO actor_ledgers (actor_id, created_at)
                        VALUES (a.name, now_ms) ON CONFLICT (actor_id) DO NOTHING;
                    SELECT l.last_event_id INTO last FROM actor_ledgers l
                        WHERE l.actor_id = a.name FOR UPDATE;
                END IF;
            ELSE
                SELECT l.last_event_id INTO last FROM actor_ledgers l
                    WHERE l.actor_id = a.name FOR SHARE;
                IF NOT FOUND AND a.creator THEN
                    INSERT INTO actor_ledgers (actor_id, created_at)
                        VALUES (a.name, now_ms) ON CONFLICT (actor_id) DO NOTHING;
                    SELECT l.last_event_id INTO last FROM actor_ledgers l
                        WHERE l.actor_id = a.name FOR SHARE;
                END IF;
            END IF;
            CONTINUE WHEN NOT FOUND;  -- no such actor: its operations are told so
            actor := a.name;  -- a reader learns neither the next id nor what is due
            last_event_id := CASE WHEN a.writer THEN last END;
            no_due_pending := CASE WHEN a.writer THEN NOT EXISTS (
                SELECT 1 FROM all_intents t WHERE t.actor_id = a.name
                    AND t.status = 'pending' AND t.due_at <= now_ms
                    AND (due_kinds IS NULL OR t.trigger_kind = ANY (due_kinds))) END;
            RETURN NEXT;
        END LOOP;
        -- One index lookup each (a join's plan, made without the arrays' sizes, may scan).
        FOR r IN SELECT * FROM unnest(read_actors, read_ids) AS u(name, n) LOOP
            RETURN QUERY SELECT t.actor_id, NULL::bigint, NULL::boolean, t.id,
                t.trigger_kind, t.status, t.due_at, t.created_at, t.attempts, t.redrives,
                t.redrive, t.claim_token, t.claimed_by, t.lease_until, t.cancel_requested_at,
                t.cancel_reason, t.cancel_requested_by, t.idempotency_key, t.finished_at,
                t.terminal_event_ids
                FROM all_intents t WHERE t.actor_id = r.name AND t.id = r.n;
        END LOOP;
        IF array_length(actors, 1) > 0 THEN
            PERFORM set_config('dt.actor', actors[1], true);
        END IF;
    END $$;
    """,
    # A writer's next event id is read under its lock, as the last key of its events in the
    # primary key, rather than kept on its ``actor_ledgers`` row by a trigger (which cost
    # about 40 µs of every event insert). ``enter_batch`` works on sets: one statement
    # creates the missing actors, one takes every lock, in the order given, one reads each
    # writer's last id and due check, one the rows asked for. Each runs with a fresh
    # snapshot, so the last two see everything committed before the locks were granted.
    #
    # A batch takes one lock strength for all its actors: ``FOR UPDATE`` if it writes any,
    # else ``FOR SHARE``. (A reader in a batch with writers waits for another host's readers
    # too; taking two strengths in one order would need a statement per actor.)
    #
    # Its statements keep one generic plan each (the arrays' sizes vary, so the default
    # would plan them again on every call: about half the cost of a one-actor batch).
    # Each actor's last id and due check, and each row read ahead, are looked up apart, by
    # the actor's own keys: a ``LATERAL`` subquery with ``LIMIT`` or ``OFFSET`` stays a
    # lookup per row. (As a plain join or an ``EXISTS``, a plan made without the arrays'
    # sizes may turn them into one scan of every actor's rows.)
    """
    DROP TRIGGER all_events_note ON all_events;
    DROP FUNCTION note_event();
    ALTER TABLE actor_ledgers DROP COLUMN last_event_id;
    CREATE OR REPLACE FUNCTION enter_batch(
        actors text[], writers boolean[], creators boolean[], now_ms bigint,
        read_actors text[], read_ids bigint[], due_kinds text[]
    ) RETURNS TABLE (
        actor text, last_event_id bigint, no_due_pending boolean,
        id bigint, trigger_kind text, status text, due_at bigint, created_at bigint,
        attempts integer, redrives integer, redrive integer, claim_token text,
        claimed_by text, lease_until bigint, cancel_requested_at bigint, cancel_reason text,
        cancel_requested_by text, idempotency_key text, finished_at bigint,
        terminal_event_ids text
    ) LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan AS $$
    #variable_conflict use_column
    DECLARE
        found_actors text[];
        found_writers boolean[];
    BEGIN
        IF true = ANY (creators) THEN
            INSERT INTO actor_ledgers (actor_id, created_at)
                SELECT u.name, now_ms
                FROM unnest(actors, creators) WITH ORDINALITY AS u(name, creator, n)
                WHERE u.creator ORDER BY u.n
                ON CONFLICT (actor_id) DO NOTHING;
        END IF;
        IF true = ANY (writers) THEN
            SELECT array_agg(x.name ORDER BY x.n), array_agg(x.writer ORDER BY x.n)
                INTO found_actors, found_writers
                FROM (SELECT u.name, u.writer, u.n FROM actor_ledgers l
                      JOIN unnest(actors, writers) WITH ORDINALITY AS u(name, writer, n)
                        ON l.actor_id = u.name
                      ORDER BY u.n FOR UPDATE OF l) x;
        ELSE
            SELECT array_agg(x.name ORDER BY x.n), array_agg(x.writer ORDER BY x.n)
                INTO found_actors, found_writers
                FROM (SELECT u.name, u.writer, u.n FROM actor_ledgers l
                      JOIN unnest(actors, writers) WITH ORDINALITY AS u(name, writer, n)
                        ON l.actor_id = u.name
                      ORDER BY u.n FOR SHARE OF l) x;
        END IF;
        -- Missing actors (not asked to be created) have no row: their operations are told.
        -- A reader learns neither the next id nor what is due.
        RETURN QUERY SELECT f.name,
            CASE WHEN f.writer THEN coalesce(last.id, 0) END,
            CASE WHEN f.writer THEN due.found IS NULL END,
            NULL::bigint, NULL::text, NULL::text, NULL::bigint, NULL::bigint, NULL::integer,
            NULL::integer, NULL::integer, NULL::text, NULL::text, NULL::bigint, NULL::bigint,
            NULL::text, NULL::text, NULL::text, NULL::bigint, NULL::text
            FROM unnest(found_actors, found_writers) AS f(name, writer)
            CROSS JOIN LATERAL (SELECT max(e.id) AS id FROM all_events e
                                WHERE e.actor_id = f.name) last
            LEFT JOIN LATERAL (SELECT true AS found FROM all_intents t
                               WHERE t.actor_id = f.name AND t.status = 'pending'
                                   AND t.due_at <= now_ms
                                   AND (due_kinds IS NULL OR t.trigger_kind = ANY (due_kinds))
                               LIMIT 1) due ON true;
        RETURN QUERY SELECT t.actor_id, NULL::bigint, NULL::boolean, t.id,
            t.trigger_kind, t.status, t.due_at, t.created_at, t.attempts, t.redrives,
            t.redrive, t.claim_token, t.claimed_by, t.lease_until, t.cancel_requested_at,
            t.cancel_reason, t.cancel_requested_by, t.idempotency_key, t.finished_at,
            t.terminal_event_ids
            FROM unnest(read_actors, read_ids) AS r(name, n)
            CROSS JOIN LATERAL (SELECT * FROM all_intents t
                                WHERE t.actor_id = r.name AND t.id = r.n OFFSET 0) t;
        IF array_length(actors, 1) > 0 THEN
            PERFORM set_config('dt.actor', actors[1], true);
        END IF;
    END $$;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

DUE = "(CASE WHEN status = 'pending' THEN due_at END)"
"""A pending intent's due time, else NULL: the key of the ``all_intents_due`` index."""
LEASE = "(CASE WHEN status = 'running' THEN lease_until END)"
"""A running intent's lease end, else NULL: the key of the ``all_intents_leases`` index."""

_PARAM = re.compile(r"\?")
_translated: dict[str, str] = {}
_ROWS = ("SELECT", "WITH", "VALUES")
_savepoint_commands: dict[str, tuple[str, str]] = {}
"""Savepoint statement texts already parsed: ``(SAVEPOINT | RELEASE | ROLLBACK, name)``."""


def _translate(sql: str) -> str:
    """SQLite's ``?`` parameters to PostgreSQL's ``$n``."""
    text = _translated.get(sql)
    if text is None:
        counter = iter(range(1, 1 << 16))
        text = _PARAM.sub(lambda _: f"${next(counter)}", sql)
        if len(_translated) < 4096:
            _translated[sql] = text
    return text


class _Result:
    """The rows and row count of one statement, shaped like a ``sqlite3.Cursor``."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[Any]:
        return list(self._rows)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)


def _literal(value: object) -> str:
    """``value`` as a SQL literal, for a statement sent as text (``_render``).

    Only the types the ledger's writes pass are rendered; anything else raises
    ``TypeError`` and the statement is sent with parameters instead. Strings are quoted by
    doubling ``'`` alone, which is exact with ``standard_conforming_strings`` on (set for
    every connection in ``connect``); a NUL, which PostgreSQL's text cannot hold, or a lone
    surrogate, which UTF-8 cannot, goes the parameter way, to be refused alone.
    """
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        text = int.__repr__(value)
        return f"({text})" if value < 0 else text  # never "x--1": that is a comment
    if isinstance(value, str) and "\x00" not in value and _encodable(value):
        return "'" + str.replace(value, "'", "''") + "'"
    raise TypeError(f"no literal for {type(value).__name__}")


def _encodable(text: str) -> bool:
    """True unless ``text`` holds a lone surrogate (which JSON lets through): as a
    parameter, asyncpg refuses it alone; inside the queued text, it would break the send."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _arguments(parameters: Sequence[Any]) -> str:
    """``(literal, ...)`` for ``EXECUTE`` (raises ``TypeError``, see ``_literal``).

    The common cases (ASCII text, non-negative ints, NULL) are rendered here, inline: a
    deferred write's arguments are rendered on every call."""
    if not parameters:
        return ""
    parts = []
    for value in parameters:
        kind = type(value)
        if kind is str and value.isascii() and "\x00" not in value:
            parts.append("'" + value.replace("'", "''") + "'")
        elif kind is int and value >= 0:
            parts.append(int.__repr__(value))
        elif value is None:
            parts.append("NULL")
        else:
            parts.append(_literal(value))
    return "(" + ", ".join(parts) + ")"


class PgConnection:
    """An asyncpg connection with the synchronous face the ledger's statements use.

    Only usable under ``run_bridged``: each statement is awaited by the bridging coroutine.

    Round trips are what a batch costs, so statements whose answer nobody reads wait in a
    queue and travel together as one text, in order: writes given to ``defer`` (rendered
    with literals), and the savepoint commands around operations. The queue is sent before
    any statement that needs it (a write whose row count is read, or a read of an actor
    with queued writes: every statement sees the ones before it), and with ``COMMIT``. A
    read of another actor goes ahead of it: the views show one actor's rows, so it cannot
    see them. ``dt.actor`` is set inside the text wherever the queued writes change actor,
    and left on ``actor``, the actor whose operation runs now (a statement run at once
    while the server's ``dt.actor`` is another first sends the queue, to switch it).

    Savepoints cost nothing until sent. Released unsent, a savepoint's command is dropped
    and its writes stay; rolled back unsent, the writes queued after it are dropped, never
    having reached the server.

    If a statement fails, the connection asks the server whether the transaction is aborted
    (a client-side error leaves it intact). Only a rollback to a savepoint that was sent
    before the failure recovers it; ``commit()`` refuses an aborted transaction instead of
    letting PostgreSQL quietly roll it back. So a read that fails while its operation's
    savepoint is still queued, or a queued write that fails, fails the whole batch:
    neither happens short of a broken server or connection (writes are checked before they
    are queued, and run under the actor's lock).
    """

    __slots__ = (
        "_dirty",
        "_prepared",
        "_queue",
        "_savepoints",
        "_sent",
        "aborted",
        "actor",
        "location",
        "raw",
    )

    def __init__(self, raw: asyncpg.Connection, location: str) -> None:
        self.raw = raw
        self.location = location
        self._queue: list[tuple[str, str | None, bool]] = []
        """``(statement text, actor, is a write)`` in order: writes and savepoint commands,
        each with the ``dt.actor`` it was issued under."""
        self._dirty: set[str] = set()
        """The actors with writes in the queue."""
        self._savepoints: list[list[Any]] = []
        """``[name, sent, actor, queued command]`` of the savepoints that exist, innermost
        last."""
        self.actor: str | None = None
        """The actor whose operation runs: the views must show it to its statements."""
        self._sent: str | None = None
        """What the server's ``dt.actor`` is, for the statements sent so far (None: not
        known)."""
        self._prepared: dict[str, str] = {}
        """Deferred statements prepared on this connection, by text: their name."""
        self.aborted = False

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> _Result:
        savepoint = _savepoint_commands.get(sql)
        if savepoint is None:
            head = sql.lstrip()[:10].upper()
            if head.startswith(("SAVEPOINT", "RELEASE", "ROLLBACK ")):
                savepoint = (head.split()[0], sql.split()[-1])
                if len(_savepoint_commands) < 64:  # the ledger's few texts, parsed once
                    _savepoint_commands[sql] = savepoint
        if savepoint is not None:
            self._savepoint_command(*savepoint)
            return _Result([], -1)
        for value in parameters:
            if isinstance(value, str) and "\x00" in value:
                # The server would refuse it and abort the transaction (a read, too: its
                # operation's savepoint may not be sent yet). Refused here, it fails alone.
                raise PayloadError("PostgreSQL text cannot hold NUL characters")
        returning = " RETURNING " in sql
        rows = returning or head.startswith(_ROWS)
        if self._sent != self.actor or (
            self._queue and (returning or not rows or self.actor in self._dirty)
        ):
            self._flush()
        return self._send(sql, parameters, rows)

    def enter(
        self,
        actors: list[str],
        writers: list[bool],
        creators: list[bool],
        now_ms: int,
        reads: tuple[list[str], list[int]],
        due_kinds: list[str] | None,
    ) -> list[Any]:
        """Lock ``actors`` (sorted) and read ahead the schedule rows ``reads`` names, in one
        round trip (``enter_batch``, at the start of a transaction): a row per actor found,
        then the rows. The server's ``dt.actor`` is left on the first actor."""
        assert not self._queue, "actors are entered at the start of a transaction"
        found = self._send(
            "SELECT * FROM enter_batch(?, ?, ?, ?, ?, ?, ?)",
            (actors, writers, creators, now_ms, *reads, due_kinds),
            True,
        )._rows
        if actors:
            self._sent = self.actor = actors[0]
        return found

    def _send(self, sql: str, parameters: Sequence[Any], rows: bool) -> _Result:
        text = _translate(sql)
        try:
            if rows:
                found = self._wait(self.raw.fetch(text, *parameters))
                return _Result(found, len(found))
            if parameters:
                status = self._wait(self.raw.execute(text, *parameters))
            else:
                status = self._wait(self.raw.execute(text))
        except Exception:
            self._check_aborted()
            raise
        tail = status.rsplit(" ", 1)[-1]
        return _Result([], int(tail) if tail.isdigit() else -1)

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> None:
        if self._queue or self._sent != self.actor:
            self._flush()
        try:
            self._wait(self.raw.executemany(_translate(sql), list(parameters)))
        except Exception:
            self._check_aborted()
            raise

    def defer(self, sql: str, parameters: Sequence[Any], actor: str) -> None:
        """Queue a write of ``actor`` whose result nobody reads (see the class)."""
        assert actor == self.actor, "a write for an actor the views do not show"
        try:
            arguments = _arguments(parameters)
        except TypeError:
            self.execute(sql, parameters)
            return
        name = self._prepared.get(sql)
        if name is None:
            # Once per statement and connection, so the queued text is only EXECUTE: the
            # server neither parses nor plans the statement again. (A prepared statement
            # belongs to the session; a rollback keeps it.)
            name = f"dt_w{len(self._prepared)}"
            try:
                self._wait(self.raw.execute(f"PREPARE {name} AS {_translate(sql)}"))
            except Exception:
                self._check_aborted()
                raise
            self._prepared[sql] = name
        self._queue.append((f"EXECUTE {name}{arguments}", actor, True))
        self._dirty.add(actor)

    def _savepoint_command(self, command: str, name: str) -> None:
        stack = self._savepoints
        if command == "SAVEPOINT":
            item = ("SAVEPOINT " + name, self.actor, False)
            stack.append([name, False, self.actor, item])
            self._queue.append(item)
            return
        found = len(stack) - 1  # the innermost, most often
        while found >= 0 and stack[found][0] != name:
            found -= 1
        if found < 0:
            return  # released already, or rolled back past
        if stack[found][1]:
            if command == "RELEASE":
                del stack[found:]
                self._queue.append((f"RELEASE SAVEPOINT {name}", self.actor, False))
                return
            # Everything queued came after the savepoint was sent: drop it, and undo what
            # reached the server (this also ends an aborted state). A queued RELEASE is of a
            # savepoint inside this one that the server still has; a savepoint of the same
            # name would take the rollback, so each goes first (rolled back, then released:
            # both work in an aborted transaction, in that order).
            commands = [
                f"ROLLBACK TO SAVEPOINT {text.split()[-1]}; {text}"
                for text, _, write in self._queue
                if not write and text.startswith("RELEASE ")
            ]
            del stack[found + 1 :]
            self._queue.clear()
            self._dirty.clear()
            commands.append(f"ROLLBACK TO SAVEPOINT {name}")
            self._wait(self.raw.execute("; ".join(commands)))
            # The rollback undid the switches after the savepoint: the server's ``dt.actor``
            # is what it was there, the savepoint's own actor (see ``_script``).
            self._sent = stack[found][2]
            self.aborted = False
            return
        # Never sent: nothing after it reached the server. Its command may be missing from
        # the queue if a failed send took it; then only a rollback further out can help.
        command_at = self._queued_savepoint(stack[found][3])
        if command == "RELEASE":
            # Its writes join the enclosing scope; it and the (unsent) savepoints inside it go.
            del stack[found:]
            if command_at is not None:
                self._queue[command_at:] = [item for item in self._queue[command_at:] if item[2]]
            return
        del stack[found + 1 :]
        if command_at is not None:
            del self._queue[command_at + 1 :]
            self._dirty = {actor for _, actor, write in self._queue if write and actor}

    def _queued_savepoint(self, item: tuple[str, str | None, bool]) -> int | None:
        """Where the savepoint's command (``item``, itself) is in the queue, if it is."""
        queue = self._queue
        for index in range(len(queue) - 1, -1, -1):
            if queue[index] is item:
                return index
        return None

    def _script(self, *, savepoints: bool = True) -> list[str]:
        """The queue as statements, switching ``dt.actor`` back to what each was issued
        under. A savepoint is taken under its own actor too: rolling back to it undoes the
        switches after it, and must leave the views on the actor that rolls back."""
        statements: list[str] = []
        current = self._sent
        for text, actor, write in self._queue:
            if not (write or savepoints):
                continue
            if actor != current and actor is not None:
                statements.append(f"SET LOCAL dt.actor = {_literal(actor)}")
                current = actor
            statements.append(text)
        if current != self.actor and self.actor is not None:
            statements.append(f"SET LOCAL dt.actor = {_literal(self.actor)}")
        return statements

    def _flush(self) -> None:
        """Send the queue (one round trip)."""
        statements = self._script()
        self._queue.clear()
        self._dirty.clear()
        try:
            self._wait(self.raw.execute(";\n".join(statements)))
        except Exception:
            # Some of the queue may have run, the rest is lost: whatever the server says of
            # the transaction, it must not commit. Only a rollback to a savepoint sent
            # before (whose operation owns all that was queued since) can save it.
            self.aborted = True
            self._sent = None
            raise
        self._sent = self.actor
        for entry in self._savepoints:
            entry[1] = True

    def _wait(self, awaitable: Awaitable[T]) -> T:
        """Await a statement of ``raw`` from the bridged code. One the server leaves
        unanswered past ``_STATEMENT_TIMEOUT_S`` (asyncpg's command timeout) drops the
        connection, which is then lost like a cut one: the store reconnects."""
        try:
            return wait_for(awaitable)
        except TimeoutError:
            self.raw.terminate()
            raise

    def _check_aborted(self) -> None:
        """After a failed statement: is the transaction aborted? (One round trip.)"""
        import asyncpg

        if self.raw.is_closed():
            return
        try:
            self._wait(self.raw.fetchval("SELECT 1"))
        except asyncpg.InFailedSQLTransactionError:
            self.aborted = True

    def _reset(self) -> None:
        self._queue.clear()
        self._dirty.clear()
        self._savepoints.clear()
        self.actor = self._sent = None
        self.aborted = False

    def begin(self) -> None:
        """Start a transaction."""
        self._reset()
        # Whatever the database's default: each statement must see what committed before
        # it, so rows read after a lock wait (``enter_batch``) are current.
        self._wait(self.raw.execute("BEGIN ISOLATION LEVEL READ COMMITTED"))

    def commit(self) -> None:
        """Send what is queued and commit (one round trip), or raise if a failed statement
        left the transaction aborted."""
        statements = [*self._script(savepoints=False), "COMMIT"]  # COMMIT ends savepoints
        aborted = self.aborted
        self._reset()
        if aborted:
            raise LedgerWriteError(
                self.location, "a statement failed and was not rolled back; nothing was written"
            )
        status = self._wait(self.raw.execute(";\n".join(statements)))
        if status != "COMMIT":
            raise LedgerWriteError(self.location, f"COMMIT answered {status}")

    def rollback(self) -> None:
        """Roll the transaction back."""
        self._reset()
        self._wait(self.raw.execute("ROLLBACK"))


class _Scope:
    """One actor's ledger inside a batch transaction (``dt.actor`` set to it)."""

    __slots__ = ("actor_id", "conn", "next_id", "no_due_pending", "rows")

    def __init__(self, actor_id: str, conn: PgConnection) -> None:
        self.actor_id = actor_id
        self.conn = conn
        self.next_id: int | None = None
        self.no_due_pending: bool | None = None
        self.rows: dict[int, tuple[Any, ...]] = {}

    def write(self, sql: str, parameters: Sequence[Any], /) -> None:
        """Queue a write whose result nobody reads (sent with the next statement that needs
        it, or with COMMIT)."""
        self.conn.defer(sql, parameters, self.actor_id)

    def integrity_check(self) -> list[str]:
        """PostgreSQL checks its own pages; this checks the ledger's own rules."""
        problems = [
            f"intent {row[0]} is {row[1]} without its intent event"
            for row in self.conn.execute(
                "SELECT i.id, i.status FROM intents i LEFT JOIN events e ON e.id = i.id"
                " WHERE e.id IS NULL"
            )
        ]
        return problems or ["ok"]


class PgDirectory:
    """The ``Directory`` of a PostgreSQL store: due times are read from the intents."""

    def __init__(self, conn: PgConnection, location: str) -> None:
        self.conn = conn
        self.location = location

    def due_before(self, before_ms: int, limit: int) -> list[tuple[str, int]]:
        rows = self.conn.execute(
            f"SELECT actor_id, min(t) AS due FROM ("
            f" SELECT actor_id, {DUE} AS t FROM all_intents WHERE {DUE} <= ?"
            f" UNION ALL SELECT actor_id, {LEASE} FROM all_intents WHERE {LEASE} <= ?"
            ") s GROUP BY actor_id ORDER BY due LIMIT ?",
            (before_ms, before_ms, limit),
        )
        return [(row[0], int(row[1])) for row in rows]

    def actors(self, *, after: str = "", limit: int = 1000) -> list[tuple[str, str, int | None]]:
        rows = self.conn.execute(
            "SELECT a.actor_id, (SELECT min(t) FROM ("
            "  SELECT min(due_at) AS t FROM all_intents i"
            "   WHERE i.actor_id = a.actor_id AND status = 'pending'"
            "  UNION ALL SELECT min(lease_until) FROM all_intents i"
            "   WHERE i.actor_id = a.actor_id AND status = 'running') s)"
            " FROM actor_ledgers a WHERE a.actor_id > ? ORDER BY a.actor_id LIMIT ?",
            (after, limit),
        )
        return [(row[0], self.location, None if row[1] is None else int(row[1])) for row in rows]

    def register_process(self, info: ProcessInfo) -> None:
        self.conn.execute(
            "INSERT INTO processes (id, pid, machine, started, address, scheduler, heartbeat_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
            " pid = excluded.pid, machine = excluded.machine, started = excluded.started,"
            " address = excluded.address, scheduler = excluded.scheduler,"
            " heartbeat_at = excluded.heartbeat_at",
            (
                info.id,
                info.pid,
                info.machine,
                info.started,
                info.address,
                info.scheduler,
                info.heartbeat_at,
            ),
        )

    def heartbeat(self, process_id: str, now_ms: int) -> None:
        self.conn.execute(
            "UPDATE processes SET heartbeat_at = ? WHERE id = ?", (now_ms, process_id)
        )

    def unregister_process(self, process_id: str) -> None:
        self.conn.execute("DELETE FROM processes WHERE id = ?", (process_id,))

    def processes(self) -> list[ProcessInfo]:
        return [
            ProcessInfo(row[0], row[1], row[2], row[3], row[4], bool(row[5]), int(row[6]))
            for row in self.conn.execute(
                "SELECT id, pid, machine, started, address, scheduler, heartbeat_at FROM processes"
            )
        ]


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


async def connect(
    url: str, *, connect_timeout: float = 10.0, command_timeout: float | None = None
) -> asyncpg.Connection:
    """A connection to ``url`` with the store's schema first on the search path.

    Cancelling the caller does not cancel the connect itself: asyncpg, cancelled just after
    its socket connects and before the TLS negotiation starts, leaves behind a future whose
    ``ConnectionError`` nobody retrieves, which asyncio then reports as an error of the
    program (MagicStack/asyncpg#1211). The cancelled caller waits up to
    ``_CONNECT_GRACE_S`` for the connect to end (most take milliseconds) and closes what it
    made; a slower one is left to end on its own, bounded by ``connect_timeout``, and its
    connection is then dropped.

    Raises:
        LedgerUnavailableError: the server cannot be reached, or takes no connections now.
        LedgerWriteError: the server refuses the connection (its credentials, its database).
    """
    task = asyncio.ensure_future(_connect(url, connect_timeout, command_timeout))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(_CONNECT_GRACE_S):
                await asyncio.wait([task])
            if task.done():
                if not task.cancelled() and task.exception() is None:
                    await close_connection(task.result())
            else:
                _abandoned.add(task)
                task.add_done_callback(_drop_abandoned)
        raise


_CONNECT_GRACE_S = 1.0
"""How long a cancelled caller waits for its connect to end before leaving it to end alone
(the loop closing before then would cut it short, with asyncpg's failed future left over)."""

_abandoned: set[asyncio.Future[asyncpg.Connection]] = set()
"""Connects whose callers were cancelled, held until they end (the loop keeps tasks weakly)."""


def _drop_abandoned(task: asyncio.Future[asyncpg.Connection]) -> None:
    _abandoned.discard(task)
    if task.cancelled() or task.exception() is not None:
        return  # the exception is retrieved by asking for it: nothing is reported
    task.result().terminate()


async def close_connection(conn: asyncpg.Connection) -> None:
    """Close ``conn`` in order, even in a cancelled scope, within two seconds; errors of a
    broken connection are dropped (there is nothing to keep).

    In order, because a statement cancelled on it has its cancel request still on the way
    over a new connection, which an abrupt close would cut short (MagicStack/asyncpg#1211).
    """
    if conn.is_closed():
        return
    with contextlib.suppress(Exception), anyio.move_on_after(2, shield=True):
        await conn.close()
    if not conn.is_closed():
        conn.terminate()


async def _connect(
    url: str, connect_timeout: float, command_timeout: float | None
) -> asyncpg.Connection:
    import asyncpg

    try:
        return await asyncpg.connect(
            url,
            timeout=connect_timeout,
            command_timeout=command_timeout,
            statement_cache_size=1024,
            server_settings={
                "search_path": SCHEMA,
                "application_name": "durable-triggers",
                "lock_timeout": _LOCK_TIMEOUT,
                # Queued writes are sent as text; their string literals rely on this.
                "standard_conforming_strings": "on",
            },
        )
    except (OSError, asyncpg.CannotConnectNowError, asyncpg.InterfaceError) as exc:
        # Not reached, or not taking connections now (starting, stopping): try again later.
        raise LedgerUnavailableError(redact(url), f"cannot connect: {exc}") from exc
    except asyncpg.PostgresError as exc:  # refused: a wrong password, no such database...
        raise LedgerWriteError(redact(url), f"cannot connect: {exc}") from exc


async def migrate(conn: asyncpg.Connection) -> int:
    """Create or upgrade the schema; safe when many hosts start at once. Returns the version.

    Raises:
        LedgerError: the database holds a newer schema than this version understands.
    """
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_version (version integer NOT NULL)"
        )
        version = await conn.fetchval(f"SELECT max(version) FROM {SCHEMA}.schema_version")
        version = int(version or 0)
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"the database holds durable-triggers schema version {version}; this version"
                f" understands up to {SCHEMA_VERSION}"
            )
        while version < SCHEMA_VERSION:
            async with conn.transaction():
                await conn.execute(MIGRATIONS[version])
                version += 1
                await conn.execute(
                    f"INSERT INTO {SCHEMA}.schema_version (version) VALUES ($1)", version
                )
        return version
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)


CancelNotice = Callable[[str, list[tuple[str, int, str | None]]], tuple[str, str]]
"""``(owner process id, [(actor, intent id, reason), ...]) -> (channel, payload)``."""


@dataclass(slots=True)
class _Done:
    """One actor's operations that ran in a batch, and what they changed."""

    actor_id: str
    requests: list[_Request[Any]]
    effects: TxEffects


class _Discard(Exception):
    """Roll the batch back: its only operation failed (its error is already set)."""


@dataclass(slots=True)
class _Progress:
    """How far a batch got: whether an operation ran, whether COMMIT was sent."""

    ran: bool = False
    committing: bool = False


class _Lost(Exception):
    """The connection broke. ``ran``: an operation had run (the batch must not run again);
    ``committing``: COMMIT had been sent (the outcome is unknown)."""

    def __init__(self, message: str, *, ran: bool, committing: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.ran = ran
        self.committing = committing


class PostgresStore(Store):
    """Every actor's ledger in one PostgreSQL database; an async context manager.

    Cancels are notified to the process holding the claim in the committing transaction
    (``pg_notify`` on channel ``dt_<process id>``, payload ``{"x": [[actor, intent,
    reason], ...], "v": 1}``): delivered only if the cancel committed.

    Args:
        url: a ``postgresql://`` URL (asyncpg's form).
        projections: folds kept current in every write transaction.
        shards: connections running batches side by side; actors are spread over them by
            name.
        clock: the time source, epoch milliseconds.
        batch_actors: most actors in one batch transaction.
        due_kinds: the trigger kinds whose due work a batch's lock looks for, to answer an
            eager claim's fairness check without a read (the kinds its host runs); None,
            every kind.
    """

    def __init__(
        self,
        url: str,
        *,
        projections: Sequence[Projection[Any]] = (),
        shards: int = 2,
        clock: Clock = system_clock,
        batch_actors: int = 256,
        due_kinds: Sequence[str] | None = None,
    ) -> None:
        super().__init__(
            projections=projections, shards=shards, clock=clock, batch_actors=batch_actors
        )
        self.url = url
        self.location = redact(url)
        self.due_kinds = None if due_kinds is None else list(due_kinds)
        self._conns: dict[int, PgConnection] = {}
        self._index: PgConnection | None = None
        self._index_lock = anyio.Lock()
        self.process_id: str | None = None
        """The registry id of the process using this store (set by its host): cancels of
        its own attempts are delivered in-process, not notified."""
        self.cancel_notice: CancelNotice | None = None
        """Set by the host (``notify_cancels``): the channel and payload telling a process of
        cancels of its attempts. Unset, the store notifies nobody."""

    def notify_cancels(self, process_id: str, notice: CancelNotice) -> None:
        """Notify each claim's owner of the cancels this store commits, in their transaction
        (``notice(owner, cancels)`` gives the channel and payload); ``process_id``'s own
        cancels are left to the caller."""
        self.process_id = process_id
        self.cancel_notice = notice
        self.notifies_cancels = True

    async def __aenter__(self) -> PostgresStore:
        await self._migrate()
        try:
            index = await connect(self.url, command_timeout=_STATEMENT_TIMEOUT_S)
            self._index = PgConnection(index, self.location)
            for shard in self._shards:
                conn = await connect(self.url, command_timeout=_STATEMENT_TIMEOUT_S)
                self._conns[shard.number] = PgConnection(conn, self.location)
        except BaseException:
            await self._close_connections()
            raise
        await self._start_pumps()
        return self

    async def _migrate(self) -> None:
        """Create or upgrade the schema, on a connection of its own: with no statement
        timeout, as a migration of a large table may take long, and no lock timeout, as a
        host starting while another migrates waits for it.

        Raises:
            LedgerError: the schema is newer than this version's, or the migration failed.
        """
        import asyncpg

        conn = await connect(self.url)
        try:
            await conn.execute("SET lock_timeout = 0")
            await migrate(conn)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise LedgerWriteError(self.location, f"cannot migrate the schema: {exc}") from exc
        finally:
            await close_connection(conn)

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self._stop_pumps()  # as ``LedgerStore``'s: a cancellation skips nothing
        finally:
            await self._close_connections()

    async def _close_connections(self) -> None:
        conns = [*self._conns.values(), *([self._index] if self._index else [])]
        self._conns.clear()
        self._index = None
        for conn in conns:
            await close_connection(conn.raw)

    async def exists(self, actor_id: str) -> bool:
        def read(directory: Directory) -> bool:
            assert isinstance(directory, PgDirectory)
            row = directory.conn.execute(
                "SELECT 1 FROM actor_ledgers WHERE actor_id = ?", (actor_id,)
            ).fetchone()
            return row is not None

        return await self.run_index(read)

    async def run_index(self, fn: Callable[[Directory], T]) -> T:
        async with self._index_lock:
            if self._index is None:
                raise LedgerClosedError
            for attempt in range(2):
                conn = self._index
                try:
                    with anyio.CancelScope(shield=True):
                        return await run_bridged(fn, PgDirectory(conn, self.location))
                except Exception as exc:
                    if not conn.raw.is_closed() or attempt:
                        raise self._wrap(exc) from exc
                    self._index = await self._reconnect()
            raise AssertionError("unreachable")

    async def _reconnect(self) -> PgConnection:
        """A new connection, tried every 0.1 s for up to about ``_RECONNECT_S`` seconds.

        Raises:
            LedgerUnavailableError: the server took no connection in that time (the caller's
                operation fails; the next one tries again, however long the outage lasts).
        """
        error: LedgerWriteError | None = None
        with anyio.move_on_after(_RECONNECT_S + 1):
            while True:
                try:
                    conn = await connect(
                        self.url, connect_timeout=2, command_timeout=_STATEMENT_TIMEOUT_S
                    )
                    return PgConnection(conn, self.location)
                except LedgerWriteError as exc:
                    error = exc
                    await anyio.sleep(0.1)
        detail = error.detail if error is not None else "timed out"
        raise LedgerUnavailableError(
            self.location, f"cannot reconnect for {_RECONNECT_S:g} s: {detail}"
        )

    def _wrap(self, exc: BaseException) -> BaseException:
        import asyncpg

        if isinstance(exc, LedgerError):
            return exc
        if isinstance(exc, asyncpg.exceptions.LockNotAvailableError):
            return LedgerBusyError(self.location, 10.0)
        if isinstance(exc, TimeoutError):  # (an OSError: first)
            return LedgerUnavailableError(self.location, "the server did not answer in time")
        if isinstance(exc, (asyncpg.InterfaceError, OSError)):
            return LedgerUnavailableError(self.location, str(exc))
        if isinstance(exc, asyncpg.PostgresError):
            return LedgerWriteError(self.location, str(exc))
        return exc

    async def _run_batch(
        self, shard: _Shard, batch: list[_Request[Any]]
    ) -> tuple[list[Committed], list[_Request[Any]], tuple[str, ...]]:
        with anyio.CancelScope(shield=True):
            for attempt in range(2):
                conn = self._conns[shard.number]
                try:
                    committed = await run_bridged(self._execute, conn, batch)
                    if committed and self._hooks:
                        self._run_hooks(committed)
                    return committed, [], ()
                except _Lost as lost:
                    reconnected = False
                    with contextlib.suppress(LedgerError):
                        self._conns[shard.number] = await self._reconnect()
                        reconnected = True
                    # Operations run once, as on SQLite (they may keep state of their own, as
                    # a claim's slots): a batch is retried only if none of them had run, and
                    # only on a new connection (the old one would only fail again).
                    if lost.ran or attempt or not reconnected:
                        message = lost.message
                        if lost.committing:
                            message += " (the connection broke during COMMIT: outcome unknown)"
                        error = LedgerUnavailableError(self.location, message)
                        for request in batch:
                            request.result, request.error = None, error
                        return [], [], ()
        raise AssertionError("unreachable")

    def _execute(self, conn: PgConnection, batch: list[_Request[Any]]) -> list[Committed]:
        """Run one batch as one transaction (bridged: statements await asyncpg)."""
        now_ms = self.clock()
        groups: dict[str, list[_Request[Any]]] = {}
        for request in batch:
            groups.setdefault(request.actor_id, []).append(request)
        alone = len(batch) == 1
        opened: list[_Done] = []
        progress = _Progress()
        try:
            conn.begin()
            actors = sorted(groups)  # one lock order for every batch: no deadlocks
            scopes = self._enter(conn, actors, groups, now_ms)
            for actor_id in actors:
                state = self._run_actor(
                    conn, scopes.get(actor_id), actor_id, groups[actor_id], now_ms, alone, progress
                )
                if state is not None:
                    opened.append(state)
            if conn.raw.is_closed():
                raise _Lost("the connection to PostgreSQL was lost", ran=progress.ran)
            self._notify_cancels(conn, opened)
            progress.committing = True
            conn.commit()
        except _Lost:
            raise
        except _Discard:
            with contextlib.suppress(Exception):
                conn.rollback()  # the batch's only operation failed; its error is set
            if conn.raw.is_closed():
                raise _Lost("the connection to PostgreSQL was lost", ran=True) from None
            return []
        except BaseException as exc:
            if conn.raw.is_closed():
                raise _Lost(
                    str(exc) or "the connection was lost",
                    ran=progress.ran,
                    committing=progress.committing,
                ) from exc
            with contextlib.suppress(Exception):
                conn.rollback()
            error = self._wrap(exc)
            for request in batch:
                request.result, request.error = None, error
            if not isinstance(exc, Exception):
                raise
            return []
        return [Committed(state.actor_id, state.effects) for state in opened if state.requests]

    def _notify_cancels(self, conn: PgConnection, opened: list[_Done]) -> None:
        """Tell each process holding a claim of a cancel recorded here, in the transaction.

        PostgreSQL delivers a NOTIFY only if its transaction commits, so the receiver knows
        the cancel is recorded and aborts the attempt without re-reading the ledger.
        """
        by_owner: dict[str, list[tuple[str, int, str | None]]] = {}
        if self.cancel_notice is None:
            return
        for state in opened:
            for intent_event_id, owner, reason in state.effects.cancels or ():
                if owner is not None and owner != self.process_id:
                    by_owner.setdefault(owner, []).append((state.actor_id, intent_event_id, reason))
        if not by_owner:
            return
        assert self.cancel_notice is not None
        notices = [self.cancel_notice(owner, cancels) for owner, cancels in by_owner.items()]
        conn.execute(
            "SELECT pg_notify(c, p) FROM unnest(?::text[], ?::text[]) AS n(c, p)",
            ([channel for channel, _ in notices], [payload for _, payload in notices]),
        )

    def _run_actor(
        self,
        conn: PgConnection,
        scope: _Scope | None,
        actor_id: str,
        requests: list[_Request[Any]],
        now_ms: int,
        alone: bool,
        progress: _Progress,
    ) -> _Done | None:
        """Run one (locked) actor's operations, each in a (lazy) savepoint; ``scope`` is
        None if the actor has no ledger.

        ``alone``: this is the batch's only operation, so a failure rolls the whole
        transaction back instead.
        """
        if scope is None:
            for request in requests:
                request.error = LedgerNotFoundError(actor_id)
            if alone:
                raise _Discard
            return None
        conn.actor = actor_id
        state = _Done(actor_id, [], TxEffects())
        for request in requests:
            tx = LedgerTx(scope, now_ms, self.projections, self.key_retention_ms)
            if not alone:
                conn.execute("SAVEPOINT op")
            progress.ran = True
            due_known = scope.no_due_pending
            try:
                request.result = request.fn(tx)
                tx.flush_projections()
            except BaseException as exc:  # as on SQLite: the operation's error, not the pump's
                if conn.raw.is_closed():
                    raise
                request.result, request.error = None, self._wrap(exc)
                if alone:
                    raise _Discard from exc
                conn.execute("ROLLBACK TO op")
                scope.next_id = None
                scope.no_due_pending = due_known  # what the rolled-back writes changed
                continue
            if not alone:
                conn.execute("RELEASE op")
            state.requests.append(request)
            state.effects.merge(tx.effects)
        return state

    def _enter(
        self,
        conn: PgConnection,
        actors: list[str],
        groups: dict[str, list[_Request[Any]]],
        now_ms: int,
    ) -> dict[str, _Scope]:
        """Lock the batch's ``actors`` (sorted), creating those asked for, in one round
        trip: a scope per actor found.

        A writer's scope learns the next event id and whether any intent is pending and due
        (if none, an eager claim's fairness check needs no read); every scope holds the
        schedule rows its operations said they read (``_Request.reads``), read under the
        lock. A failure to lock (the lock timeout) fails the whole batch.
        """
        writers = [group_writes(groups[actor_id]) for actor_id in actors]
        creators = [any(r.create for r in groups[actor_id]) for actor_id in actors]
        read_actors: list[str] = []
        read_ids: list[int] = []
        for actor_id in actors:
            for request in groups[actor_id]:
                wanted = request.reads
                if wanted is None:
                    continue
                for intent_event_id in (wanted,) if isinstance(wanted, int) else wanted:
                    if 0 < intent_event_id <= _MAX_ID:
                        read_actors.append(actor_id)
                        read_ids.append(intent_event_id)
        scopes: dict[str, _Scope] = {}
        reads = (read_actors, read_ids)
        for row in conn.enter(actors, writers, creators, now_ms, reads, self.due_kinds):
            actor_id = row[0]
            if row[3] is None:
                scope = scopes[actor_id] = _Scope(actor_id, conn)
                if row[1] is not None:  # a writer's
                    scope.next_id = int(row[1]) + 1
                    scope.no_due_pending = row[2]
            elif actor_id in scopes:
                scopes[actor_id].rows[row[3]] = tuple(row)[3:]
        return scopes
