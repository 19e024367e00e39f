"""The HTTP face of an ``ActorHost``: a FastAPI app (see ``actors.http``)."""

from __future__ import annotations

import asyncio
import json
import secrets
from datetime import datetime
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import parse_qs, quote, unquote

from fastapi import FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ledger import (
    Event,
    IntentNotFoundError,
    IntentState,
    IntentStatus,
    LedgerError,
    PayloadError,
    ledger_relpath,
)
from triggers import (
    CancelResult,
    DistributedAbortController,
    IntentRejectedError,
    UnknownTriggerError,
)
from triggers._spec import RESERVED_PREFIX

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping

    from ._agent import Agent
    from ._host import ActorHost

    Scope = MutableMapping[str, Any]
    Message = MutableMapping[str, Any]
    Receive = Callable[[], Awaitable[Message]]
    Send = Callable[[Message], Awaitable[None]]
    ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

__all__ = ["create_app"]

MAX_BODY = 1 << 20
"""Largest request body accepted, in bytes (413 beyond)."""
_KEEPALIVE_S = 15.0


# -- request and response bodies --------------------------------------------------------------

# Path segments reach the routes with "%" and "/" still escaped (see ``_segments``), so that
# a name holding a slash stays one segment; these undo that.
Actor = Annotated[
    str,
    Path(description="the actor's name (percent-encoded: a / is %2F)"),
    AfterValidator(unquote),
]
Kind = Annotated[str, Path(description="the trigger kind"), AfterValidator(unquote)]
ControllerId = Annotated[
    str,
    Path(description="the abort controller's id, an actor name (a / is %2F)"),
    AfterValidator(unquote),
]
IntentId = Annotated[int, Path(ge=1, description="the intent's id (its intent event's id)")]
MAX_ID = (1 << 63) - 1
"""The largest event id (64-bit, as in both backends)."""


class EnqueueBody(BaseModel):
    """What to enqueue: the payload, and optionally when and under which idempotency key."""

    model_config = ConfigDict(extra="forbid")

    payload: Any = None
    at: datetime | None = None
    idempotency_key: str | None = None


class Enqueued(BaseModel):
    """The recorded intent: its id and its intent event."""

    intent_event_id: int
    event: Event


class CancelBody(BaseModel):
    """Why the intent is cancelled (recorded with the cancel request)."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = None
    requested_by: str | None = None


class AbortBody(BaseModel):
    """Why the distributed abort controller is aborted."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = None


class Aborted(BaseModel):
    """The aborted controller."""

    success: bool = True
    id: str
    run_id: int


class ActorList(BaseModel):
    """Actor names in name order; ``next`` is the ``after`` of the following page, if any."""

    actors: list[str]
    next: str | None = None


class TriggerKinds(BaseModel):
    """The trigger kinds of the served actor class."""

    kinds: list[str]


class ApiError(BaseModel):
    """Every error: a stable ``error`` code, a message for people, and details if any."""

    error: str
    message: str
    details: list[str] = Field(default_factory=list)


class HttpError(Exception):
    """An error answered as JSON with a stable code."""

    def __init__(
        self, status: int, code: str, message: str, details: list[str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.details = details or []


def _error_response(
    status: int, code: str, message: str, details: list[str] | None = None
) -> JSONResponse:
    body = ApiError(error=code, message=message, details=details or [])
    return JSONResponse(body.model_dump(), status_code=status)


def _json_error(error: Any) -> str:
    """One detail of a body that is not JSON: the parser's message and where it stopped."""
    where = error["loc"][-1]
    message = error.get("ctx", {}).get("error", error["msg"])
    return f"body: {message} (at character {where})"


def _unsupported_media_type(content_type: str | None) -> JSONResponse:
    """415 for a body sent without a JSON ``Content-Type`` (FastAPI leaves it unparsed)."""
    given = "no Content-Type" if content_type is None else f"Content-Type: {content_type}"
    response = _error_response(
        415,
        "unsupported_media_type",
        "the body must be JSON, sent with Content-Type: application/json",
        [given],
    )
    response.headers["Accept"] = "application/json"
    return response


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ApiError, "description": "the body is not valid JSON"},
    401: {"model": ApiError, "description": "missing or wrong token"},
    404: {"model": ApiError, "description": "unknown actor, intent or trigger kind"},
    413: {"model": ApiError, "description": "request body too large"},
    415: {"model": ApiError, "description": "a body sent without a JSON content type"},
    422: {"model": ApiError, "description": "invalid request or payload rejected"},
}


