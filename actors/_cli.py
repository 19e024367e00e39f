"""The ``actors`` command line: serve an actor class, enqueue, cancel, read, follow, inspect.

Exit codes: 0 done; 1 the ledger failed (locked, unwritable, corrupt; for ``inspect``, any
actor's ledger could not be read, the others being reported all the same); 2 bad usage; 3 not
found (actor, intent, trigger kind, or a cancel that answered ``not_found``); 4 input rejected
(a payload refused by ``parse_intent``, or not JSON).

The commands that only read (``intents``, ``events``, ``stream``, ``inspect``) also work on a
data directory this process cannot write (see ``_reading``). Tables and other text for people
show non-printable characters of names, kinds and reasons escaped (``\\x1b``, ``\\n``), and a
backslash doubled (``\\\\``), their columns aligned by terminal cells; ``--json`` gives them
exactly.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import signal
import socket
import sys
import time
import unicodedata
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import anyio
import structlog

from ledger import (
    IntentNotFoundError,
    IntentRow,
    IntentStatus,
    LedgerClosedError,
    LedgerCorruptError,
    LedgerError,
    LedgerNotFoundError,
    LedgerStore,
    LedgerTx,
    PayloadError,
    ledger_relpath,
)
from triggers import CancelStatus, IntentRejectedError, UnknownTriggerError

from ._host import ActorHost
from ._spec import AgentSpec, define_agent_do

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import uvicorn

    from ledger import Event, IntentState

OK, LEDGER_FAILED, USAGE, NOT_FOUND, REJECTED = 0, 1, 2, 3, 4


class CliError(Exception):
    """A user-facing failure: printed as one line, no traceback, with an exit code.

    The message is printed through ``_shown``, so it quotes names and other values as they
    are (``f"'{name}'"``), not with ``repr``, which would escape their backslashes twice.
    """

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# -- entry point ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``actors`` command; returns the exit code.

    SIGINT and SIGTERM stop a running command gracefully (a host releases its claims and
    closes its ledgers): the exit code is then 130 or 143. A second signal stops at once.
    If the reader of its output goes away (a closed pipe), it stops quietly with 141.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    configure_logging(json_lines=args.log_json)
    try:
        return int(anyio.run(_until_signalled, args))
    except CliError as exc:
        print(f"actors: error: {_shown(str(exc))}", file=sys.stderr)
        return exc.code
    except LedgerError as exc:
        print(f"actors: error: {_shown(str(exc))}", file=sys.stderr)
        return LEDGER_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``actors events ... | head -1``): stop quietly, as shell
        # tools do. Python would meet the closed pipe again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE


async def _until_signalled(args: argparse.Namespace) -> int:
    """Run the command; on SIGINT or SIGTERM cancel it (through anyio, so every cancel
    scope sees it) and return ``128 + signal``."""
    codes: list[int] = []
    failure: Exception | None = None
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
                async for signum in received:
                    codes.append(128 + signum)
                    # A command serving a host stops inside it (see ``_serve``); others stop.
                    stop = getattr(args, "stop_scope", None)
                    (stop or tg.cancel_scope).cancel()
                    return

        tg.start_soon(watch)
        try:
            codes.append(int(await args.run(args)))
        except Exception as exc:  # raised as itself below, not inside an exception group
            failure = exc
        tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return codes[0] if codes else 130


def configure_logging(*, json_lines: bool, stream: TextIO | None = None) -> None:
    """Configure structlog for an entry point: JSON lines, or console rendering.

    Args:
        json_lines: one JSON object per line (for log collectors) instead of colored text.
        stream: where logs go (standard error by default).
    """
    out = stream or sys.stderr
    renderer: Any
    if json_lines:
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="actors", description="Serve and operate durable-triggers actors."
    )
    parser.add_argument("--log-json", action="store_true", help="log JSON lines to stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Any, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(run=run)
        return sub

    def data_dir(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--data-dir",
            default=os.environ.get("ACTORS_DATA_DIR"),
            required="ACTORS_DATA_DIR" not in os.environ,
            help="the data directory (default: $ACTORS_DATA_DIR)",
        )

    def app(sub: argparse.ArgumentParser, *, positional: bool = False) -> None:
        if positional:
            sub.add_argument(
                "app",
                metavar="APP",
                nargs="?" if "ACTORS_APP" in os.environ else None,
                default=os.environ.get("ACTORS_APP"),
                help="module:attribute of an actor class (default: $ACTORS_APP)",
            )
        else:
            sub.add_argument(
                "--app",
                default=os.environ.get("ACTORS_APP"),
                required="ACTORS_APP" not in os.environ,
                help="module:attribute of the actor class (default: $ACTORS_APP)",
            )

    def as_json(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--json", action="store_true", help="print JSON for scripts")

    sub = command("serve", _serve, "serve an actor class: run its scheduler and its HTTP API")
    app(sub, positional=True)
    data_dir(sub)
    sub.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    sub.add_argument("--port", type=int, default=8000)
    sub.add_argument("--token", default=os.environ.get("ACTORS_TOKEN"), help="API token")
    sub.add_argument("--no-http", action="store_true", help="run the scheduler only")

    sub = command("enqueue", _enqueue, "record an intent")
    sub.add_argument("actor")
    sub.add_argument("kind")
    sub.add_argument("--payload", default="null", help="the payload, as JSON")
    sub.add_argument("--at", help="when it is due (ISO 8601 with a time zone)")
    sub.add_argument("--idempotency-key")
    app(sub)
    data_dir(sub)
    as_json(sub)

    sub = command("cancel", _cancel, "cancel an intent (prints the cancel status)")
    sub.add_argument("actor")
    sub.add_argument("kind")
    sub.add_argument("intent", type=int)
    sub.add_argument("--reason")
    app(sub)
    data_dir(sub)
    as_json(sub)

    sub = command("intents", _intents, "list an actor's intents")
    sub.add_argument("actor")
    sub.add_argument("--status", choices=[s.value for s in IntentStatus])
    sub.add_argument("--limit", type=int, default=1000)
    data_dir(sub)
    as_json(sub)

    sub = command("events", _events, "print an actor's events (--follow: keep following)")
    sub.add_argument("actor")
    sub.add_argument("--after", type=int, default=0)
    sub.add_argument("--kinds", nargs="+")
    sub.add_argument("--limit", type=int, default=1000)
    sub.add_argument("--follow", action="store_true")
    data_dir(sub)
    as_json(sub)

    sub = command("stream", _stream, "print an intent's output chunks until it ends")
    sub.add_argument("actor")
    sub.add_argument("intent", type=int)
    data_dir(sub)

    sub = command(
        "inspect", _inspect, "summarize a data directory (exit code 1 if a ledger is unreadable)"
    )
    sub.add_argument("dir", metavar="DIR")
    as_json(sub)
    return parser


# -- commands ---------------------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> int:
    spec = load_app(args.app)
    if not args.no_http:
        _check_http_extra()
    log = structlog.get_logger("actors")
    async with ActorHost(spec, data_dir=args.data_dir) as host:
        # A signal ends what runs in this scope, and the host is left in order: running
        # attempts get their grace and are released (cancelling the scope that holds the host
        # itself would cut its attempts and its ledger writes short).
        with anyio.CancelScope() as args.stop_scope:
            await _serve_host(args, host, log)
    return OK


def _check_http_extra() -> None:
    """Refuse to serve HTTP, before the host starts, where the ``http`` extra is missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise CliError(
            f"serve's HTTP API needs the http extra ({exc.name} is not installed): pip install"
            " 'durable-triggers[http]', or serve without it: --no-http",
            USAGE,
        ) from None


