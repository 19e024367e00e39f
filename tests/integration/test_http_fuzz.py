"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis): no request, however odd,
gets a 5xx answer. The server runs in a thread of its own with its host; requests are real."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.core.result import Err

from actors.http import create_app
from tests.helpers import make_trigger, open_host
from tests.servers import serve

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

KIND = "test.work"
TOKEN = "fuzz-token"


def positive(payload: Any) -> Any:
    if not (isinstance(payload, dict) and isinstance(payload.get("n"), int) and payload["n"] > 0):
        raise ValueError("n must be a positive int")
    return payload


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A host and its app on a real server, in a thread with its own event loop."""
    data_dir: Path = tmp_path_factory.mktemp("fuzz")
    ready = threading.Event()
    running: dict[str, Any] = {}

    async def run() -> None:
        trigger = make_trigger(KIND, parse_intent=positive)
        async with open_host(data_dir, trigger) as host, serve(create_app(host, token=TOKEN)) as u:
            later = datetime(2100, 1, 1, tzinfo=UTC)
            await host.get("seed").enqueue_trigger(trigger_kind=KIND, payload={"n": 1}, at=later)
            running.update(url=u, token=anyio.lowlevel.current_token(), done=anyio.Event())
            ready.set()
            await running["done"].wait()

    thread = threading.Thread(target=anyio.run, args=(run,), daemon=True)
    thread.start()
    assert ready.wait(30), "the server did not start"
    yield running["url"]
    anyio.from_thread.run_sync(running["done"].set, token=running["token"])
    thread.join(30)


def operations(base_url: str) -> list[Any]:
    raw = httpx.get(f"{base_url}/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
    schema = schemathesis.openapi.from_dict(raw.json())
    found = []
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise AssertionError(f"the schema has an invalid operation: {result.err()}")
        found.append(result.ok())
    return found


def test_no_server_errors(server: str) -> None:
    """Every operation, with generated paths, queries, headers and bodies: never a 5xx."""
    ops = operations(server)
    assert len(ops) >= 9
    failures: list[str] = []
    for operation in ops:
        if operation.path.endswith("/stream"):
            continue  # endless server-sent events: covered by test_http

        @settings(
            max_examples=40,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(case=operation.as_strategy(), authorized=st.booleans())
        def check(case: Any, authorized: bool) -> None:
            headers = {"Authorization": f"Bearer {TOKEN}"} if authorized else {}
            response = case.call(base_url=server, headers=headers, timeout=10)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path}: {response.status_code}")
            if not authorized:
                assert response.status_code == 401, (case.method, case.formatted_path)

        check()
    assert failures == []
