"""The HTTP API over a real uvicorn server on 127.0.0.1: enqueue, cancel, reads, server-sent
events (resumable), distributed abort, errors with stable codes, the token."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import anyio
import httpx
import pytest
from fastapi.routing import APIRoute
from starlette.routing import Route

from actors.http import close_streams, create_app
from tests.helpers import CANCELLED, DONE, Gate, make_trigger, open_host
from tests.servers import serve
from triggers import DistributedAbortController, TriggerContext

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from actors import ActorHost

pytestmark = pytest.mark.anyio

KIND = "test.work"
LATER = datetime(2100, 1, 1, tzinfo=UTC).isoformat()


def positive(payload: Any) -> Any:
    if not (isinstance(payload, dict) and isinstance(payload.get("n"), int) and payload["n"] > 0):
        raise ValueError("n must be a positive int")
    return payload


@asynccontextmanager
async def api(
    tmp_path: Path, *triggers: Any, **app_options: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, ActorHost]]:
    """A host running ``triggers``, its app on a real server, and a client of it."""
    triggers = triggers or (make_trigger(KIND),)
    async with (
        open_host(tmp_path, *triggers) as host,
        serve(create_app(host, **app_options)) as url,
    ):
        headers = {}
        if app_options.get("token"):
            headers["Authorization"] = f"Bearer {app_options['token']}"
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as client:
            yield client, host


async def sse_frames(
    client: httpx.AsyncClient, path: str, count: int, headers: dict[str, str] | None = None
) -> list[dict[str, str]]:
    """Read ``count`` server-sent events (id, event, data) from ``path``."""
    frames: list[dict[str, str]] = []
    with anyio.fail_after(10):
        async with client.stream("GET", path, headers=headers) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            frame: dict[str, str] = {}
            async for line in response.aiter_lines():
                if line.startswith(":"):
                    continue
                if not line:
                    if frame:
                        frames.append(frame)
                        frame = {}
                        if len(frames) == count:
                            return frames
                    continue
                field, _, value = line.partition(": ")
                frame[field] = value
    return frames


async def test_enqueue_read_and_list(tmp_path: Path) -> None:
    """Enqueue answers 201 with the intent; the intent, the intent list (by status), the
    events (by kind, with a limit), the actor list and the kinds can be read back."""
    async with api(tmp_path) as (client, host):
        response = await client.post(f"/actors/chat:1/triggers/{KIND}", json={"payload": {"n": 1}})
        assert response.status_code == 201, response.text
        intent_id = response.json()["intent_event_id"]
        assert response.json()["event"]["payload"] == {"n": 1}
        with anyio.fail_after(10):
            await host.get("chat:1").wait_for_intent(intent_id)
        read = await client.get(f"/actors/chat:1/intents/{intent_id}")
        assert read.json()["status"] == "completed"
        completed = await client.get("/actors/chat:1/intents", params={"status": "completed"})
        assert [i["intent_event_id"] for i in completed.json()] == [intent_id]
        pending = await client.get("/actors/chat:1/intents", params={"status": "pending"})
        assert pending.json() == []
        events = await client.get("/actors/chat:1/events", params={"kinds": [DONE], "limit": 5})
        assert [e["kind"] for e in events.json()] == [DONE]
        assert (await client.get("/actors")).json() == {"actors": ["chat:1"], "next": None}
        assert (await client.get("/triggers")).json() == {"kinds": [KIND]}


async def test_cancel_pending_and_running(tmp_path: Path) -> None:
    """Cancel answers the CancelResult: cancelled for pending work, requested for running
    work (which then ends cancelled), already_completed after that."""
    gate = Gate()
    async with api(tmp_path, make_trigger(KIND, gate.acquire)) as (client, host):
        later = await client.post(f"/actors/a/triggers/{KIND}", json={"at": LATER})
        later_id = later.json()["intent_event_id"]
        answer = await client.post(
            f"/actors/a/triggers/{KIND}/{later_id}/cancel", json={"reason": "user"}
        )
        assert answer.json() == {
            "status": "cancelled", "intent_event_id": later_id, "terminal_status": "cancelled",
        }  # fmt: skip

        now = await client.post(f"/actors/a/triggers/{KIND}")
        now_id = now.json()["intent_event_id"]
        await gate.wait_started(now_id)
        answer = await client.post(f"/actors/a/triggers/{KIND}/{now_id}/cancel")
        assert answer.json()["status"] == "requested"
        with anyio.fail_after(10):
            state = await host.get("a").wait_for_intent(now_id)
        assert state.status == "cancelled"
        again = await client.post(f"/actors/a/triggers/{KIND}/{now_id}/cancel")
        assert again.json()["status"] == "already_completed"
        missing = await client.post(f"/actors/a/triggers/{KIND}/9999/cancel")
        assert missing.json()["status"] == "not_found"


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("POST", "/actors/a/triggers/nope", {}, 404, "unknown_trigger"),
        ("POST", "/actors/a/triggers/nope/1/cancel", {}, 404, "unknown_trigger"),
        ("GET", "/actors/nobody/intents", None, 404, "unknown_actor"),
        ("GET", "/actors/nobody/events", None, 404, "unknown_actor"),
        ("POST", f"/actors/nobody/triggers/{KIND}/1/cancel", {}, 404, "unknown_actor"),
        ("GET", "/actors/a/intents/999", None, 404, "intent_not_found"),
        ("GET", "/actors/a/intents/abc", None, 422, "invalid_request"),
        ("GET", "/actors/a/intents", {"status": "sleeping"}, 422, "invalid_request"),
        ("POST", f"/actors/a/triggers/{KIND}", {"payload": {"n": -1}}, 422, "payload_rejected"),
        ("POST", f"/actors/a/triggers/{KIND}", {"payload": {"n": 1}, "x": 1}, 422,
         "invalid_request"),
        ("POST", f"/actors/a/triggers/{KIND}", {"payload": {"n": 1}, "at": "2030-01-01T00:00"},
         422, "invalid_request"),
    ],
)  # fmt: skip
async def test_errors_have_stable_codes(
    tmp_path: Path, method: str, path: str, body: Any, status: int, code: str
) -> None:
    """Each bad request gets its status and JSON error code, and changes nothing."""
    trigger = make_trigger(KIND, parse_intent=positive)
    async with api(tmp_path, trigger) as (client, host):
        await client.post(f"/actors/a/triggers/{KIND}", json={"payload": {"n": 1}, "at": LATER})
        before = await host.get("a").events()
        if method == "GET":
            response = await client.get(path, params=body)
        else:
            response = await client.post(path, json=body)
        assert response.status_code == status, response.text
        assert response.json()["error"] == code
        assert response.json()["message"]
        assert await host.get("a").events() == before
        assert await host.actors() == ["a"]


async def test_rejected_payload_lists_the_messages(tmp_path: Path) -> None:
    """A payload refused by parse_intent is 422 payload_rejected with its messages."""
    async with api(tmp_path, make_trigger(KIND, parse_intent=positive)) as (client, _):
        response = await client.post(f"/actors/a/triggers/{KIND}", json={"payload": {"n": 0}})
        assert response.status_code == 422
        assert response.json()["details"] == ["n must be a positive int"]


async def test_nan_payload_is_refused(tmp_path: Path) -> None:
    """A payload holding NaN (accepted by the JSON parser) is refused as payload_invalid."""
    async with api(tmp_path) as (client, host):
        response = await client.post(
            f"/actors/a/triggers/{KIND}",
            content=b'{"payload": {"x": NaN}}',
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == 422
        assert response.json()["error"] == "payload_invalid"
        assert await host.actors() == []


BODY_ROUTES = (f"/actors/a/triggers/{KIND}", f"/actors/a/triggers/{KIND}/1/cancel", "/abort/a")


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"hello", "body: Expecting value (at character 0)"),
        (b'{"payload": {"a": 1', "body: Expecting ',' delimiter (at character 19)"),
        (b"\xff\xfe not utf-8", None),
        (b'{"payload": "\xc3\x28"}', None),
    ],
    ids=["not JSON at all", "truncated", "a BOM, then not UTF-16", "not UTF-8"],
)
async def test_a_body_that_is_not_json_is_400(
    tmp_path: Path, body: bytes, detail: str | None
) -> None:
    """A body sent as JSON that does not parse (not JSON at all, truncated, not UTF-8) is a
    malformed request: 400 invalid_request on every route that takes a body (FastAPI alone
    answers 422), with the parser's message; nothing is written."""
    async with api(tmp_path) as (client, host):
        for path in BODY_ROUTES:
            answer = await client.post(
                path, content=body, headers={"Content-Type": "application/json"}
            )
            assert answer.status_code == 400, (path, answer.text)
            assert answer.json()["error"] == "invalid_request"
            assert answer.json()["message"]
            if detail is not None:
                assert answer.json()["details"] == [detail]
        assert await host.actors() == []


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
async def test_a_body_without_a_json_content_type_is_415(
    tmp_path: Path, content_type: str | None
) -> None:
    """A body whose Content-Type is missing or not JSON is not read as JSON (even when it
    is): 415 unsupported_media_type, naming the type it got and accepting application/json;
    nothing is written. JSON types with parameters or a +json suffix are read."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    async with api(tmp_path) as (client, host):
        for path in BODY_ROUTES:
            answer = await client.post(path, content=b'{"reason": "r"}', headers=headers)
            assert answer.status_code == 415, (path, answer.text)
            assert answer.json()["error"] == "unsupported_media_type"
            assert answer.json()["details"] == [
                "no Content-Type" if content_type is None else f"Content-Type: {content_type}"
            ]
            assert answer.headers["Accept"] == "application/json"
        assert await host.actors() == []
        for json_type in ("application/json; charset=utf-8", "application/merge-patch+json"):
            answer = await client.post(
                f"/actors/a/triggers/{KIND}",
                content=b'{"payload": 1, "at": "2100-01-01T00:00:00Z"}',
                headers={"Content-Type": json_type},
            )
            assert answer.status_code == 201, (json_type, answer.text)


async def test_oversized_body_is_413(tmp_path: Path) -> None:
    """A body over the limit is refused with 413 body_too_large, declared or streamed."""
    async with api(tmp_path, max_body=1000) as (client, host):
        big = {"payload": {"blob": "x" * 2000}}
        response = await client.post(f"/actors/a/triggers/{KIND}", json=big)
        assert response.status_code == 413
        assert response.json()["error"] == "body_too_large"

        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"payload": "'
            for _ in range(20):
                yield b"y" * 100
            yield b'"}'

        streamed = await client.post(
            f"/actors/a/triggers/{KIND}",
            content=chunks(),
            headers={"Content-Type": "application/json"},
        )
        assert streamed.status_code == 413
        assert await host.actors() == []


@pytest.mark.parametrize(
    "path",
    ["/", "/actors", "/triggers", "/openapi.json", "/docs", "/redoc", "/actors/a/intents",
     "/abort/x"],
)  # fmt: skip
async def test_token_is_required_everywhere(tmp_path: Path, path: str) -> None:
    """With a token set, every route answers 401 without it or with a wrong one, and serves
    with the bearer header or the ``token`` query parameter."""
    async with api(tmp_path, token="s3cret") as (client, _):
        await client.post(f"/actors/a/triggers/{KIND}", json={"at": LATER})
        method = "POST" if path.startswith("/abort") else "GET"
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=10) as anonymous:
            bare = await anonymous.request(method, path)
            assert bare.status_code == 401
            assert bare.json()["error"] == "unauthorized"
            wrong = await anonymous.request(method, path, headers={"Authorization": "Bearer s3cre"})
            assert wrong.status_code == 401
            query = await anonymous.request(method, path, params={"token": "s3cret"})
            assert query.status_code in (200, 201), query.text
        assert (await client.request(method, path)).status_code in (200, 201)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_the_api_pages_fetch_the_schema_with_the_token(tmp_path: Path, page: str) -> None:
    """A docs page opened with ``?token=`` points at the schema with the token, so it loads;
    the bearer scheme is matched in any case."""
    async with (
        api(tmp_path, token="s3 cr/et") as (client, _),
        httpx.AsyncClient(base_url=str(client.base_url), timeout=10) as anonymous,
    ):
        html = (await anonymous.get(page, params={"token": "s3 cr/et"})).text
        assert "/openapi.json?token=s3%20cr%2Fet" in html
        schema = await anonymous.get("/openapi.json?token=s3%20cr%2Fet")
        assert schema.status_code == 200
        assert schema.json()["info"]["title"] == "durable-triggers"
        lower = await anonymous.get("/actors", headers={"Authorization": "bearer s3 cr/et"})
        assert lower.status_code == 200


async def test_no_route_answers_without_the_token(tmp_path: Path) -> None:
    """Every route the app has (read from the app itself, so a new route is covered the day it
    is added), with every method it takes, with odd paths and encodings: 401 without the
    token, and nothing written."""
    samples = {"actor": "a", "kind": KIND, "intent_event_id": "1", "id": "x"}
    async with open_host(tmp_path, make_trigger(KIND)) as host:
        app = create_app(host, token="s3cret")
        routes = [r for r in app.routes if isinstance(r, APIRoute | Route)]
        assert len(routes) >= 10
        async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as anonymous:
            tried = 0
            for route in routes:
                path = route.path
                for name, value in samples.items():
                    path = path.replace("{" + name + "}", value)
                assert "{" not in path, f"no sample for a parameter of {route.path}"
                for method in sorted(route.methods or {"GET"}):
                    for variant in (path, path + "/", path.upper(), path.replace("/", "//")):
                        answer = await anonymous.request(method, variant, json={})
                        assert answer.status_code in (401, 404, 405), (method, variant)
                        if answer.status_code != 401:
                            # Not a route at all: still no data behind it.
                            assert "intent" not in answer.text, (method, variant)
                        tried += 1
                    for header in ("Bearer", "Basic s3cret", "bearer s3cret x", "Bearer s3cre"):
                        answer = await anonymous.request(
                            method, path, json={}, headers={"Authorization": header}
                        )
                        assert answer.status_code == 401, (method, path, header)
        assert tried > 40
        assert await host.actors() == []


@pytest.mark.parametrize(
    "name", ["team/a", "x/intents", "a/intents/5", "../up", "é/ü", "50%", "a%2Fb", "a+b c"]
)
async def test_actors_whose_names_hold_slashes_are_served(tmp_path: Path, name: str) -> None:
    """Any actor name, slashes included (percent-encoded in the path, as the dashboard does),
    reaches its own actor on every route, however much of it looks like a route."""
    q = quote(name, safe="")
    async with api(tmp_path) as (client, host):
        enqueued = await client.post(f"/actors/{q}/triggers/{KIND}", json={"at": LATER})
        assert enqueued.status_code == 201, enqueued.text
        intent_id = enqueued.json()["intent_event_id"]
        assert await host.actors() == [name]
        listed = await client.get(f"/actors/{q}/intents")
        assert [i["intent_event_id"] for i in listed.json()] == [intent_id]
        one = await client.get(f"/actors/{q}/intents/{intent_id}")
        assert one.json()["status"] == "pending"
        events = await client.get(f"/actors/{q}/events")
        assert [e["kind"] for e in events.json()] == [f"{KIND}.requested"]
        frames = await sse_frames(client, f"/actors/{q}/events/stream", 1)
        assert frames[0]["id"] == str(intent_id)
        cancel = await client.post(f"/actors/{q}/triggers/{KIND}/{intent_id}/cancel")
        assert cancel.json()["status"] == "cancelled"
        ended = await sse_frames(client, f"/actors/{q}/intents/{intent_id}/stream", 1)
        assert ended[0]["event"] == "end"
        aborted = await client.post(f"/abort/{q}", json={"reason": "stop"})
        assert aborted.status_code == 200
        assert aborted.json()["id"] == name


async def test_a_server_without_raw_paths_decodes_names_once(tmp_path: Path) -> None:
    """``raw_path`` is optional in ASGI: without it the path is taken as decoded, once (a
    name holding ``%41`` stays ``%41``); with the server's prefix (``root_path``) the docs
    pages point at the prefixed schema."""
    async with open_host(tmp_path, make_trigger(KIND)) as host:
        app = create_app(host)

        async def without_raw_path(scope: Any, receive: Any, send: Any) -> None:
            scope = {key: value for key, value in scope.items() if key != "raw_path"}
            await app(scope, receive, send)

        transport = httpx.ASGITransport(app=without_raw_path, root_path="/api")
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            name = quote("a%41", safe="")
            made = await client.post(f"/actors/{name}/triggers/{KIND}", json={"at": LATER})
            assert made.status_code == 201, made.text
            assert await host.actors() == ["a%41"]
            listed = await client.get(f"/actors/{name}/intents")
            assert listed.status_code == 200
            assert len(listed.json()) == 1
            assert "/api/openapi.json" in (await client.get("/docs")).text


async def test_tail_events_resumes_from_last_event_id(tmp_path: Path) -> None:
    """The event tail is server-sent events with the event id as ``id``; a reconnect with
    ``Last-Event-ID`` continues after it."""
    async with api(tmp_path) as (client, _):
        for n in range(3):
            await client.post(f"/actors/t/triggers/{KIND}", json={"payload": n, "at": LATER})
        first = await sse_frames(client, "/actors/t/events/stream", 2)
        assert [(f["id"], f["event"]) for f in first] == [("1", "ledger"), ("2", "ledger")]
        assert json.loads(first[0]["data"])["payload"] == 0
        rest = await sse_frames(client, "/actors/t/events/stream", 1, {"Last-Event-ID": "2"})
        assert rest[0]["id"] == "3"
        assert json.loads(rest[0]["data"])["payload"] == 2


async def test_tail_follows_new_events(tmp_path: Path) -> None:
    """A tail that has caught up receives events recorded afterwards."""
    async with api(tmp_path) as (client, _):
        await client.post(f"/actors/f/triggers/{KIND}", json={"payload": 0, "at": LATER})
        frames: list[dict[str, str]] = []
        async with anyio.create_task_group() as tg:

            async def read() -> None:
                frames.extend(await sse_frames(client, "/actors/f/events/stream", 2))

            tg.start_soon(read)
            await anyio.wait_all_tasks_blocked()
            await client.post(f"/actors/f/triggers/{KIND}", json={"payload": 1, "at": LATER})
        assert [json.loads(f["data"])["payload"] for f in frames] == [0, 1]


async def test_a_quiet_stream_sends_keepalives_and_still_delivers(tmp_path: Path) -> None:
    """A stream with no news sends keepalive comments every ``keepalive`` seconds; waiting
    through them does not break the follower: an event recorded afterwards still arrives."""
    async with api(tmp_path, keepalive=0.02) as (client, _):
        await client.post(f"/actors/q/triggers/{KIND}", json={"payload": 0, "at": LATER})
        with anyio.fail_after(10):
            async with client.stream("GET", "/actors/q/events/stream") as response:
                lines = response.aiter_lines()
                assert await anext(lines) == "id: 1"
                keepalives = 0
                while keepalives < 3:
                    keepalives += (await anext(lines)).startswith(": keepalive")
                await client.post(f"/actors/q/triggers/{KIND}", json={"payload": 1, "at": LATER})
                while (line := await anext(lines)).startswith(":") or not line:
                    pass
                assert line == "id: 2"


async def test_close_streams_ends_open_and_later_streams(tmp_path: Path) -> None:
    """``close_streams(app)`` ends the streams the app has open (their responses complete)
    and makes any opened afterwards end at once, so a stopping server need not wait."""
    async with open_host(tmp_path, make_trigger(KIND)) as host:
        app = create_app(host)
        async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
            await client.post(f"/actors/c/triggers/{KIND}", json={"payload": 0, "at": LATER})
            with anyio.fail_after(10):
                async with client.stream("GET", "/actors/c/events/stream") as response:
                    lines = response.aiter_lines()
                    assert await anext(lines) == "id: 1"
                    close_streams(app)
                    rest = [line async for line in lines]
                assert rest[0] == "event: ledger"
                assert rest[1].startswith("data: ")
                assert [line for line in rest[2:] if line] == [], "nothing after that frame"
                later = await client.get("/actors/c/events/stream")
                assert later.status_code == 200
                assert later.text == ""
    with pytest.raises(TypeError, match="create_app"):
        close_streams(object())  # type: ignore[arg-type]


@pytest.mark.parametrize("keepalive", [0, -1, float("inf"), "15", True])
async def test_bad_keepalive_is_refused(tmp_path: Path, keepalive: Any) -> None:
    async with open_host(tmp_path, make_trigger(KIND)) as host:
        with pytest.raises(ValueError, match="keepalive"):
            create_app(host, keepalive=keepalive)


async def test_intent_stream_replays_follows_and_ends(tmp_path: Path) -> None:
    """An intent's stream sends its chunks (``id`` = index) and ends with its state; a
    reconnect with ``Last-Event-ID`` resumes after that chunk."""
    release = anyio.Event()

    async def acquire(intent: Any, ctx: TriggerContext) -> Any:
        for n in range(3):
            await ctx.stream.write({"token": n})
        await release.wait()
        return "done"

    async with api(tmp_path, make_trigger(KIND, acquire)) as (client, _):
        intent_id = (await client.post(f"/actors/s/triggers/{KIND}")).json()["intent_event_id"]
        path = f"/actors/s/intents/{intent_id}/stream"
        first = await sse_frames(client, path, 3)
        assert [(f["id"], f["event"], json.loads(f["data"])) for f in first] == [
            ("0", "chunk", {"token": 0}), ("1", "chunk", {"token": 1}),
            ("2", "chunk", {"token": 2}),
        ]  # fmt: skip
        release.set()
        rest = await sse_frames(client, path, 1, {"Last-Event-ID": "1"})
        assert json.loads(rest[0]["data"]) == {"token": 2}
        ended = await sse_frames(client, path, 4)
        assert ended[-1]["event"] == "end"
        assert json.loads(ended[-1]["data"])["status"] == "completed"


async def test_abort_route_aborts_the_controller(tmp_path: Path) -> None:
    """``POST /abort/{id}`` aborts the distributed abort controller of that id durably: a
    signal read afterwards fires with the reason."""
    async with api(tmp_path) as (client, host):
        response = await client.post("/abort/chat:42", json={"reason": "User clicked cancel"})
        assert response.status_code == 200
        assert response.json()["success"] is True
        controller = await DistributedAbortController.create("chat:42", host=host)
        assert controller.run_id == response.json()["run_id"]
        with anyio.fail_after(10):
            await controller.signal.wait()
        assert controller.signal.reason == "User clicked cancel"
        default = await client.post("/abort/chat:43")
        assert default.status_code == 200


async def test_openapi_schema_lists_the_routes(tmp_path: Path) -> None:
    """The OpenAPI schema is served and names every route."""
    async with api(tmp_path) as (client, _):
        schema = (await client.get("/openapi.json")).json()
        assert set(schema["paths"]) >= {
            "/actors",
            "/triggers",
            "/actors/{actor}/triggers/{kind}",
            "/actors/{actor}/triggers/{kind}/{intent_event_id}/cancel",
            "/actors/{actor}/intents",
            "/actors/{actor}/intents/{intent_event_id}",
            "/actors/{actor}/events",
            "/actors/{actor}/events/stream",
            "/actors/{actor}/intents/{intent_event_id}/stream",
            "/abort/{id}",
        }


async def test_cancelled_reason_reaches_the_fact(tmp_path: Path) -> None:
    """The reason given to the cancel route is the one recorded."""
    async with api(tmp_path) as (client, host):
        intent_id = (await client.post(f"/actors/r/triggers/{KIND}", json={"at": LATER})).json()[
            "intent_event_id"
        ]
        await client.post(
            f"/actors/r/triggers/{KIND}/{intent_id}/cancel", json={"reason": "from the web"}
        )
        facts = await host.get("r").events(kinds=[CANCELLED])
        assert [f.payload for f in facts] == [{"reason": "from the web"}]


@pytest.mark.parametrize(
    ("body", "what"),
    [
        (b'{"payload": NaN}', "NaN"),
        (b'{"payload": [Infinity]}', "infinity"),
        (b'{"payload": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "deep nesting"),
        (b'{"payload": ' + b"[" * 300 + b"]" * 300 + b"}", "nesting over 256"),
        (b'{"payload": {"a": 1', "truncated JSON"),
        (b'{"payload": 1, "idempotency_key": "k\\u0000"}', "NUL in a key"),
        (b"\xff\xfe not utf-8", "bytes"),
    ],
)
async def test_bad_request_bodies_are_4xx_and_write_nothing(
    tmp_path: Path, body: bytes, what: str
) -> None:
    """Bodies that are not storable JSON (NaN, nesting too deep, truncated, NUL where text
    must go, not UTF-8) get a 4xx JSON error, never a 5xx, and create no actor."""
    async with api(tmp_path) as (client, host):
        answer = await client.post(
            f"/actors/a/triggers/{KIND}",
            content=body,
            headers={"Content-Type": "application/json"},
        )
        assert 400 <= answer.status_code < 500, (what, answer.status_code, answer.text)
        assert "error" in answer.json(), what
        assert await host.actors() == []


async def test_bad_paths_are_4xx_and_write_nothing(tmp_path: Path) -> None:
    """Unknown kinds, ids that are not ints or out of range, NUL in names and reasons: 4xx
    answers, nothing written; a 10 KB actor name is an ordinary actor."""
    async with api(tmp_path) as (client, host):
        created = await client.post(f"/actors/a/triggers/{KIND}", json={"at": LATER})
        intent = created.json()["intent_event_id"]
        before = (await client.get("/actors/a/events")).json()
        bad = [
            ("POST", "/actors/a/triggers/no.such.kind", {}),
            ("POST", f"/actors/a/triggers/{KIND}/x/cancel", {}),
            ("POST", f"/actors/a/triggers/{KIND}/1.5/cancel", {}),
            ("POST", f"/actors/a/triggers/{KIND}/-1/cancel", {}),
            ("POST", f"/actors/a%00b/triggers/{KIND}", {}),
            ("POST", f"/actors/a/triggers/{KIND}/{intent}/cancel", {"reason": "r\x00"}),
            ("GET", "/actors/a/intents/abc", None),
            ("GET", "/actors/a/events?after=-5", None),
            ("GET", f"/actors/a/events?after={1 << 70}", None),
            ("GET", "/actors/a/events?intent_event_id=0", None),
            ("GET", f"/actors/a/intents?after={1 << 64}", None),
        ]
        for method, path, body in bad:
            answer = await client.request(method, path, json=body)
            assert 400 <= answer.status_code < 500, (method, path, answer.status_code, answer.text)
        far = await client.post(f"/actors/a/triggers/{KIND}/{1 << 70}/cancel", json={})
        assert far.json()["status"] == "not_found"  # no event can have that id
        assert (await client.get("/actors/a/events")).json() == before
        assert await host.actors() == ["a"]
        long_name = "n" * 10_240
        answer = await client.post(f"/actors/{long_name}/triggers/{KIND}", json={"at": LATER})
        assert answer.status_code == 201, answer.text
        assert long_name in await host.actors()