async def _serve_host(args: argparse.Namespace, host: ActorHost, log: Any) -> None:
    if args.no_http:
        log.info("serving", data_dir=str(host.data_dir), http=False)
        await anyio.sleep_forever()
    import uvicorn

    from .http import close_streams, create_app

    app = create_app(host, token=args.token)
    # Bind first, so the log line names the real port (also for --port 0) and requests sent
    # as soon as it is printed wait in the backlog instead of being refused.
    sock = _listen(args.host, args.port)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_config=None, access_log=False, timeout_graceful_shutdown=_HTTP_GRACE
    )
    log.info("serving", data_dir=str(host.data_dir), url=f"http://{args.host}:{port}")
    try:
        stopping = functools.partial(close_streams, app)
        await _serve_until_cancelled(uvicorn.Server(config), sock, stopping)
    finally:
        sock.close()


_HTTP_GRACE = 5
"""Seconds open HTTP requests (followers of tails and streams too) get when the server stops."""


async def _serve_until_cancelled(
    server: uvicorn.Server, sock: socket.socket, stopping: Callable[[], None]
) -> None:
    """Run ``server`` on ``sock``; when cancelled (a signal), let it shut down in order.

    Cut off by the cancellation, uvicorn would end its application's lifespan with an
    error (a ``CancelledError`` traceback on every stop). Shielded, it is told to exit
    instead, after ``stopping()`` (which ends the app's server-sent event streams): it stops
    accepting, gives open requests ``_HTTP_GRACE`` seconds, ends the lifespan, and the
    cancellation goes on from here.
    """
    finished = anyio.Event()

    async def run() -> None:
        try:
            with anyio.CancelScope(shield=True):
                await server.serve([sock])
        finally:
            finished.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        try:
            await finished.wait()
        finally:
            stopping()
            server.should_exit = True


