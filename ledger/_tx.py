"""The ledger transaction: every read and write of one actor's ledger goes through it.

A ``LedgerTx`` lives for one operation inside a batch transaction (see ``_store.py``); it runs
on a ledger worker thread and never awaits. The trigger engine builds its claim, commit and
cancel logic from these primitives; user code sees them through ``triggers.Tx``.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ._errors import PayloadError, ProjectionError
from ._models import JSON, Event, IntentState, IntentStatus, Projection, make_event, ms_to_datetime

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence

MAX_PAYLOAD_BYTES = 1 << 20
"""Largest JSON text accepted for one event payload or stream chunk (1 MiB)."""

SELF = -1
"""Pass as ``intent_event_id`` to make an event point at itself (an intent event)."""

_ROW_COLUMNS = (
    "id, trigger_kind, status, due_at, created_at, attempts, redrives, redrive, claim_token, "
    "claimed_by, lease_until, cancel_requested_at, cancel_reason, cancel_requested_by, "
    "idempotency_key, finished_at, terminal_event_ids"
)


# Where a row is found by its id, its status is tested as ``status || ''``: the same test,
# in a form PostgreSQL cannot match to the predicates of its partial indexes (``status =
# 'pending'``, ``status = 'running'``). Intents are pending or running only briefly, so the
# statistics ANALYZE takes usually find none and those indexes look empty: given a plain
# ``status = 'pending'``, the planner may scan one whole rather than look the id up, which
# under a backlog costs milliseconds a row. (SQLite finds the row by its id either way.)
_PENDING = "status || '' = 'pending'"
_RUNNING = "status || '' = 'running'"

_CLAIM = (
    "UPDATE intents SET status = 'running', claim_token = ?, claimed_by = ?,"
    f" lease_until = ?, attempts = ? WHERE id = ? AND {_PENDING}"
)


class Cursor(Protocol):
    """What a statement returns: rows and the count of rows it changed."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """The part of ``sqlite3.Connection`` the ledger's statements use (``?`` parameters)."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> object: ...


class LedgerHandle(Protocol):
    """One actor's ledger inside an open transaction: a SQLite file or a PostgreSQL scope.

    ``next_id`` caches the next event id while a write transaction is open (writers of one
    actor are serialized); None when unknown. ``no_due_pending`` is what the open transaction
    knows of the actor's intents pending and due at its clock, for an eager claim's
    fairness (``LedgerTx.has_due_pending(from_lock=True)``): True, none; False, one may be;
    None, nothing is known (ask). A backend may learn it with its lock; a write that may
    make an intent due turns True into False, and a rolled-back operation puts back what
    was known before it.

    ``rows`` holds schedule rows (all columns, by intent id) that a backend read with the
    actor's lock for the operations it was asked about (``Store.run(reads=)``). An entry is
    current until the transaction writes that intent: ``LedgerTx`` takes it out on its first
    read, and forgets it on every write of the intent (of all of them on a write of many).
    """

    actor_id: str
    next_id: int | None
    no_due_pending: bool | None
    rows: dict[int, tuple[Any, ...]]

    @property
    def conn(self) -> Connection: ...

    def write(self, sql: str, parameters: Sequence[Any], /) -> None:
        """Run a write whose result nobody reads. A backend may hold it back and send it
        with the next statement that reads this actor, or with COMMIT; its effects are
        visible to every later statement of the transaction either way."""

    def integrity_check(self) -> list[str]: ...


_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode
"""Compact JSON text (``json.dumps`` with these options builds a new encoder per call)."""


