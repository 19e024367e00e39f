"""The ``actors`` command line, run as a real subprocess (the installed console script)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from actors import ActorHost
from tests.cli_app import AgentDO
from tests.helpers import fast_config, wait_until
from tests.integration.test_lifecycle import lost_claim, past_clock

ROOT = Path(__file__).resolve().parents[2]
ACTORS = shutil.which("actors", path=str(Path(sys.executable).parent))
APP = "tests.cli_app:AgentDO"
KIND = "cli.work"
LATER = datetime(2100, 1, 1, tzinfo=UTC).isoformat()

pytestmark = pytest.mark.skipif(ACTORS is None, reason="the actors console script is not installed")


def actors(*args: str, check: int | None = 0, env: dict[str, str] | None = None) -> Any:
    """Run ``actors ARGS``; asserts the exit code (unless ``check`` is None)."""
    assert ACTORS is not None
    result = subprocess.run(
        [ACTORS, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    if check is not None:
        assert result.returncode == check, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture
def data(tmp_path: Path) -> str:
    directory = tmp_path / "data"
    directory.mkdir()
    return str(directory)


def enqueue(data: str, payload: str = '{"n": 2}', *extra: str) -> int:
    out = actors("enqueue", "chat:1", KIND, "--payload", payload, "--app", APP,
                 "--data-dir", data, "--json", *extra)  # fmt: skip
    return int(json.loads(out.stdout)["intent_event_id"])


def test_enqueue_list_and_cancel(data: str) -> None:
    """Enqueue prints the intent; ``intents`` lists it (table and JSON); ``cancel`` prints the
    status and then ``already_completed``; a missing intent exits 3 with ``not_found``."""
    intent = enqueue(data, '{"n": 2}', "--at", LATER)
    table = actors("intents", "chat:1", "--data-dir", data).stdout
    assert table.splitlines()[0].split()[:3] == ["ID", "KIND", "STATUS"]
    assert table.splitlines()[1].split()[:4] == [str(intent), KIND, "pending", "0"]
    listed = json.loads(actors("intents", "chat:1", "--data-dir", data, "--json").stdout)
    assert [(i["intent_event_id"], i["status"]) for i in listed] == [(intent, "pending")]

    cancel = ("cancel", "chat:1", KIND, str(intent), "--reason", "cli", "--app", APP,
              "--data-dir", data)  # fmt: skip
    assert actors(*cancel).stdout.strip() == "cancelled (it ended cancelled)"
    assert actors(*cancel).stdout.strip() == "already_completed (it ended cancelled)"
    missing = actors("cancel", "chat:1", KIND, "999", "--app", APP, "--data-dir", data, check=3)
    assert missing.stdout.strip() == "not_found"
    cancelled = actors("intents", "chat:1", "--status", "cancelled", "--data-dir", data)
    assert "cli" in cancelled.stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["enqueue", "a", "nope", "--app", APP], 3, "no trigger of kind 'nope'"),
        (["enqueue", "a", KIND, "--payload", "{not json", "--app", APP], 4, "not JSON"),
        (["enqueue", "a", KIND, "--payload", '{"n": 0}', "--app", APP], 4, "positive int"),
        (["enqueue", "a", KIND, "--at", "2030-01-01T00:00", "--app", APP], 2, "time zone"),
        (["enqueue", "a", KIND, "--app", "tests.cli_app:nothing"], 2, "not an actor class"),
        (["enqueue", "a", KIND, "--app", "no_such_module:x"], 2, "cannot import"),
        (["intents", "nobody"], 3, "no actor named 'nobody'"),
        (["stream", "nobody", "1"], 3, "no actor named"),
    ],
)
def test_user_errors_exit_with_a_code_and_no_traceback(
    data: str, args: list[str], code: int, message: str
) -> None:
    """A user error prints one line naming the problem and exits with its code."""
    result = actors(*args, "--data-dir", data, check=code)
    assert message in result.stderr
    assert result.stderr.startswith("actors: error: ")
    assert not any((Path(data) / "actors").rglob("*.db")), "a failed command wrote a ledger"


def test_missing_data_dir_and_usage(tmp_path: Path) -> None:
    """A data directory that does not exist exits 3; a bad command line exits 2."""
    result = actors("intents", "a", "--data-dir", str(tmp_path / "nowhere"), check=3)
    assert "no data directory" in result.stderr
    assert not (tmp_path / "nowhere").exists()
    actors("frobnicate", check=2)
    actors("inspect", str(tmp_path), check=3)


def test_python_m_actors_runs_the_actors_command(tmp_path: Path) -> None:
    """``python -m actors`` is the console script's entry point: the same help (named
    ``actors``), the same exit codes."""

    def module(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "actors", *args],
            cwd=tmp_path,  # found where it is installed, not in the working directory
            capture_output=True,
            text=True,
            timeout=60,
        )

    shown = module("--help")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("usage: actors ")
    assert shown.stdout == actors("--help").stdout
    missing = module("intents", "a", "--data-dir", str(tmp_path / "nowhere"))
    assert missing.returncode == 3
    assert "no data directory" in missing.stderr
    assert module("frobnicate").returncode == 2


def test_serve_without_the_http_extra_says_how_to_get_it(tmp_path: Path) -> None:
    """``actors serve`` where FastAPI is not installed (imports of it fail here) says that its
    HTTP API needs the ``http`` extra, exit 2, before the host starts (it died with a
    ``ModuleNotFoundError`` traceback)."""
    blocked = (
        "import sys; sys.modules['fastapi'] = None; from actors._cli import main;"
        " sys.exit(main(sys.argv[1:]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", blocked, "serve", APP, "--data-dir", str(tmp_path / "d")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "needs the http extra (fastapi is not installed)" in result.stderr
    assert "--no-http" in result.stderr
    assert not (tmp_path / "d").exists()


async def run_to_end(data: str, *payloads: dict[str, int]) -> list[int]:
    """Run intents to completion with an in-process host; returns their ids."""
    async with ActorHost(AgentDO, data_dir=data, config=fast_config()) as host:
        agent = host.get("chat:1")
        ids = []
        for payload in payloads:
            intent = await agent.enqueue_trigger(trigger_kind=KIND, payload=payload)
            with anyio.fail_after(10):
                await agent.wait_for_intent(intent.id)
            ids.append(intent.id)
        return ids


def test_events_and_stream(data: str) -> None:
    """``events`` prints the ledger (JSON with ``--json``, filtered by kinds); ``stream``
    prints an ended intent's chunks as JSON lines."""
    (intent,) = anyio.run(run_to_end, data, {"n": 3})
    lines = actors("events", "chat:1", "--data-dir", data).stdout.splitlines()
    assert len(lines) == 2
    assert "cli.work.requested" in lines[0]
    done = json.loads(
        actors("events", "chat:1", "--kinds", "test.done", "--json", "--data-dir", data).stdout
    )
    assert [(e["kind"], e["payload"]) for e in done] == [("test.done", {"chunks": 3})]
    chunks = actors("stream", "chat:1", str(intent), "--data-dir", data).stdout.splitlines()
    assert [json.loads(c) for c in chunks] == [{"chunk": 0}, {"chunk": 1}, {"chunk": 2}]
    actors("stream", "chat:1", "999", "--data-dir", data, check=3)


