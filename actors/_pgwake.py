"""Wake-ups between processes sharing a PostgreSQL database: LISTEN/NOTIFY.

Each process listens on a channel of its own (its address in the registry) over a dedicated
connection, and sends the same messages the Unix-socket wake-ups carry (``_wakeup.Message``)
with ``pg_notify``. A message its sender marked verified (sent after, or inside, the transaction
it tells of) is believed; anything else is a hint whose receiver re-reads the ledger before
acting. Any role that may connect to the database can notify, read-only roles too, so the
database's CONNECT privilege must be kept to the application's own roles (docs/postgres.md).
When the connection drops, notifications sent meanwhile are lost, so after
reconnecting (and listening again) the process treats it as "everything may have changed":
its scheduler rescans and its waiters re-read.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from ledger import LedgerError, LedgerUnavailableError, ProcessInfo, _pg
from ledger._index import machine_id
from ledger._pg import close_connection, connect, redact
from triggers._streaks import worth_a_warning

from ._wakeup import Message, process_info

if TYPE_CHECKING:
    from collections.abc import Callable

    import asyncpg

_log = structlog.get_logger("actors")
_MAX_PAYLOAD = 7_900  # PostgreSQL refuses NOTIFY payloads of 8000 bytes and more
_PROBE_S = 1.0
_RETRY_FIRST_S = 0.05  # the wait after a failed reconnect, doubling up to _RETRY_MAX_S
_RETRY_MAX_S = 2.0
"""Seconds between liveness probes of an idle listening connection."""


def _channel(process_id: str) -> str:
    """The LISTEN channel of a process."""
    return f"dt_{process_id}"


class NotifyWakeup:
    """This process's wake-up endpoint on PostgreSQL."""

    def __init__(self, url: str, *, scheduler: bool) -> None:
        self.url = url
        self.process_id = uuid.uuid4().hex[:16]
        self.scheduler = scheduler
        self.machine = machine_id()
        self.address: str | None = _channel(self.process_id)
        self._conn: asyncpg.Connection | None = None
        self._outbox: list[tuple[str, str]] = []
        self._ready = anyio.Event()
        self._handle: Callable[[Message], Any] | None = None
        self._inbox: list[Message] = []
        self._closed = False

    def info(self, now_ms: int) -> ProcessInfo:
        """This process's registry row."""
        return process_info(self, now_ms)

    async def open(self) -> None:
        """Connect and listen, so peers' notifications reach us from now on.

        Raises:
            LedgerUnavailableError: the database cannot be reached.
        """
        self._conn = await self._listen()

    async def _listen(self) -> asyncpg.Connection:
        # A probe or a send the server leaves unanswered (a partition, a frozen server) ends
        # in a TimeoutError, as a cut connection ends in an OSError: the loop reconnects.
        conn = await connect(self.url, command_timeout=_pg._STATEMENT_TIMEOUT_S)
        assert self.address is not None
        try:
            await conn.add_listener(self.address, self._on_notify)
        except BaseException as exc:
            await close_connection(conn)  # cancelled or failed: the connection is nobody's
            if isinstance(exc, Exception):
                # As a refused connect: a plain LISTEN fails only when the server went away
                # meanwhile (asyncpg raises one of several errors, as the cut finds it).
                raise LedgerUnavailableError(redact(self.url), f"cannot listen: {exc!r}") from exc
            raise
        conn.add_termination_listener(self._on_terminated)
        return conn

    def _on_terminated(self, _conn: object) -> None:
        self._ready.set()  # the send loop looks at the connection at once

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            message = Message.decode(payload.encode())
        except (ValueError, TypeError, KeyError):
            _log.warning("wakeup_garbled", size=len(payload))
            return
        if self._handle is None:
            self._inbox.append(message)
        else:
            self._handle(message)

    def cancel_notice(
        self, owner: str, cancels: list[tuple[str, int, str | None]]
    ) -> tuple[str, str]:
        """The channel and payload telling process ``owner`` of cancels of its attempts, sent
        by the store in the committing transaction (so marked verified)."""
        message = Message(cancels=cancels, verified=True)
        return _channel(owner), message.encode(limit=_MAX_PAYLOAD).decode()

    def send(self, address: str, message: Message) -> bool:
        """Queue a notification for ``address``; sent by ``receive_forever``'s task."""
        if self._closed:
            return False
        self._outbox.append((address, message.encode(limit=_MAX_PAYLOAD).decode()))
        self._ready.set()
        return True

    async def receive_forever(self, handle: Callable[[Message], Any]) -> None:
        """Deliver notifications to ``handle`` and send queued ones, until cancelled; after a
        lost connection, reconnect, listen again and report ``everything`` changed."""
        self._handle = handle
        for message in self._inbox:
            handle(message)
        self._inbox.clear()
        while True:
            conn = self._conn
            if conn is None or conn.is_closed():
                conn = await self._reconnect()
                self._handle(Message(everything=True))
            try:
                await self._send_loop(conn)
            except (OSError, LedgerError) as exc:  # a TimeoutError too: no answer in time
                _log.warning("wakeup_connection_lost", error=str(exc) or repr(exc))
            except Exception as exc:
                if not conn.is_closed():
                    raise
                _log.warning("wakeup_connection_lost", error=str(exc))
            if not conn.is_closed():
                conn.terminate()  # given up: whatever it still waits for, nobody does
            self._conn = None

    async def _reconnect(self) -> asyncpg.Connection:
        """Connect and listen again, backing off up to 2 s between tries, for as long as it
        takes. An outage is logged without flooding the log: ``wakeup_reconnect_failed`` is
        a warning at the 1st, 2nd, 4th, 8th... failed try and a debug line at the others;
        ``wakeup_reconnected`` says how long it took."""
        delay = _RETRY_FIRST_S
        failures = 0
        started = time.monotonic()
        while True:
            try:
                self._conn = await self._listen()
            except (OSError, LedgerError) as exc:
                failures += 1
                log = _log.warning if worth_a_warning(failures) else _log.debug
                log("wakeup_reconnect_failed", error=str(exc), failures=failures)
                await anyio.sleep(delay)
                delay = min(_RETRY_MAX_S, delay * 2)
                continue
            if failures:
                seconds = round(time.monotonic() - started, 3)
                _log.info("wakeup_reconnected", failures=failures, seconds=seconds)
            return self._conn

    async def _send_loop(self, conn: asyncpg.Connection) -> None:
        while True:
            if not self._outbox:
                self._ready = anyio.Event()
                with anyio.move_on_after(_PROBE_S):
                    await self._ready.wait()
                if conn.is_closed():
                    return
                if not self._ready.is_set():
                    # Idle: a connection the server dropped may still look open until used.
                    await conn.execute("SELECT 1")
                continue
            batch, self._outbox = self._outbox, []
            try:
                await conn.executemany("SELECT pg_notify($1, $2)", batch)
            except BaseException:
                self._outbox[:0] = batch  # resent once the connection is back
                raise

    async def aclose(self) -> None:
        """Stop listening and close the connection."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            await close_connection(conn)

    def close(self) -> None:
        """Forget queued notifications (``aclose`` closes the connection)."""
        self._closed = True
        self._outbox.clear()
