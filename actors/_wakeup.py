"""Direct wake-ups between processes sharing a data directory.

Every process (host or client) registers itself in ``index.db`` with the address of a Unix
datagram socket (Linux abstract namespace: no file, no path length limit, gone with the
process). After each commit batch a process sends one small datagram to each process that
should know: cancel requests go to the process holding the claim, new due work to the
schedulers, "this actor changed" to everyone (for tails, streams and waits).

A datagram is sent only after its transaction committed, but the socket is reachable by any
process on the machine, so it is trusted only when the kernel vouches that its sender runs as
the same user as the receiver (``SO_PASSCRED``): a user who could forge it could write the ledger
files anyway. Any other datagram is a hint whose receiver re-reads the ledger before acting. A
lost datagram only costs latency, because every consumer also polls slowly as a fallback.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import sys
import threading
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import structlog

from ledger import JSON, ProcessInfo
from ledger._index import machine_id, process_alive, process_started

if TYPE_CHECKING:
    from collections.abc import Callable

_log = structlog.get_logger("actors")
_MAX_DATAGRAM = 60_000
SUPPORTED = sys.platform.startswith("linux")
_UCRED = struct.Struct("iII")
"""``struct ucred``: pid, uid, gid."""
_CREDENTIALS_SPACE = socket.CMSG_SPACE(_UCRED.size) if SUPPORTED else 0


def sender_uid(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    """The sender's uid from a datagram's ``SCM_CREDENTIALS``, or None if it has none."""
    for level, kind, data in ancillary:
        if (
            level == socket.SOL_SOCKET
            and kind == socket.SCM_CREDENTIALS
            and len(data) >= _UCRED.size
        ):
            return int(_UCRED.unpack_from(data)[1])
    return None


@dataclass(slots=True)
class Message:
    """One wake-up: what changed, batched per destination."""

    due: list[tuple[str, int]] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    cancels: list[tuple[str, int, str | None]] = field(default_factory=list)
    notices: list[tuple[str, str, JSON]] = field(default_factory=list)
    """``(actor_id, topic, data)`` announced by committed transactions (only if verified)."""
    everything: bool = False
    hello: bool = False
    """A process just registered: receivers re-read the registry to learn its address."""
    verified: bool = False
    """Everything in it is known committed and its sender is trusted: act without re-reading.
    The sender sets it; the transport clears it when it cannot vouch for the sender."""

    def encode(self, limit: int = _MAX_DATAGRAM) -> bytes:
        """The wire form; "everything changed" when longer than ``limit`` bytes."""
        if self.hello:
            return b'{"h":1}'
        fields: dict[str, Any] = {"d": self.due, "c": self.changed, "x": self.cancels}
        if self.notices:
            fields["n"] = self.notices
        if self.verified:
            fields["v"] = 1
        data = json.dumps(fields, separators=(",", ":")).encode()
        if len(data) > limit:
            return b'{"all":1}'
        return data

    @classmethod
    def decode(cls, data: bytes) -> Message:
        raw = json.loads(data)
        if raw.get("all"):
            return cls(everything=True)
        if raw.get("h"):
            return cls(hello=True)
        return cls(
            due=[(str(a), int(d)) for a, d in raw.get("d", [])],
            changed=[str(a) for a in raw.get("c", [])],
            cancels=[(str(a), int(i), r) for a, i, r in raw.get("x", [])],
            notices=[(str(a), str(t), d) for a, t, d in raw.get("n", [])],
            verified=bool(raw.get("v")),
        )


class _Endpoint(Protocol):
    process_id: str
    machine: str
    address: str | None
    scheduler: bool


def process_info(endpoint: _Endpoint, now_ms: int) -> ProcessInfo:
    """The registry row of this process, reachable at ``endpoint``'s address."""
    return ProcessInfo(
        id=endpoint.process_id,
        pid=os.getpid(),
        machine=endpoint.machine,
        started=process_started(os.getpid()),
        address=endpoint.address,
        scheduler=endpoint.scheduler,
        heartbeat_at=now_ms,
    )


class WakeupSocket:
    """This process's wake-up endpoint: receives datagrams, sends them to peers."""

    def __init__(self, *, scheduler: bool) -> None:
        self.process_id = uuid.uuid4().hex[:16]
        self.scheduler = scheduler
        self.machine = machine_id()
        self.address: str | None = None
        self._sock: socket.socket | None = None
        self._uid = os.geteuid()
        self._lock = threading.Lock()
        """Held while sending (from any thread) and while closing."""
        if SUPPORTED:
            self.address = f"durable-triggers/{self.process_id}"
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind("\0" + self.address)
            # The kernel attaches each sender's real pid, uid and gid to what we receive.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            sock.setblocking(False)
            self._sock = sock

    def info(self, now_ms: int) -> ProcessInfo:
        """This process's registry row."""
        return process_info(self, now_ms)

    def send(self, address: str, message: Message) -> bool:
        """Send without blocking, from any thread; False if the peer is gone or its queue is
        full, or this endpoint is closed."""
        data = message.encode()
        with self._lock:
            if self._sock is None:
                return False
            try:
                self._sock.sendto(data, "\0" + address)
            except OSError as exc:
                if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN):
                    _log.warning("wakeup_send_failed", address=address, error=str(exc))
                return False
        return True

    async def receive_forever(self, handle: Callable[[Message], Any]) -> None:
        """Call ``handle`` for each datagram received, until cancelled."""
        sock = self._sock
        if sock is None:
            await anyio.sleep_forever()
            return
        while True:
            await anyio.wait_readable(sock)
            while True:
                try:
                    data, ancillary, _, _ = sock.recvmsg(65536, _CREDENTIALS_SPACE)
                except BlockingIOError:
                    break
                try:
                    message = Message.decode(data)
                except (ValueError, TypeError, KeyError):
                    _log.warning("wakeup_garbled", size=len(data))
                    continue
                if message.verified and sender_uid(ancillary) != self._uid:
                    message.verified = False  # not vouched for: a hint only
                    message.notices = []
                handle(message)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def classify(processes: list[ProcessInfo], here: str, own_id: str) -> tuple[
    list[ProcessInfo], set[str]
]:  # fmt: skip
    """Split registered processes into live peers and ids known to be dead."""
    peers: list[ProcessInfo] = []
    dead: set[str] = set()
    for info in processes:
        if info.id == own_id:
            continue
        alive = process_alive(info, here)
        if alive is False:
            dead.add(info.id)
        else:
            peers.append(info)
    return peers, dead