def dump_json(value: JSON, *, what: str = "payload") -> str:
    """Serialize ``value`` to compact JSON, refusing NaN/Infinity and oversized values.

    Raises:
        PayloadError: the value is not JSON-serializable, holds NaN or Infinity, is nested
            too deeply, holds text that is not valid Unicode (a lone surrogate, as from an
            undecodable file name), or its JSON text exceeds ``MAX_PAYLOAD_BYTES``.
    """
    try:
        _check_shape(value)
        text = _encode(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise PayloadError(f"{what} is not storable as JSON: {exc}") from None
    if text.isascii():
        size = len(text)
    else:
        try:
            size = len(text.encode())
        except UnicodeEncodeError as exc:
            raise PayloadError(f"{what} is not storable as JSON: {_invalid(exc)}") from None
    if size > MAX_PAYLOAD_BYTES:
        raise PayloadError(f"{what} is larger than {MAX_PAYLOAD_BYTES} bytes of JSON")
    return text


def _invalid(exc: UnicodeEncodeError) -> str:
    """What is wrong with text that UTF-8 cannot encode."""
    char = exc.object[exc.start]
    return f"it holds {char!r}, a lone surrogate, which is not valid Unicode"


MAX_DEPTH = 256
"""Deepest nesting of arrays and objects accepted in a payload."""


def _check_shape(value: object) -> None:
    """Refuse nesting deeper than ``MAX_DEPTH``, and object keys that JSON would quietly turn
    into strings (``{1: x}`` would come back as ``{"1": x}``, so a replay would see another
    payload than the first run)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    raise TypeError(f"object keys must be str, not {type(key).__name__}")
                if isinstance(child, dict | list | tuple):
                    stack.append((child, depth + 1))
        elif isinstance(item, list | tuple):
            stack.extend((c, depth + 1) for c in item if isinstance(c, dict | list | tuple))


def check_text(value: str | None, what: str) -> None:
    """Refuse text a column cannot hold on every backend (PostgreSQL's text has no NUL;
    neither backend stores a lone surrogate).

    Raises:
        PayloadError: ``value`` holds a NUL character or a lone surrogate.
    """
    if value is None:
        return
    if "\x00" in value:
        raise PayloadError(f"{what} must not contain NUL characters")
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError as exc:
            raise PayloadError(f"{what} must be valid Unicode: {_invalid(exc)}") from None


MAX_ID = (1 << 63) - 1
"""The largest event id (SQLite's and PostgreSQL's 64-bit signed integer)."""


def check_position(value: object, name: str, *, optional: bool = False) -> None:
    """``after``, ``limit``, ``start`` of a read: ints from 0 to 2**63 - 1 (or None if
    ``optional``).

    Raises:
        TypeError: ``value`` is not an int (a bool is not one here).
        ValueError: ``value`` is out of that range.
    """
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= MAX_ID:
        raise ValueError(f"{name} must be between 0 and 2**63 - 1, not {value}")


def check_event_id(intent_event_id: object) -> bool:
    """Refuse a non-int id; True if it can name an event (0 to 2**63 - 1), False for an int
    no event can have (the caller answers "not found" without asking the ledger).

    Raises:
        TypeError: ``intent_event_id`` is not an int.
    """
    if isinstance(intent_event_id, bool) or not isinstance(intent_event_id, int):
        raise TypeError(f"intent_event_id must be an int, not {type(intent_event_id).__name__}")
    return 0 <= intent_event_id <= MAX_ID


def check_events_query(
    after: object, kinds: Iterable[str] | None, intent_event_id: object, limit: object
) -> tuple[list[str] | None, bool]:
    """The arguments of an events read, checked: ``kinds`` as a list (or None), and False if
    ``intent_event_id`` is an int no event can have (the read then finds nothing).

    Raises:
        TypeError, ValueError: ``after``, ``limit`` or ``intent_event_id`` is not an int from
            0 to 2**63 - 1, or ``kinds`` is a single str or holds something other than a str
            without NUL.
    """
    kind_list = check_kinds(kinds)
    check_position(after, "after")
    check_position(limit, "limit", optional=True)
    findable = intent_event_id is None or check_event_id(intent_event_id)
    return kind_list, findable


def check_kinds(kinds: Iterable[str] | None) -> list[str] | None:
    """``kinds`` (event kinds to filter by) as a list, or None for every kind.

    Raises:
        TypeError: ``kinds`` is a single str (it would read as one-letter kinds) or bytes,
            or holds something other than a str.
        PayloadError: a kind holds a NUL character or a lone surrogate.
    """
    if kinds is None:
        return None
    if isinstance(kinds, str):
        raise TypeError(f"kinds must be a list of str, not a single str: kinds=[{kinds!r}]")
    if isinstance(kinds, bytes):
        raise TypeError("kinds must be a list of str, not bytes")
    kind_list = list(kinds)
    for kind in kind_list:
        if not isinstance(kind, str):
            raise TypeError(f"kinds must be str, not {kind!r}")
        check_text(kind, "an event kind")  # no event can have it
    return kind_list


_IMMUTABLE = frozenset({str, int, float, bool})
"""Payload types an event may share with the caller: a read gives back an equal value."""


def _stored(payload: JSON, text: str) -> JSON:
    """The payload as a read gives it back (lists, not tuples), not the caller's object,
    which the caller may change afterwards: a copy of a flat object, else ``text`` decoded.
    (Its keys are str: ``dump_json`` refused any other.)"""
    if type(payload) is not dict:
        return _load(text)
    for value in payload.values():
        if value is not None and type(value) not in _IMMUTABLE:
            return _load(text)
    return dict(payload)


def _load(text: str) -> JSON:
    return json.loads(text)


@dataclass(frozen=True, slots=True)
class NewClaim:
    """A claim taken by the operation that records the intent (``append_intent(claim=)``):
    the schedule row is written running, never pending."""

    token: str
    host_id: str
    lease_until: int

    def row(
        self, intent_event_id: int, trigger_kind: str, due_at: int, created_at: int,
        idempotency_key: str | None,
    ) -> IntentRow:  # fmt: skip
        """The schedule row ``append_intent`` writes for this claim (the same arguments)."""
        return IntentRow(
            id=intent_event_id,
            trigger_kind=trigger_kind,
            status="running",
            due_at=due_at,
            created_at=created_at,
            attempts=1,
            redrives=0,
            redrive=0,
            claim_token=self.token,
            claimed_by=self.host_id,
            lease_until=self.lease_until,
            cancel_requested_at=None,
            cancel_reason=None,
            cancel_requested_by=None,
            idempotency_key=idempotency_key,
            finished_at=None,
            terminal_event_ids=None,
        )


@dataclass(slots=True)
class IntentRow:
    """A schedule row as the engine sees it (all columns)."""

    id: int
    trigger_kind: str
    status: str
    due_at: int
    created_at: int
    attempts: int
    redrives: int
    redrive: int
    claim_token: str | None
    claimed_by: str | None
    lease_until: int | None
    cancel_requested_at: int | None
    cancel_reason: str | None
    cancel_requested_by: str | None
    idempotency_key: str | None
    finished_at: int | None
    terminal_event_ids: str | None

    def state(self) -> IntentState:
        """The public, frozen view of this row."""
        ids = tuple(json.loads(self.terminal_event_ids)) if self.terminal_event_ids else ()
        return IntentState(
            intent_event_id=self.id,
            trigger_kind=self.trigger_kind,
            status=IntentStatus(self.status),
            attempts=self.attempts,
            redrives=self.redrives,
            due_at=ms_to_datetime(self.due_at),
            created_at=ms_to_datetime(self.created_at),
            finished_at=None if self.finished_at is None else ms_to_datetime(self.finished_at),
            cancel_requested_at=(
                None
                if self.cancel_requested_at is None
                else ms_to_datetime(self.cancel_requested_at)
            ),
            cancel_reason=self.cancel_reason,
            cancel_requested_by=self.cancel_requested_by,
            terminal_event_ids=ids,
            idempotency_key=self.idempotency_key,
        )


@dataclass(slots=True)
class TxEffects:
    """What a committed operation changed, for wake-ups and the due-time index."""

    events: bool = False
    new_due: int | None = None
    due_may_rise: bool = False
    cancels: list[tuple[int, str | None, str | None]] | None = None
    """``(intent_event_id, owner process, reason)`` of cancel requests to deliver."""
    chunks: bool = False
    terminal: bool = False
    notices: list[tuple[str, JSON]] | None = None
    """``(topic, data)`` announced to followers in every process once committed."""

    def merge(self, other: TxEffects) -> None:
        """Fold another operation's effects into these."""
        self.events |= other.events
        self.chunks |= other.chunks
        self.terminal |= other.terminal
        self.due_may_rise |= other.due_may_rise
        if other.new_due is not None and (self.new_due is None or other.new_due < self.new_due):
            self.new_due = other.new_due
        if other.cancels:
            self.cancels = (self.cancels or []) + other.cancels
        if other.notices:
            self.notices = (self.notices or []) + other.notices


class LedgerTx:
    """Reads and writes of one actor's ledger within one operation of a batch transaction.

    Attributes:
        actor_id: the actor whose ledger this is.
        now_ms: the transaction's clock reading, epoch milliseconds.
        effects: what this operation changed (read by the store after commit).
    """

    __slots__ = ("_file", "_pending_events", "_projections", "actor_id", "effects",
                 "key_retention_ms", "now_ms")  # fmt: skip

    def __init__(
        self,
        file: LedgerHandle,
        now_ms: int,
        projections: Sequence[Projection[Any]],
        key_retention_ms: int = 0,
    ) -> None:
        self._file = file
        self._projections = projections
        self._pending_events: list[Event] = []
        self.actor_id = file.actor_id
        self.now_ms = now_ms
        self.key_retention_ms = key_retention_ms
        self.effects = TxEffects()

    # -- events ---------------------------------------------------------------------------

    def insert_event(
        self,
        kind: str,
        payload: JSON,
        intent_event_id: int | None = None,
        *,
        text: str | None = None,
    ) -> Event:
        """Append one event and return it with its id; its payload is the stored JSON, as a
        read returns it (a fresh value: changing ``payload`` afterwards does not change it).

        Args:
            kind: the event kind.
            payload: a JSON value.
            intent_event_id: the intent the fact belongs to, if any.
            text: ``payload`` already serialized with ``dump_json`` (skips re-serializing).

        Raises:
            PayloadError: the payload cannot be stored as JSON.
        """
        if not isinstance(kind, str) or not kind:
            raise ValueError("event kind must be a non-empty str")
        check_text(kind, "event kind")
        if text is None:
            text = dump_json(payload)
        file = self._file
        event_id = file.next_id
        if event_id is None:
            event_id = self.last_event_id() + 1
        if intent_event_id == SELF:
            intent_event_id = event_id
        file.write(
            "INSERT INTO events (id, ts, kind, payload, intent_event_id) VALUES (?, ?, ?, ?, ?)",
            (event_id, self.now_ms, kind, text, intent_event_id),
        )
        file.next_id = event_id + 1
        if payload is not None and type(payload) not in _IMMUTABLE:
            payload = _stored(payload, text)
        event = make_event(event_id, self.now_ms, kind, payload, intent_event_id)
        self.effects.events = True
        if self._projections:
            self._pending_events.append(event)
        return event

    def events(
        self,
        *,
        after: int = 0,
        kinds: Iterable[str] | None = None,
        intent_event_id: int | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        """Events with ``id > after`` in id order, optionally filtered by kinds and intent."""
        sql = "SELECT id, ts, kind, payload, intent_event_id FROM events WHERE id > ?"
        params: list[Any] = [after]
        if intent_event_id is not None:
            sql += " AND intent_event_id = ?"
            params.append(intent_event_id)
        kind_list = check_kinds(kinds)
        if kind_list is not None:
            if not kind_list:
                return []
            sql += f" AND kind IN ({','.join('?' * len(kind_list))})"
            params.extend(kind_list)
        sql += " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [
            make_event(row[0], row[1], row[2], _load(row[3]), row[4])
            for row in self._file.conn.execute(sql, params)
        ]

    def last_event_id(self) -> int:
        """The highest event id, 0 for an empty ledger."""
        row = self._file.conn.execute("SELECT max(id) FROM events").fetchone()
        return int(row[0] or 0)

    # -- intents --------------------------------------------------------------------------

    def append_intent(
        self,
        *,
        trigger_kind: str,
        intent_event_kind: str,
        payload: JSON,
        due_at: int,
        idempotency_key: str | None = None,
        key_retention_ms: int | None = None,
        text: str | None = None,
        claim: NewClaim | None = None,
    ) -> tuple[Event, bool]:
        """Record an intent event and its schedule row (``pending`` at ``due_at``).

        With an ``idempotency_key``, an existing intent holding that key is returned instead
        while it is live or ended less than ``key_retention_ms`` ago (by default this
        transaction's ``key_retention_ms``, its store's); if that intent is of another
        trigger kind, ``ValueError`` is raised (nothing is written).

        With ``claim``, a new intent is claimed as it is recorded: its row is written
        ``running`` (``claim.row(...)``), as ``claim_due`` would leave it, with one write
        instead of two. The caller must know that the intent is due and may go first.

        Returns:
            ``(intent_event, created)``.
        """
        check_text(idempotency_key, "idempotency_key")
        check_text(trigger_kind, "trigger kind")
        if idempotency_key is not None:
            existing = self._file.conn.execute(
                "SELECT id, trigger_kind, finished_at FROM intents WHERE idempotency_key = ?",
                (idempotency_key,),
            ).fetchone()
            if existing is not None:
                intent_id, held_by, finished_at = existing
                if key_retention_ms is None:
                    key_retention_ms = self.key_retention_ms
                if finished_at is None or finished_at + key_retention_ms > self.now_ms:
                    if held_by != trigger_kind:
                        raise ValueError(
                            f"idempotency key {idempotency_key!r} is held by intent {intent_id}"
                            f" of trigger {held_by!r}, not of {trigger_kind!r}"
                        )
                    events = self.events(after=intent_id - 1, limit=1)
                    return events[0], False
                self._file.write(
                    "UPDATE intents SET idempotency_key = NULL WHERE id = ?", (intent_id,)
                )
                self._forget(intent_id)
        event = self.insert_event(intent_event_kind, payload, SELF, text=text)
        if claim is None:
            self._file.write(
                "INSERT INTO intents (id, trigger_kind, status, due_at, created_at,"
                " idempotency_key) VALUES (?, ?, 'pending', ?, ?, ?)",
                (event.id, trigger_kind, due_at, self.now_ms, idempotency_key),
            )
            self._note_due(due_at)
        else:
            self._file.write(
                "INSERT INTO intents (id, trigger_kind, status, due_at, created_at,"
                " idempotency_key, attempts, claim_token, claimed_by, lease_until)"
                " VALUES (?, ?, 'running', ?, ?, ?, 1, ?, ?, ?)",
                (event.id, trigger_kind, due_at, self.now_ms, idempotency_key, claim.token,
                 claim.host_id, claim.lease_until),
            )  # fmt: skip
            self.effects.due_may_rise = True
        return event, True

    def intent_row(self, intent_event_id: int) -> IntentRow | None:
        """The schedule row of one intent, or None."""
        rows = self._file.rows
        if rows:
            row = rows.pop(intent_event_id, None)
            if row is not None:
                return IntentRow(*row)
        row = self._file.conn.execute(
            f"SELECT {_ROW_COLUMNS} FROM intents WHERE id = ?", (intent_event_id,)
        ).fetchone()
        return None if row is None else IntentRow(*row)

    def intent_row_by_key(self, idempotency_key: str) -> IntentRow | None:
        """The schedule row that holds an idempotency key, or None."""
        row = self._file.conn.execute(
            f"SELECT {_ROW_COLUMNS} FROM intents WHERE idempotency_key = ?", (idempotency_key,)
        ).fetchone()
        return None if row is None else IntentRow(*row)

    def intent_rows(
        self, *, status: str | None = None, after: int = 0, limit: int | None = None
    ) -> list[IntentRow]:
        """Schedule rows in id order, optionally only those in ``status``."""
        sql = f"SELECT {_ROW_COLUMNS} FROM intents WHERE id > ?"
        params: list[Any] = [after]
        if status is not None:
            sql += " AND status = ?"
            params.append(status)
        sql += " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [IntentRow(*row) for row in self._file.conn.execute(sql, params)]

    def claim_due(
        self,
        *,
        limit: int,
        host_id: str,
        lease_until: int,
        tokens: Iterable[str],
        kinds: Sequence[str],
    ) -> list[IntentRow]:
        """Move up to ``limit`` due pending intents of ``kinds`` to ``running``, each under a
        fresh claim token."""
        conn = self._file.conn
        rows = conn.execute(
            f"SELECT {_ROW_COLUMNS} FROM intents WHERE status = 'pending' AND due_at <= ?"
            f" AND trigger_kind IN ({','.join('?' * len(kinds))}) ORDER BY due_at, id LIMIT ?",
            (self.now_ms, *kinds, limit),
        ).fetchall()
        claimed: list[IntentRow] = []
        token_iter = iter(tokens)
        for raw in rows:
            row = IntentRow(*raw)
            row.status = "running"
            row.claim_token = next(token_iter)
            row.claimed_by = host_id
            row.lease_until = lease_until
            row.attempts += 1
            self._file.write(_CLAIM, (row.claim_token, host_id, lease_until, row.attempts, row.id))
            self._forget(row.id)
            claimed.append(row)
        if claimed:
            self.effects.due_may_rise = True
        return claimed

    def reclaim(self, row: IntentRow, *, token: str, host_id: str, lease_until: int) -> IntentRow:
        """Take over a running intent whose claim was lost, as a redrive (new token)."""
        self._file.write(
            "UPDATE intents SET claim_token = ?, claimed_by = ?, lease_until = ?,"
            " redrives = redrives + 1, redrive = 1 WHERE id = ? AND claim_token = ?",
            (token, host_id, lease_until, row.id, row.claim_token),
        )
        self._forget(row.id)
        row.claim_token, row.claimed_by, row.lease_until = token, host_id, lease_until
        row.redrives += 1
        row.redrive = 1
        self.effects.due_may_rise = True
        return row

    def has_due_pending(self, kinds: Sequence[str], *, from_lock: bool = False) -> bool:
        """True if an intent of ``kinds`` is pending and due now.

        With ``from_lock``, the answer may come from what the actor's lock learned
        (``no_due_pending``) without a read: ``kinds`` must then be the kinds the lock
        looked for (the host's, see ``PostgresStore(due_kinds=)``). It may say True where a
        read would say False: a due intent the lock saw may have been claimed by an earlier
        operation of the transaction since, and a write that makes an intent due counts
        whatever its kind. Good enough for an eager claim's fairness (the intent is then
        claimed by the scheduler), not for deciding whether due work is left.
        """
        known = self._file.no_due_pending
        if from_lock and known is not None:
            return not known
        row = self._file.conn.execute(
            "SELECT 1 FROM intents WHERE status = 'pending' AND due_at <= ?"
            f" AND trigger_kind IN ({','.join('?' * len(kinds))}) LIMIT 1",
            (self.now_ms, *kinds),
        ).fetchone()
        return row is not None

    def next_pending_due(self, kinds: Sequence[str]) -> int | None:
        """The earliest due time of a pending intent of ``kinds`` (None if there is none)."""
        row = self._file.conn.execute(
            "SELECT min(due_at) FROM intents WHERE status = 'pending'"
            f" AND trigger_kind IN ({','.join('?' * len(kinds))})",
            tuple(kinds),
        ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def lost_claims(self, dead_owners: Iterable[str]) -> list[IntentRow]:
        """Running intents whose lease has run out or whose owner process is gone."""
        conn = self._file.conn
        rows = conn.execute(
            f"SELECT {_ROW_COLUMNS} FROM intents WHERE status = 'running' AND lease_until <= ?"
            " ORDER BY lease_until",
            (self.now_ms,),
        ).fetchall()
        dead = list(dead_owners)
        if dead:
            seen = {row[0] for row in rows}
            rows += [
                row
                for row in conn.execute(
                    f"SELECT {_ROW_COLUMNS} FROM intents WHERE status = 'running'"
                    f" AND claimed_by IN ({','.join('?' * len(dead))})",
                    dead,
                )
                if row[0] not in seen
            ]
        return [IntentRow(*row) for row in rows]

    def intent_payloads(self, ids: Sequence[int]) -> dict[int, JSON]:
        """The payloads of the given intent events."""
        if not ids:
            return {}
        rows = self._file.conn.execute(
            f"SELECT id, payload FROM events WHERE id IN ({','.join('?' * len(ids))})", ids
        )
        return {row[0]: _load(row[1]) for row in rows}

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """Run a block whose writes are rolled back if it raises (the error propagates).

        The projections take the operation's new events before the block ends, so a
        ``ProjectionError`` is the block's error.
        """
        conn = self._file.conn
        conn.execute("SAVEPOINT nested")
        pending = len(self._pending_events)
        due_known = self._file.no_due_pending
        # What others are told must have committed: a rolled-back block's cancels and notices
        # go with it (the other effects are hints, harmless when spurious).
        cancels = len(self.effects.cancels or ())
        notices = len(self.effects.notices or ())
        try:
            yield
            # The block's events reach the projections inside it: a projection that cannot
            # take them fails the block, and its writes roll back.
            self.flush_projections()
        except BaseException:
            self._file.next_id = None
            self._file.no_due_pending = due_known
            del self._pending_events[pending:]
            if self.effects.cancels:
                del self.effects.cancels[cancels:]
            if self.effects.notices:
                del self.effects.notices[notices:]
            if getattr(conn, "in_transaction", True):  # SQLite may have ended it (disk full)
                conn.execute("ROLLBACK TO nested")
                conn.execute("RELEASE nested")
            raise
        conn.execute("RELEASE nested")

    def holds_claim(self, intent_event_id: int, token: str) -> bool:
        """True while the intent is running under ``token``."""
        row = self._file.conn.execute(
            f"SELECT 1 FROM intents WHERE id = ? AND {_RUNNING} AND claim_token = ?",
            (intent_event_id, token),
        ).fetchone()
        return row is not None

    def release(
        self,
        intent_event_id: int,
        token: str,
        *,
        due_at: int,
        count_attempt: bool,
        redrive: bool,
    ) -> bool:
        """Return a running intent to ``pending`` at ``due_at`` (a retry or a redrive).

        ``count_attempt=False`` gives the attempt back (shutdown, lost claim).

        Returns:
            False if ``token`` no longer holds the claim (nothing written).
        """
        cur = self._file.conn.execute(
            "UPDATE intents SET status = 'pending', due_at = ?, claim_token = NULL,"
            " claimed_by = NULL, lease_until = NULL, attempts = attempts - ?, redrive = ?"
            f" WHERE id = ? AND {_RUNNING} AND claim_token = ?",
            (due_at, 0 if count_attempt else 1, int(redrive), intent_event_id, token),
        )
        self._forget(intent_event_id)
        if cur.rowcount != 1:
            return False
        self._note_due(due_at)
        return True

    def reschedule(self, intent_event_id: int, due_at: int) -> None:
        """Put an intent (running in this transaction) back to ``pending`` at ``due_at``.

        Used by a commit that wants its intent to run again later; attempts and redrives
        start afresh (an attempt committed: the redrive bound is for a run of lost attempts,
        not for a long-lived intent's whole life). A cancel request stays: the intent is
        still the one that was asked to stop, so its next attempt starts with its signal
        aborted.
        """
        self._file.write(
            "UPDATE intents SET status = 'pending', due_at = ?, claim_token = NULL,"
            " claimed_by = NULL, lease_until = NULL, attempts = 0, redrives = 0, redrive = 0"
            " WHERE id = ?",
            (due_at, intent_event_id),
        )
        self._forget(intent_event_id)
        self._note_due(due_at)

    def wake(self, intent_event_id: int, due_at: int) -> bool:
        """Bring a pending intent's due time forward to ``due_at`` (never later).

        Returns:
            True if the intent was pending and is now due by ``due_at``.
        """
        cur = self._file.conn.execute(
            "UPDATE intents SET due_at = CASE WHEN due_at < ? THEN due_at ELSE ? END"
            f" WHERE id = ? AND {_PENDING}",
            (due_at, due_at, intent_event_id),
        )
        self._forget(intent_event_id)
        if cur.rowcount != 1:
            return False
        self._note_due(due_at)
        return True

    def finish(self, intent_event_id: int, status: IntentStatus, event_ids: Sequence[int]) -> None:
        """Move an intent to a terminal status, naming the facts that settled it."""
        self._file.write(
            "UPDATE intents SET status = ?, finished_at = ?, terminal_event_ids = ?,"
            " claim_token = NULL, lease_until = NULL WHERE id = ?",
            (status.value, self.now_ms, _encode(list(event_ids)), intent_event_id),
        )
        self._forget(intent_event_id)
        self.effects.due_may_rise = True
        self.effects.terminal = True

    def request_cancel(
        self,
        intent_event_id: int,
        *,
        reason: str | None,
        requested_by: str | None,
        row: IntentRow | None = None,
    ) -> bool:
        """Record a cancel request on an intent (first reason wins).

        Args:
            row: the intent's row as read in this operation, if the caller holds it: it is
                brought up to date in place, with no need to read it again.

        Returns:
            True if this call recorded the request, False if one was already recorded.
        """
        check_text(reason, "cancel reason")
        check_text(requested_by, "requested_by")
        cur = self._file.conn.execute(
            "UPDATE intents SET cancel_requested_at = ?, cancel_reason = ?,"
            " cancel_requested_by = ? WHERE id = ? AND cancel_requested_at IS NULL",
            (self.now_ms, reason, requested_by, intent_event_id),
        )
        self._forget(intent_event_id)
        first = cur.rowcount == 1
        if first and row is not None:
            row.cancel_requested_at = self.now_ms
            row.cancel_reason = reason
            row.cancel_requested_by = requested_by
        return first

    def note_cancel(self, intent_event_id: int, claimed_by: str | None, reason: str | None) -> None:
        """Ask the store to deliver a cancel wake-up to the process holding the claim."""
        entry = (intent_event_id, claimed_by, reason)
        self.effects.cancels = [*(self.effects.cancels or []), entry]

    def announce(self, topic: str, data: JSON) -> None:
        """Tell followers of ``topic`` in every process, once this transaction commits.

        A notice is delivered after the commit, to subscribers in this process at once and to
        other processes by their wake-up, which vouches for the sender; nothing is delivered
        if the transaction (or the savepoint around this call) rolls back. Delivery is
        best-effort: a follower must still read the ledger when it learns that the actor
        changed, and use notices only to learn sooner.
        """
        check_text(topic, "notice topic")
        dump_json(data)  # refuse what could not travel
        self.effects.notices = [*(self.effects.notices or []), (topic, data)]

    def renew_leases(self, host_id: str, lease_until: int, tokens: Iterable[str]) -> int:
        """Extend the leases of this host's claims with the given tokens."""
        conn = self._file.conn
        self._file.rows.clear()
        count = 0
        for token in tokens:
            count += conn.execute(
                "UPDATE intents SET lease_until = ? WHERE claim_token = ? AND claimed_by = ?"
                " AND status = 'running'",
                (lease_until, token, host_id),
            ).rowcount
        return count

    def next_due(self) -> int | None:
        """The earliest time this actor needs the scheduler: a due intent or a lease end."""
        row = self._file.conn.execute(
            "SELECT min(t) FROM ("
            " SELECT min(due_at) AS t FROM intents WHERE status = 'pending'"
            " UNION ALL SELECT min(lease_until) FROM intents WHERE status = 'running') AS due"
        ).fetchone()
        return None if row[0] is None else int(row[0])

    def _forget(self, intent_event_id: int) -> None:
        """This transaction writes the intent: a row read with the lock is no longer current."""
        rows = self._file.rows
        if rows:
            rows.pop(intent_event_id, None)

    def _note_due(self, due_at: int) -> None:
        if due_at <= self.now_ms and self._file.no_due_pending:
            self._file.no_due_pending = False
        current = self.effects.new_due
        if current is None or due_at < current:
            self.effects.new_due = due_at

    # -- streams --------------------------------------------------------------------------

    def stream_append(self, intent_event_id: int, texts: Sequence[str]) -> int:
        """Append serialized chunks to an intent's stream; returns the next free index."""
        conn = self._file.conn
        row = conn.execute(
            "SELECT max(seq) FROM stream_chunks WHERE intent_event_id = ?", (intent_event_id,)
        ).fetchone()
        seq = -1 if row[0] is None else int(row[0])
        conn.executemany(
            "INSERT INTO stream_chunks (intent_event_id, seq, data) VALUES (?, ?, ?)",
            [(intent_event_id, seq + 1 + i, text) for i, text in enumerate(texts)],
        )
        self.effects.chunks = True
        return seq + 1 + len(texts)

    def stream_read(self, intent_event_id: int, start: int, limit: int) -> list[JSON]:
        """Chunks ``start``, ``start + 1``, ... of an intent's stream."""
        return [
            _load(row[0])
            for row in self._file.conn.execute(
                "SELECT data FROM stream_chunks WHERE intent_event_id = ? AND seq >= ?"
                " ORDER BY seq LIMIT ?",
                (intent_event_id, start, limit),
            )
        ]

    # -- projections ----------------------------------------------------------------------

    def projection(self, name: str) -> JSON:
        """The current state of a registered projection (caught up to the last event)."""
        state, _ = self._fold(self._find_projection(name), before=None)
        return state

    def rebuild_projection(self, name: str) -> JSON:
        """Recompute a projection from all events and store it."""
        projection = self._find_projection(name)
        self._file.write("DELETE FROM projections WHERE name = ?", (name,))
        state, last = self._fold(projection, before=None)
        self._store_projection(name, state, last)
        return state

    def flush_projections(self) -> None:
        """Fold this operation's new events into every projection (same transaction).

        Raises:
            ProjectionError: a projection's ``apply`` raised, or its state is not JSON.
                Nothing was stored; the events stay pending.
        """
        events = self._pending_events
        if not events:
            return
        states: list[tuple[str, str]] = []
        for projection in self._projections:
            state, _ = self._fold(projection, before=events[0].id)
            for event in events:
                state = _apply(projection, state, event)
            try:
                text = dump_json(state, what=f"projection {projection.name!r} state")
            except PayloadError as exc:
                last = events[-1]
                raise ProjectionError(projection.name, last.kind, last.id, str(exc)) from exc
            states.append((projection.name, text))
        for name, text in states:
            self._store_projection_text(name, text, events[-1].id)
        self._pending_events = []

    def discard_pending_events(self) -> None:
        """Leave this operation's new events out of the projections for now (after a
        ``ProjectionError``): the next fold of each projection takes them up again."""
        self._pending_events = []

    # -- named values ---------------------------------------------------------------------

    def value(self, name: str) -> JSON:
        """A named value the framework keeps in this ledger (None if unset).

        Named values share the projections table: their names must not be a registered
        projection's (the framework's start with ``trigger.``).
        """
        row = self._file.conn.execute(
            "SELECT state FROM projections WHERE name = ?", (name,)
        ).fetchone()
        return None if row is None else _load(row[0])

    def set_value(self, name: str, value: JSON) -> None:
        """Set a named value (see ``value``), in this transaction; None deletes it."""
        if value is None:
            self._file.write("DELETE FROM projections WHERE name = ?", (name,))
        else:
            self._store_projection(name, value, 0)

    def _find_projection(self, name: str) -> Projection[Any]:
        for projection in self._projections:
            if projection.name == name:
                return projection
        raise KeyError(name)

    def _fold(self, projection: Projection[Any], *, before: int | None) -> tuple[Any, int]:
        """The stored state, caught up with events it has not seen (ids below ``before``).

        A writer that does not know this projection (an older process, a client with another
        spec) may have appended events; they are folded in here, so the state never lags.
        """
        row = self._file.conn.execute(
            "SELECT state, last_event_id FROM projections WHERE name = ?", (projection.name,)
        ).fetchone()
        state: Any = projection.initial_state() if row is None else _load(row[0])
        last = 0 if row is None else int(row[1])
        while before is None or last < before - 1:
            missing = self.events(after=last, limit=1000)
            if before is not None:
                missing = [e for e in missing if e.id < before]
            if not missing:
                break
            for event in missing:
                state = _apply(projection, state, event)
            last = missing[-1].id
        return state, last

    def _store_projection(self, name: str, state: Any, last: int) -> None:
        self._store_projection_text(name, dump_json(state, what=f"projection {name!r} state"), last)

    def _store_projection_text(self, name: str, text: str, last: int) -> None:
        conn = self._file.conn
        updated = conn.execute(
            "UPDATE projections SET state = ?, last_event_id = ? WHERE name = ?",
            (text, last, name),
        ).rowcount
        if not updated:
            conn.execute(
                "INSERT INTO projections (name, state, last_event_id) VALUES (?, ?, ?)",
                (name, text, last),
            )

    def integrity_check(self) -> list[str]:
        """``PRAGMA integrity_check`` of this ledger file."""
        return self._file.integrity_check()


def _apply(projection: Projection[Any], state: Any, event: Event) -> Any:
    """``projection.apply(state, event)``; its error as a ``ProjectionError`` naming both."""
    try:
        return projection.apply(state, event)
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
        raise ProjectionError(projection.name, event.kind, event.id, message) from exc