def follow(data: str) -> subprocess.Popen[str]:
    """Start ``actors events chat:1 --follow --json``, with Python's fault handler on."""
    assert ACTORS is not None
    return subprocess.Popen(
        [ACTORS, "events", "chat:1", "--follow", "--json", "--data-dir", data],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1"},
    )


def stop(process: subprocess.Popen[str], signum: int = signal.SIGINT) -> int:
    """Send ``signum`` and wait; if the process does not end, fail with every thread's stack
    (the fault handler prints them on SIGABRT), leaving no process or pipe behind."""
    process.send_signal(signum)
    try:
        process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        _, stacks = process.communicate(timeout=30)
        pytest.fail(f"the command did not stop on signal {signum}:\n{stacks}")
    return process.returncode


def test_events_follow(data: str) -> None:
    """``events --follow`` prints events recorded after it started."""
    enqueue(data, '{"n": 1}', "--at", LATER)
    follower = follow(data)
    try:
        assert follower.stdout is not None
        first = json.loads(follower.stdout.readline())
        assert first["id"] == 1
        enqueue(data, '{"n": 2}', "--at", LATER)
        second = json.loads(follower.stdout.readline())
        assert (second["id"], second["payload"]) == (2, {"n": 2})
    finally:
        assert stop(follower) == 130


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_a_command_gracefully(data: str, signum: int) -> None:
    """SIGINT and SIGTERM cancel the command through its task groups: the host shuts down
    (its row leaves the data directory's registry) and the exit code is 128 + the signal."""
    enqueue(data, '{"n": 1}', "--at", LATER)
    follower = follow(data)
    assert follower.stdout is not None
    assert json.loads(follower.stdout.readline())["id"] == 1  # its host is up
    with contextlib.closing(sqlite3.connect(Path(data) / "index.db")) as index:
        assert index.execute("SELECT pid FROM processes").fetchall() == [(follower.pid,)]
        assert stop(follower, signum) == 128 + signum
        assert index.execute("SELECT pid FROM processes").fetchall() == []


async def make_stuck_claim(data: str) -> None:
    async with ActorHost(AgentDO, data_dir=data, run_scheduler=False, clock=past_clock) as client:
        await client.get("job:9").enqueue_trigger(trigger_kind=KIND, payload={"n": 1})
        await client.store.run("job:9", lost_claim(client))


def test_inspect(data: str) -> None:
    """``inspect`` counts intents by status per actor, finds stuck claims (running with an
    expired lease) and sizes the files; ``--json`` gives the same as data."""
    anyio.run(run_to_end, data, {"n": 1}, {"n": 2})
    anyio.run(make_stuck_claim, data)
    report = json.loads(actors("inspect", data, "--json").stdout)
    by_actor = {a["actor"]: a for a in report["actors"]}
    assert by_actor["chat:1"]["intents"]["completed"] == 2
    assert by_actor["job:9"]["intents"]["running"] == 1
    assert by_actor["job:9"]["stuck_claims"] == 1
    assert all(a["bytes"] > 0 for a in report["actors"])
    assert report["totals"]["stuck_claims"] == 1
    text = actors("inspect", data).stdout
    assert "2 actors" in text
    assert "1 stuck claims" in text