def _listen(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        raise CliError(f"cannot listen on {host}:{port}: {exc}", USAGE) from None
    return sock


async def _enqueue(args: argparse.Namespace) -> int:
    spec = load_app(args.app)
    payload = _json_arg(args.payload, "--payload")
    at = None if args.at is None else _datetime_arg(args.at)
    async with _client(args.data_dir, spec) as host:
        try:
            event = await host.get(_actor(args.actor)).enqueue_trigger(
                trigger_kind=args.kind,
                payload=payload,
                at=at,
                idempotency_key=args.idempotency_key,
            )
        except UnknownTriggerError as exc:
            raise CliError(str(exc), NOT_FOUND) from None
        except (IntentRejectedError, PayloadError, ValueError) as exc:
            raise CliError(str(exc), REJECTED) from None
    if args.json:
        _print_json({"intent_event_id": event.id, "event": event.model_dump(mode="json")})
    else:
        print(f"enqueued intent {event.id} ({_shown(event.kind)}) for {_shown(args.actor)}")
    return OK


async def _cancel(args: argparse.Namespace) -> int:
    spec = load_app(args.app)
    async with _client(args.data_dir, spec) as host:
        agent = host.get(_existing_actor(host, args.actor))
        try:
            result = await agent.cancel_trigger(
                trigger_kind=args.kind, intent_event_id=args.intent, reason=args.reason
            )
        except UnknownTriggerError as exc:
            raise CliError(str(exc), NOT_FOUND) from None
    if args.json:
        _print_json(result.model_dump(mode="json"))
    else:
        ended = f" (it ended {result.terminal_status})" if result.terminal_status else ""
        print(f"{result.status}{ended}")
    return NOT_FOUND if result.status is CancelStatus.NOT_FOUND else OK


async def _intents(args: argparse.Namespace) -> int:
    async with _reading(args.data_dir) as host:
        agent = host.get(_existing_actor(host, args.actor))
        intents = await agent.intents(status=args.status, limit=args.limit)
    if args.json:
        _print_json([intent.model_dump(mode="json") for intent in intents])
        return OK
    rows = [_intent_row(intent) for intent in intents]
    _print_table(["ID", "KIND", "STATUS", "ATTEMPTS", "DUE", "CANCEL REASON"], rows)
    return OK


async def _events(args: argparse.Namespace) -> int:
    async with _reading(args.data_dir) as host:
        if args.follow:
            # An actor without a ledger yet is followed all the same: its first events show
            # as soon as they are recorded (reads of an actor without a ledger find nothing).
            agent = host.get(_actor(args.actor))
            if not await host.store.exists(agent.actor_id):
                note = f"no actor named '{args.actor}' yet; waiting for its first events"
                print(f"actors: {_shown(note)}", file=sys.stderr, flush=True)
            async for event in agent.tail(after=args.after):
                if args.kinds is None or event.kind in args.kinds:
                    _print_event(event, as_json=args.json)
                    sys.stdout.flush()
            return OK  # pragma: no cover - tail never ends on its own
        agent = host.get(_existing_actor(host, args.actor))
        events = await agent.events(after=args.after, kinds=args.kinds, limit=args.limit)
    if args.json:
        _print_json([event.model_dump(mode="json") for event in events])
    else:
        for event in events:
            _print_event(event, as_json=False)
    return OK


async def _stream(args: argparse.Namespace) -> int:
    async with _reading(args.data_dir) as host:
        agent = host.get(_existing_actor(host, args.actor))
        try:
            async for chunk in agent.stream(args.intent):
                print(json.dumps(chunk), flush=True)
        except IntentNotFoundError as exc:
            raise CliError(str(exc), NOT_FOUND) from None
    return OK


async def _inspect(args: argparse.Namespace) -> int:
    """Summarize every actor of the data directory; an actor whose ledger cannot be read is
    reported (its status, and a line on stderr naming its file) and the others still are."""
    directory = Path(args.dir)
    report: dict[str, Any] = {"data_dir": _data_dir_path(directory), "actors": []}
    totals: dict[str, int] = dict.fromkeys((s.value for s in IntentStatus), 0)
    stuck_total = 0
    failures: list[str] = []
    async with _reading(directory) as host:
        names = await _all_actors(host)
        progress = Progress(len(names), "inspecting actors")
        now_ms = host.store.clock()
        for name in names:
            path = host.data_dir / ledger_relpath(name)
            actor: dict[str, Any] = {
                "actor": name, "status": "ok", "error": None, "file": str(path),
                "intents": None, "stuck_claims": None,
            }  # fmt: skip
            try:
                intent_rows = await host.store.run(name, _all_rows, write=False, create=False)
            except LedgerClosedError:
                raise
            except LedgerError as exc:
                actor["status"], actor["error"] = _unreadable(exc), str(exc)
                failures.append(f"actors: error: actor '{name}' is {actor['status']}: {exc}")
            else:
                counts = dict.fromkeys(totals, 0)
                stuck = 0
                for row in intent_rows:
                    counts[row.status] += 1
                    if row.status == "running" and (row.lease_until or 0) < now_ms:
                        stuck += 1
                for status, count in counts.items():
                    totals[status] += count
                stuck_total += stuck
                actor["intents"], actor["stuck_claims"] = counts, stuck
            actor["bytes"] = _ledger_bytes(path)
            report["actors"].append(actor)
            progress.advance()
        progress.done()
    for line in failures:  # after the progress bar, which shares the terminal
        print(_shown(line), file=sys.stderr)
    report["totals"] = {
        "intents": totals, "stuck_claims": stuck_total, "unreadable_actors": len(failures)
    }  # fmt: skip
    code = LEDGER_FAILED if failures else OK
    if args.json:
        _print_json(report)
        return code
    rows = [
        [a["actor"], *(_count(a["intents"], s) for s in totals),
         "-" if a["stuck_claims"] is None else str(a["stuck_claims"]), _size(a["bytes"]),
         a["status"]]
        for a in report["actors"]
    ]  # fmt: skip
    _print_table(["ACTOR", *(s.upper() for s in totals), "STUCK", "SIZE", "STATUS"], rows)
    unreadable = f" ({len(failures)} unreadable, see above)" if failures else ""
    print(
        f"\n{len(names)} actors{unreadable}; "
        + ", ".join(f"{count} {status}" for status, count in totals.items())
        + f"; {stuck_total} stuck claims (running, lease expired)"
    )
    return code


def _unreadable(error: LedgerError) -> str:
    """The status ``inspect`` gives an actor whose ledger raised ``error``."""
    if isinstance(error, LedgerCorruptError):
        return "corrupt"
    if isinstance(error, LedgerNotFoundError):
        return "missing"
    return "unreadable"


def _count(counts: dict[str, int] | None, status: str) -> str:
    return "-" if counts is None else str(counts[status])


# -- helpers ----------------------------------------------------------------------------------


def load_app(reference: str) -> AgentSpec:
    """The actor class named by ``module:attribute`` (the current directory is importable).

    Raises:
        CliError: the reference is malformed, does not import, or is not an actor class.
    """
    module_name, sep, attribute = reference.partition(":")
    if not sep or not module_name or not attribute:
        raise CliError(f"APP must look like module:attribute, not '{reference}'", USAGE)
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CliError(f"cannot import '{module_name}': {exc}", USAGE) from None
    spec = getattr(module, attribute, None)
    if not isinstance(spec, AgentSpec):
        raise CliError(f"{reference} is not an actor class from define_agent_do()", USAGE)
    return spec


class _client:
    """A client host (no scheduler) on ``data_dir``; refuses a directory that does not exist."""

    def __init__(self, data_dir: str | Path, spec: AgentSpec | None = None) -> None:
        path = _existing_dir(data_dir)
        self._host = ActorHost(spec or define_agent_do(), data_dir=path, run_scheduler=False)

    async def __aenter__(self) -> ActorHost:
        return await self._host.__aenter__()

    async def __aexit__(self, *exc_info: object) -> None:
        await self._host.__aexit__(*exc_info)


class _reader:
    """Reads ``data_dir`` without writing anything to it: a client host that is never entered
    (so it registers nowhere and opens no wake-up socket), its store a read-only one
    (``LedgerStore(read_only=True)``), entered alone. Its agents read as any; their followers
    (``tail``, ``stream``) see other processes' writes at their fallback poll (every
    ``poll_interval``, 1 s), since no wake-up reaches a process that is not registered."""

    def __init__(self, data_dir: str | Path) -> None:
        path = _existing_dir(data_dir)
        spec = define_agent_do()
        self._host = ActorHost(spec, data_dir=path, run_scheduler=False)
        self._host.store = LedgerStore(path, projections=spec.projections, read_only=True)

    async def __aenter__(self) -> ActorHost:
        await self._host.store.__aenter__()
        return self._host

    async def __aexit__(self, *exc_info: object) -> None:
        await self._host.store.__aexit__(*exc_info)


def _reading(data_dir: str | Path) -> _client | _reader:
    """What a command that only reads opens: a client host, or a ``_reader`` when this
    process cannot write the data directory, its ``index.db`` (a client registers there) or
    its ``actors`` directory (a client opens the ledgers for writing).

    A reader is kept for that case: where it could write after all (a writable ``actors``
    directory under a read-only ``index.db``), SQLite's read-only connections leave their
    ``-wal`` and ``-shm`` files behind, which the next writer takes over.
    """
    path = _existing_dir(data_dir)
    needed = [path, path / "index.db", path / "actors"]  # what a client writes in
    if all(os.access(place, os.W_OK) for place in needed if place.exists()):
        return _client(path)
    return _reader(path)


def _existing_dir(data_dir: str | Path) -> Path:
    path = Path(data_dir)
    if not path.is_dir():
        raise CliError(f"no data directory at {path}", NOT_FOUND)
    return path


def _actor(name: str) -> str:
    try:
        ledger_relpath(name)
    except (TypeError, ValueError) as exc:
        raise CliError(f"invalid actor name: {exc}", USAGE) from None
    return name


def _existing_actor(host: ActorHost, name: str) -> str:
    if not (host.data_dir / ledger_relpath(_actor(name))).exists():
        raise CliError(f"no actor named '{name}' in {host.data_dir}", NOT_FOUND)
    return name


async def _all_actors(host: ActorHost) -> list[str]:
    names: list[str] = []
    while True:
        page = await host.actors(after=names[-1] if names else "", limit=1000)
        names += page
        if len(page) < 1000:
            return names


def _data_dir_path(directory: Path) -> str:
    if not (directory / "index.db").exists():
        raise CliError(f"{directory} is not a data directory (no index.db)", NOT_FOUND)
    return str(directory.resolve())


def _ledger_bytes(path: Path) -> int:
    """The size of a ledger with its WAL and shared-memory files."""
    files = (path, Path(f"{path}-wal"), Path(f"{path}-shm"))
    return sum(p.stat().st_size for p in files if p.exists())


def _all_rows(tx: LedgerTx) -> list[IntentRow]:
    return tx.intent_rows()


def _json_arg(text: str, option: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CliError(f"{option} is not JSON: {exc}", REJECTED) from None


def _datetime_arg(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise CliError(f"--at must be an ISO 8601 date and time, not '{text}'", USAGE) from None
    if value.tzinfo is None:
        raise CliError("--at needs a time zone (for example 2030-01-01T09:00+00:00)", USAGE)
    return value


def _intent_row(intent: IntentState) -> list[str]:
    due = "" if intent.due_at is None else intent.due_at.isoformat(timespec="seconds")
    return [
        str(intent.intent_event_id),
        intent.trigger_kind,
        intent.status.value,
        str(intent.attempts),
        due,
        intent.cancel_reason or "",
    ]


def _print_event(event: Event, *, as_json: bool) -> None:
    if as_json:
        print(event.model_dump_json())
        return
    intent = "" if event.intent_event_id is None else f" intent={event.intent_event_id}"
    print(f"{event.id:>6}  {_shown(event.kind)}{intent}  {json.dumps(event.payload)}")


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _print_table(headers: list[str], rows: list[list[str]]) -> None:
    """Print a table, its cells shown with ``_shown`` and its columns aligned by terminal
    cells (``_cells``), so wide characters do not shift the columns after them."""
    if not rows:
        print("(none)")
        return
    rows = [[_shown(cell) for cell in row] for row in rows]
    widths = [max(_cells(h), *(_cells(r[i]) for r in rows)) for i, h in enumerate(headers)]
    for line in [headers, *rows]:
        pairs = zip(line, widths, strict=True)
        print("  ".join(cell + " " * (width - _cells(cell)) for cell, width in pairs))


def _cells(text: str) -> int:
    """How many terminal cells ``text`` takes: two for each wide or fullwidth character (East
    Asian width ``W`` or ``F``: CJK ideographs, kana, most emoji), none for a combining or
    zero-width one (combining marks, format characters such as U+200B), one for the others."""
    cells = 0
    for char in text:
        if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
            continue
        cells += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
    return cells


def _shown(text: str) -> str:
    """``text`` for a terminal, escaped unambiguously: each non-printable character (controls
    such as ESC and newline, format characters such as bidirectional overrides, separators
    other than the space) as its Python escape (``\\x1b``, ``\\n``, ``\\u202e``), and a
    backslash doubled (``\\\\``), so the four characters ``\\x1b`` show as ``\\\\x1b``,
    unlike an ESC; everything else as it is."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(
        char if char.isprintable() and char != "\\" else repr(char)[1:-1] for char in text
    )


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


class Progress:
    """A progress bar on standard error, drawn only when it is a terminal."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        self.total = total
        self.label = label
        self.count = 0
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() and total > 0
        self._drawn = 0.0

    def advance(self) -> None:
        """Count one more item done, redrawing at most ten times a second."""
        self.count += 1
        now = time.monotonic()
        if self.enabled and (now - self._drawn > 0.1 or self.count == self.total):
            self._drawn = now
            filled = round(30 * self.count / self.total)
            bar = "#" * filled + "-" * (30 - filled)
            self.stream.write(f"\r{self.label} [{bar}] {self.count}/{self.total}")
            self.stream.flush()

    def done(self) -> None:
        """End the bar's line."""
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