# -- the app ----------------------------------------------------------------------------------


def create_app(
    host: ActorHost,
    *,
    token: str | None = None,
    max_body: int = MAX_BODY,
    keepalive: float = _KEEPALIVE_S,
) -> FastAPI:
    """A FastAPI app serving ``host``'s actors: enqueue, cancel, read, follow, abort, dashboard.

    The host must be running (entered) while the app serves requests.

    Args:
        host: the actor host whose actors the app serves.
        token: if set, every route requires ``Authorization: Bearer <token>`` (or
            ``?token=<token>``, for the dashboard and server-sent events in a browser).
        max_body: largest request body in bytes; larger ones get 413.
        keepalive: seconds without news after which a server-sent event stream sends a
            comment line, so proxies and browsers keep it open.

    Returns:
        The app, with its OpenAPI schema at ``/openapi.json`` and its pages at ``/docs`` and
        ``/redoc`` (opened with ``?token=``, they fetch the schema with it).
    """

    app = FastAPI(
        title="durable-triggers",
        summary="Durable, cancellable work owned by actors.",
        responses=_ERRORS,
        docs_url=None,
        redoc_url=None,
    )

    def schema_url(request: Request) -> str:
        # A page opened with ?token= fetches the schema with it too (the token was checked).
        given = request.query_params.get("token")
        root: str = request.scope.get("root_path", "")
        url = root.rstrip("/") + "/openapi.json"
        return url + ("" if given is None else f"?token={quote(given, safe='')}")

    @app.get("/docs", include_in_schema=False)
    async def swagger(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=schema_url(request), title="durable-triggers")

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(openapi_url=schema_url(request), title="durable-triggers")

    app.add_middleware(_Guard, token=token, max_body=max_body)
    if (
        isinstance(keepalive, bool)
        or not isinstance(keepalive, int | float)
        or not 0 < keepalive < float("inf")
    ):
        raise ValueError(f"keepalive must be a positive number of seconds, not {keepalive!r}")
    streams = _Streams(keepalive)
    app.state.streams = streams

    @app.exception_handler(HttpError)
    async def on_http_error(request: Request, exc: HttpError) -> JSONResponse:
        return _error_response(exc.status, exc.code, str(exc), exc.details)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        unparsable = [err for err in errors if err["type"] == "json_invalid"]
        if unparsable:
            # FastAPI reports a body it cannot parse as a validation error; it is a malformed
            # request (400), not a well-formed one whose content is refused (422).
            details = [_json_error(err) for err in unparsable]
            return _error_response(400, "invalid_request", "the body is not valid JSON", details)
        if isinstance(exc.body, bytes):
            # A body left unparsed: its Content-Type is missing or not JSON.
            return _unsupported_media_type(request.headers.get("content-type"))
        details = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in errors]
        return _error_response(422, "invalid_request", "the request is invalid", details)

    @app.exception_handler(StarletteHTTPException)
    async def on_starlette_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's own answers (an unparsable body, an unknown path): the same JSON form.
        code = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}
        return _error_response(exc.status_code, code.get(exc.status_code, "error"), exc.detail)

    @app.exception_handler(PayloadError)
    async def on_payload_error(request: Request, exc: PayloadError) -> JSONResponse:
        return _error_response(422, "payload_invalid", str(exc))

    @app.exception_handler(LedgerError)
    async def on_ledger_error(request: Request, exc: LedgerError) -> JSONResponse:
        return _error_response(503, "ledger_unavailable", str(exc))

    async def agent_of(actor: str, *, must_exist: bool = True) -> Agent:
        try:
            ledger_relpath(actor)
        except (TypeError, ValueError) as exc:
            raise HttpError(422, "invalid_actor", str(exc)) from None
        if must_exist and not await host.store.exists(actor):
            raise HttpError(404, "unknown_actor", f"no actor named {actor!r}")
        return host.get(actor)

    def check_kind(kind: str) -> None:
        try:
            host.spec.registry.get(kind)
        except UnknownTriggerError as exc:
            raise HttpError(404, "unknown_trigger", str(exc)) from None

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        page = resources.files("actors").joinpath("dashboard.html").read_text(encoding="utf-8")
        return HTMLResponse(page)

    @app.get("/actors", response_model=ActorList, tags=["actors"])
    async def list_actors(
        after: Annotated[str, Query(description="names after this one")] = "",
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> ActorList:
        """Actors with a ledger, in name order."""
        names = await host.actors(after=after, limit=limit + 1)
        more = len(names) > limit
        names = names[:limit]
        return ActorList(actors=names, next=names[-1] if more else None)

    @app.get("/triggers", response_model=TriggerKinds, tags=["actors"])
    async def list_triggers() -> TriggerKinds:
        """The trigger kinds this actor class can run (the framework's own left out)."""
        kinds = [k for k in host.spec.registry.kinds if not k.startswith(RESERVED_PREFIX)]
        return TriggerKinds(kinds=kinds)

    @app.post(
        "/actors/{actor}/triggers/{kind}",
        status_code=201,
        response_model=Enqueued,
        tags=["intents"],
    )
    async def enqueue(actor: Actor, kind: Kind, body: EnqueueBody | None = None) -> Enqueued:
        """Record an intent (the actor is created if it has no ledger yet)."""
        body = body or EnqueueBody()
        check_kind(kind)
        agent = await agent_of(actor, must_exist=False)
        try:
            event = await agent.enqueue_trigger(
                trigger_kind=kind,
                payload=body.payload,
                at=body.at,
                idempotency_key=body.idempotency_key,
            )
        except IntentRejectedError as exc:
            raise HttpError(422, "payload_rejected", str(exc), list(exc.errors)) from None
        except PayloadError as exc:
            raise HttpError(422, "payload_invalid", str(exc)) from None
        except ValueError as exc:
            raise HttpError(422, "invalid_request", str(exc)) from None
        return Enqueued(intent_event_id=event.id, event=event)

    @app.post(
        "/actors/{actor}/triggers/{kind}/{intent_event_id}/cancel",
        response_model=CancelResult,
        tags=["intents"],
    )
    async def cancel(
        actor: Actor, kind: Kind, intent_event_id: IntentId, body: CancelBody | None = None
    ) -> CancelResult:
        """Cancel an intent; the answer is one of the five ``cancel_trigger`` statuses."""
        body = body or CancelBody()
        check_kind(kind)
        agent = await agent_of(actor)
        return await agent.cancel_trigger(
            trigger_kind=kind,
            intent_event_id=intent_event_id,
            reason=body.reason,
            requested_by=body.requested_by,
        )

    @app.get("/actors/{actor}/intents", response_model=list[IntentState], tags=["intents"])
    async def list_intents(
        actor: Actor,
        status: Annotated[IntentStatus | None, Query()] = None,
        after: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[IntentState]:
        """The actor's intents in id order, optionally only those in ``status``."""
        agent = await agent_of(actor)
        return await agent.intents(
            status=None if status is None else status.value, after=after, limit=limit
        )

    @app.get(
        "/actors/{actor}/intents/{intent_event_id}",
        response_model=IntentState,
        tags=["intents"],
    )
    async def read_intent(actor: Actor, intent_event_id: IntentId) -> IntentState:
        """One intent's current state."""
        agent = await agent_of(actor)
        try:
            return await agent.intent(intent_event_id)
        except IntentNotFoundError as exc:
            raise HttpError(404, "intent_not_found", str(exc)) from None

    @app.get("/actors/{actor}/events", response_model=list[Event], tags=["events"])
    async def read_events(
        actor: Actor,
        after: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
        kinds: Annotated[list[str] | None, Query()] = None,
        intent_event_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[Event]:
        """Events with ``id > after`` in id order."""
        agent = await agent_of(actor)
        return await agent.events(
            after=after, kinds=kinds, intent_event_id=intent_event_id, limit=limit
        )

    @app.get(
        "/actors/{actor}/events/stream",
        tags=["events"],
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def tail_events(
        actor: Actor,
        after: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
        last_event_id: Annotated[str | None, Header()] = None,
    ) -> StreamingResponse:
        """Server-sent events: each event with ``id > after`` as it is recorded (``event:
        ledger``, ``id`` the event id), resumable with ``Last-Event-ID``."""
        agent = await agent_of(actor)
        start = _resume(last_event_id, after)
        # Read once before answering: a ledger that cannot be read (corrupt, busy) answers
        # its error, as on every other route, rather than a 200 whose body breaks off.
        await agent.events(after=start, limit=1)

        async def frames() -> AsyncIterator[tuple[int, str, str]]:
            async for event in agent.tail(after=start):
                yield event.id, "ledger", event.model_dump_json()

        return _sse(frames(), streams)

    @app.get(
        "/actors/{actor}/intents/{intent_event_id}/stream",
        tags=["intents"],
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def follow_stream(
        actor: Actor,
        intent_event_id: IntentId,
        last_event_id: Annotated[str | None, Header()] = None,
    ) -> StreamingResponse:
        """Server-sent events: the intent's attached output chunks (``event: chunk``, ``id``
        the chunk index) until it ends (``event: end`` with its state); resumable with
        ``Last-Event-ID``."""
        agent = await agent_of(actor)
        try:
            await agent.intent(intent_event_id)
        except IntentNotFoundError as exc:
            raise HttpError(404, "intent_not_found", str(exc)) from None
        start = _resume(last_event_id, -1) + 1

        async def frames() -> AsyncIterator[tuple[int, str, str]]:
            index = start
            async for chunk in agent.stream(intent_event_id, start=start):
                yield index, "chunk", json.dumps(chunk)
                index += 1
            state = await agent.intent(intent_event_id)
            yield index, "end", state.model_dump_json()

        return _sse(frames(), streams)

    @app.post("/abort/{id}", response_model=Aborted, tags=["abort controllers"])
    async def abort_controller(id: ControllerId, body: AbortBody | None = None) -> Aborted:
        """Abort the distributed abort controller ``id`` (created if missing, so the abort is
        never lost); idempotent."""
        body = body or AbortBody()
        await agent_of(id, must_exist=False)
        controller = await DistributedAbortController.create(id, host=host)
        await controller.abort(body.reason or "Cancelled via API")
        return Aborted(id=id, run_id=controller.run_id)

    return app


def _resume(last_event_id: str | None, default: int) -> int:
    if last_event_id is None:
        return default
    try:
        value = int(last_event_id)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_ID:
        raise HttpError(422, "invalid_request", "Last-Event-ID must be an event id") from None
    return value


class _Streams:
    """The server-sent event responses an app has open, so a stopping server can end them."""

    def __init__(self, keepalive: float) -> None:
        self.keepalive = keepalive
        self.closed = False
        self._waiters: set[asyncio.Future[None]] = set()

    def close(self) -> None:
        """End every open stream now, and any opened later at once."""
        self.closed = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self, pending: asyncio.Future[Any]) -> None:
        """Until ``pending`` is done, the keepalive interval has passed, or ``close()``."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await asyncio.wait({pending, waiter}, timeout=self.keepalive,
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            self._waiters.discard(waiter)
            waiter.cancel()


def _sse(frames: AsyncIterator[tuple[int, str, str]], streams: _Streams) -> StreamingResponse:
    """A text/event-stream response of ``frames`` (id, event, data), with a keepalive comment
    whenever none came for ``streams.keepalive`` seconds; it ends when ``frames`` does or when
    ``streams`` closes.

    The next frame is awaited in a task of its own: waiting for it is interrupted by a
    keepalive or a close, and the frame's own work (a follower's read) must not be.
    """

    async def body() -> AsyncIterator[str]:
        iterator = aiter(frames)
        pending: asyncio.Future[tuple[int, str, str]] | None = None
        try:
            while not streams.closed:
                if pending is None:
                    pending = asyncio.ensure_future(anext(iterator))
                await streams.wait(pending)
                if streams.closed:
                    return
                if not pending.done():
                    yield ": keepalive\n\n"
                    continue
                try:
                    frame_id, kind, data = pending.result()
                except StopAsyncIteration:
                    return
                pending = None
                yield f"id: {frame_id}\nevent: {kind}\ndata: {data}\n\n"
        finally:
            if pending is not None and not pending.done():
                pending.cancel()  # the follower stops; so does the generator it runs in
            elif pending is not None and not pending.cancelled():
                pending.exception()  # seen: an error nobody will read is not logged

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


def close_streams(app: FastAPI) -> None:
    """End the server-sent event streams ``app`` has open; any opened afterwards ends at once.

    Call it when the server starts to stop, so that it need not wait for followers that
    never finish on their own (clients reconnect elsewhere with ``Last-Event-ID``).

    ``actors serve`` does this on SIGINT and SIGTERM.
    """
    streams = getattr(getattr(app, "state", None), "streams", None)
    if not isinstance(streams, _Streams):
        raise TypeError("close_streams() takes an app made by create_app()")
    streams.close()


def _segments(scope: Scope) -> Scope:
    """``scope`` with its path rebuilt from the raw path, segment by segment, keeping "%" and
    "/" escaped inside a segment: routing then sees ``/actors/team%2Fa/intents`` as the actor
    ``team/a`` (the routes' parameters unescape it), where the decoded path would not tell it
    from the actor ``team`` and a route ``/a/intents``."""
    raw = scope.get("raw_path")
    if not raw:
        # No raw path (it is optional in ASGI): a decoded "/" cannot be told apart any more,
        # but a "%" must not be decoded a second time by the parameters.
        path = scope.get("path", "")
        return {**scope, "path": path.replace("%", "%25")} if "%" in path else scope
    if b"%" not in raw:
        return scope
    segments = raw.decode("latin-1").split("?", 1)[0].split("/")
    path = "/".join(
        unquote(segment).replace("%", "%25").replace("/", "%2F") for segment in segments
    )
    return {**scope, "path": path}


class _Guard:
    """Checks the token (on every route, the schema and docs included) and refuses request
    bodies over ``max_body`` bytes with 413, whether declared or streamed."""

    def __init__(self, app: ASGIApp, token: str | None, max_body: int) -> None:
        self.app = app
        self.token = None if token is None else token.encode()
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope = _segments(scope)
        headers = dict(scope.get("headers", []))
        if self.token is not None and not self._authorized(scope, headers):
            response = _error_response(401, "unauthorized", "a valid token is required")
            await response(scope, receive, send)
            return
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body:
            await self._too_large(scope, receive, send)
            return
        # Read the body first (it is bounded), so an oversized stream is refused before the
        # app sees any of it.
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if len(body) > self.max_body:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _authorized(self, scope: Scope, headers: dict[bytes, bytes]) -> bool:
        assert self.token is not None
        given: bytes | None = None
        authorization = headers.get(b"authorization", b"")
        if authorization[:7].lower() == b"bearer ":  # the scheme's case does not matter
            given = authorization[7:]
        else:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            if query.get("token"):
                given = query["token"][0].encode()
        return given is not None and secrets.compare_digest(given, self.token)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = _error_response(
            413, "body_too_large", f"request bodies are limited to {self.max_body} bytes"
        )
        await response(scope, receive, send)