def test_serve_runs_the_scheduler_and_the_api(data: str) -> None:
    """``serve`` runs the scheduler and the HTTP API with a token (on the free port ``--port 0``
    found, named in its log), logs JSON lines with ``--log-json`` (one ``attempt_finished``
    line per attempt), and stops on SIGINT."""
    assert ACTORS is not None
    server = subprocess.Popen(
        [ACTORS, "--log-json", "serve", APP, "--data-dir", data, "--port", "0",
         "--token", "t0k"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert server.stderr is not None
        serving = json.loads(server.stderr.readline())
        assert serving["event"] == "serving"
        headers = {"Authorization": "Bearer t0k"}
        with httpx.Client(base_url=serving["url"], headers=headers, timeout=10) as client:
            response = client.post(f"/actors/a/triggers/{KIND}", json={"payload": {"n": 1}})
            assert response.status_code == 201
            assert httpx.get(serving["url"] + "/actors").status_code == 401
        attempt = None
        while attempt is None:
            record = json.loads(server.stderr.readline())
            if record["event"] == "attempt_finished":
                attempt = record
        assert attempt["outcome"] == "completed"
        assert {"actor", "kind", "intent", "attempt", "duration_ms", "level"} <= set(attempt)
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=30)
    assert server.returncode in (0, 130)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_on_a_signal_without_a_traceback(data: str, signum: int) -> None:
    """A signal shuts ``serve`` down in order: an open server-sent event stream is ended
    (not waited for, then cancelled), the HTTP server ends its application's lifespan rather
    than being cut off in it (which printed a CancelledError traceback), and the exit code is
    128 + the signal. APP comes from ``$ACTORS_APP`` when not given."""
    assert ACTORS is not None
    server = subprocess.Popen(
        [ACTORS, "--log-json", "serve", "--data-dir", data, "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "ACTORS_APP": APP},
    )
    assert server.stderr is not None
    serving = json.loads(server.stderr.readline())
    assert serving["event"] == "serving"
    url = serving["url"]
    body = {"payload": {"n": 1}, "at": LATER}
    assert httpx.post(f"{url}/actors/f/triggers/{KIND}", json=body).status_code == 201
    try:
        with httpx.stream("GET", f"{url}/actors/f/events/stream", timeout=30) as follower:
            lines = follower.iter_lines()
            assert next(lines) == "id: 1"
            server.send_signal(signum)
            assert [line for line in lines if line.startswith("id:")] == [], "it just ends"
        _, rest = server.communicate(timeout=30)
    finally:
        server.kill()
    assert server.returncode == 128 + signum, rest
    assert "Traceback" not in rest
    assert "CancelledError" not in rest


def test_a_closed_pipe_ends_a_command_quietly(data: str) -> None:
    """When the reader of the output goes away (``actors events ... | head -1``), the command
    stops with 141 (128 + SIGPIPE) and no traceback."""
    assert ACTORS is not None
    enqueue(data, '{"n": 1}', "--at", LATER)
    reader = subprocess.Popen(
        [ACTORS, "events", "chat:1", "--data-dir", data],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert reader.stdout is not None
    reader.stdout.close()  # before the command has read its ledger, let alone printed
    _, stderr = reader.communicate(timeout=60)
    assert reader.returncode == 141, stderr
    assert b"Traceback" not in stderr, stderr


async def _running(data: str) -> None:
    """Until the held attempt of chat:1's intent 1 has started in the serving process."""
    async with ActorHost(AgentDO, data_dir=data, run_scheduler=False) as client:
        agent = client.get("chat:1")

        async def started() -> bool:
            return (await agent.intent(1)).status == "running"

        await wait_until(agent, started, timeout=60)


async def _state(data: str) -> Any:
    async with ActorHost(AgentDO, data_dir=data, run_scheduler=False) as client:
        return await client.get("chat:1").intent(1)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_in_order_while_an_attempt_runs(data: str, signum: int) -> None:
    """A signal while an attempt runs leaves the host in order: the attempt gets the
    shutdown grace, its signal aborts with reason "shutdown", its claim is released for a
    redrive, and the process exits 128 + the signal (it used to hang for good)."""
    assert ACTORS is not None
    enqueue(data, '{"n": 1, "hold": true}')
    server = subprocess.Popen(
        [ACTORS, "serve", APP, "--data-dir", data, "--no-http"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        anyio.run(_running, data)
        server.send_signal(signum)
        _, errors = server.communicate(timeout=60)
    finally:
        server.kill()
    assert server.returncode == 128 + signum, errors
    assert "Traceback" not in errors
    state = anyio.run(_state, data)
    assert (state.status, state.attempts) == ("pending", 0), "released for a redrive"
