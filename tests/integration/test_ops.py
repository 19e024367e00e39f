"""Operating a data directory: a corrupt ledger among many (``actors inspect``, the HTTP event
stream), names with control characters, backslashes or wide characters in tables, following an
actor before its first event, and reading a data directory this process cannot write. The
command line runs as a real subprocess, the HTTP API on a real server."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from ledger import ledger_relpath
from tests.helpers import make_trigger, open_host, open_store
from tests.integration.test_cli import ACTORS, APP, KIND, LATER, ROOT, actors, run_to_end, stop
from tests.integration.test_http import api

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.skipif(ACTORS is None, reason="the actors console script is not installed")


@pytest.fixture
def data(tmp_path: Path) -> str:
    directory = tmp_path / "data"
    directory.mkdir()
    return str(directory)


def enqueue_for(data: str, actor: str, *extra: str) -> int:
    out = actors("enqueue", actor, KIND, "--payload", '{"n": 1}', "--app", APP,
                 "--data-dir", data, "--json", *extra)  # fmt: skip
    return int(json.loads(out.stdout)["intent_event_id"])


def inspect_json(data: str, *, check: int = 0) -> list[dict[str, Any]]:
    reports: list[dict[str, Any]] = json.loads(
        actors("inspect", data, "--json", check=check).stdout
    )["actors"]
    return reports


def start(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    """Start ``actors ARGS`` (after ``prefix``), with Python's fault handler on."""
    assert ACTORS is not None
    return subprocess.Popen(
        [*prefix, ACTORS, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1"},
    )


# -- a corrupt ledger among others ------------------------------------------------------------


def test_inspect_reports_a_corrupt_ledger_and_goes_on(data: str) -> None:
    """A corrupt ledger no longer ends ``inspect``: its actor is reported corrupt (a table
    status, a line on stderr naming the actor and its file, ``status``/``error``/``file`` in
    JSON), every other actor is summarized as usual, and the exit code is 1."""
    for actor in ("a:1", "bad", "z:9"):
        enqueue_for(data, actor, "--at", LATER)
    path = Path(data).resolve() / ledger_relpath("bad")
    path.write_bytes(b"\xff" * 8192)

    result = actors("inspect", data, check=1)
    assert result.stdout, f"nothing reported: {result.stderr}"
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:4]}
    assert rows["a:1"][1] == rows["z:9"][1] == "1", "the others' pending intents"
    assert (rows["a:1"][-1], rows["bad"][-1], rows["z:9"][-1]) == ("ok", "corrupt", "ok")
    assert "3 actors (1 unreadable" in result.stdout
    assert "2 pending" in result.stdout
    assert "'bad' is corrupt" in result.stderr
    assert str(path) in result.stderr

    reports = {r["actor"]: r for r in inspect_json(data, check=1)}
    assert reports["bad"]["status"] == "corrupt"
    assert str(path) in reports["bad"]["error"]
    assert reports["bad"]["intents"] is None
    assert reports["a:1"]["status"] == "ok"
    assert reports["a:1"]["intents"]["pending"] == 1
    assert reports["z:9"]["intents"]["pending"] == 1


@pytest.mark.anyio
async def test_event_stream_of_a_corrupt_ledger_answers_503(tmp_path: Path) -> None:
    """The server-sent event stream of an actor whose ledger is corrupt answers 503
    ``ledger_unavailable`` like the actor's other routes (it answered 200 with an empty
    body); another actor's stream still works."""
    later = datetime(2100, 1, 1, tzinfo=UTC)
    async with open_host(tmp_path, make_trigger(), run_scheduler=False) as host:
        await host.get("bad").enqueue_trigger(trigger_kind="test.work", at=later)
        await host.get("good").enqueue_trigger(trigger_kind="test.work", at=later)
    (tmp_path / ledger_relpath("bad")).write_bytes(b"not a database " * 512)
    async with api(tmp_path) as (client, _):
        events = await client.get("/actors/bad/events")
        assert events.status_code == 503
        assert events.json()["error"] == "ledger_unavailable"
        with anyio.fail_after(10):
            async with client.stream("GET", "/actors/bad/events/stream") as response:
                assert response.status_code == 503
                assert json.loads(await response.aread()) == events.json()
            async with client.stream("GET", "/actors/good/events/stream") as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("id:"):
                        assert line == "id: 1"
                        break


# -- names in tables: control characters, backslashes, wide characters ------------------------

EVIL = "evil\x1b[2J\nname\u202e"
"""An actor name that clears the screen, breaks the line and reverses the text after it."""
REASON = "stop\x1b]0;owned\x07\r"


def test_tables_escape_control_characters_and_json_keeps_them(data: str) -> None:
    """Names and cancel reasons reach tables and messages with their non-printable characters
    escaped; ``--json`` keeps them exactly."""
    enqueued = actors("enqueue", EVIL, KIND, "--payload", '{"n": 1}', "--at", LATER,
                      "--app", APP, "--data-dir", data)  # fmt: skip
    intent = 1
    actors("cancel", EVIL, KIND, str(intent), "--reason", REASON, "--app", APP,
           "--data-dir", data)  # fmt: skip
    shown_name = "evil\\x1b[2J\\nname\\u202e"
    shown_reason = "stop\\x1b]0;owned\\x07\\r"

    inspected = actors("inspect", data).stdout
    intents = actors("intents", EVIL, "--data-dir", data).stdout
    for text in (enqueued.stdout, inspected, intents):
        assert not any(char in text for char in "\x1b\x07\r\u202e"), text
    assert shown_name in enqueued.stdout
    assert inspected.splitlines()[1].startswith(shown_name + " ")
    assert intents.splitlines()[1].split()[-1] == shown_reason
    assert len(intents.splitlines()) == 2, "one line per intent"

    assert [r["actor"] for r in inspect_json(data)] == [EVIL]
    listed = json.loads(actors("intents", EVIL, "--data-dir", data, "--json").stdout)
    assert listed[0]["cancel_reason"] == REASON


def test_a_backslash_is_escaped_so_no_two_names_show_alike(data: str) -> None:
    """A backslash shows doubled: a name holding the four characters ``\\x1b`` and one holding
    an ESC show differently in tables and messages (they showed alike); messages quote a
    name as tables show it; ``--json`` keeps both exactly."""
    literal, escape = "lit\\x1b", "lit\x1b"
    enqueued = actors("enqueue", literal, KIND, "--payload", '{"n": 1}', "--at", LATER,
                      "--app", APP, "--data-dir", data)  # fmt: skip
    enqueue_for(data, escape, "--at", LATER)
    assert enqueued.stdout.strip().endswith(" for lit\\\\x1b")

    rows = actors("inspect", data).stdout.splitlines()[1:3]
    assert sorted(row.split()[0] for row in rows) == ["lit\\\\x1b", "lit\\x1b"]
    missing = actors("intents", "no\\x1b", "--data-dir", data, check=3).stderr
    assert "no actor named 'no\\\\x1b' in " in missing
    assert sorted(r["actor"] for r in inspect_json(data)) == [escape, literal]


def test_table_columns_count_terminal_cells(data: str) -> None:
    """Columns line up on a terminal whatever the names hold: a wide character (CJK, emoji)
    takes two cells and a combining accent none (the padding counted code points)."""
    padding = {"ACTOR": 1, "日本語": 0, "😀x": 3, "e\u0301": 5, "abcd": 2}  # to 6 cells
    for name in padding.keys() - {"ACTOR"}:
        enqueue_for(data, name, "--at", LATER)
    header, *rows = actors("inspect", data).stdout.splitlines()[:5]
    assert header.startswith("ACTOR" + " " * padding["ACTOR"] + "  PENDING  ")
    for row in rows:
        name = row.split()[0]
        assert row.startswith(name + " " * padding[name] + "  1  "), row


# -- following an actor before its first event ------------------------------------------------


def test_events_follow_waits_for_an_actor_without_a_ledger(data: str) -> None:
    """``events --follow`` of an actor that has no ledger yet says so and waits: it prints
    the first events once another process records them (it used to exit 3)."""
    follower = start("events", "later:1", "--follow", "--json", "--data-dir", data)
    try:
        assert follower.stderr is not None
        assert follower.stdout is not None
        note = follower.stderr.readline()
        assert "no actor named 'later:1' yet; waiting for its first events" in note
        intent = enqueue_for(data, "later:1", "--at", LATER)
        first = json.loads(follower.stdout.readline())
        assert (first["id"], first["intent_event_id"]) == (intent, intent)
    finally:
        assert stop(follower) == 130


# -- a data directory this process cannot write -----------------------------------------------


def without_write_access() -> tuple[str, ...]:
    """The prefix that runs a command unable to write what file permissions forbid.

    Nothing for a user other than root. Root writes read-only files anyway
    (``CAP_DAC_OVERRIDE``): for root, ``setpriv`` drops every capability of the command, which
    then obeys the permissions as their owner; the test is skipped if it cannot.
    """
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root, whom file permissions do not stop, without setpriv")
    prefix = (setpriv, "--bounding-set=-all", "--inh-caps=-all", "--")
    if subprocess.run([*prefix, "true"], check=False).returncode != 0:
        pytest.skip("running as root, whom file permissions do not stop, and setpriv cannot drop")
    return prefix


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """``directory`` and everything in it read-only (as a backup or another user's files),
    writable again on exit."""
    paths = [directory, *directory.rglob("*")]
    modes = {path: stat.S_IMODE(path.stat().st_mode) for path in paths}
    for path, mode in modes.items():
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        yield
    finally:
        for path, mode in modes.items():
            with contextlib.suppress(FileNotFoundError):
                path.chmod(mode)


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``directory`` with its size and modification time."""
    return {
        str(path): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in directory.rglob("*")
        if path.is_file()
    }


def test_reads_work_on_a_data_directory_the_process_cannot_write(data: str) -> None:
    """``inspect``, ``intents``, ``events`` and ``stream`` read a data directory they cannot
    write (they used to fail registering in index.db) and change nothing in it; a write
    still fails there (exit 1), which shows the directory really is read-only to them."""
    prefix = without_write_access()
    (intent,) = anyio.run(run_to_end, data, {"n": 2})
    directory = Path(data)

    def run(*args: str, check: int = 0) -> subprocess.CompletedProcess[str]:
        assert ACTORS is not None
        result = subprocess.run(
            [*prefix, ACTORS, *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert result.returncode == check, (result.returncode, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
        return result

    with read_only(directory):
        before = snapshot(directory)
        report = json.loads(run("inspect", data, "--json").stdout)
        assert report["actors"][0]["intents"]["completed"] == 1
        assert "completed" in run("intents", "chat:1", "--data-dir", data).stdout
        events = json.loads(run("events", "chat:1", "--json", "--data-dir", data).stdout)
        assert [e["id"] for e in events] == [1, 2]
        chunks = run("stream", "chat:1", str(intent), "--data-dir", data).stdout.splitlines()
        assert [json.loads(c) for c in chunks] == [{"chunk": 0}, {"chunk": 1}]
        refused = run("enqueue", "chat:1", KIND, "--payload", '{"n": 1}', "--app", APP,
                      "--data-dir", data, check=1)  # fmt: skip
        assert "readonly" in refused.stderr
        assert snapshot(directory) == before, "a read changed the data directory"


def test_following_a_data_directory_the_process_cannot_write(data: str) -> None:
    """``events --follow`` on a data directory it cannot write prints what is there, then
    what another process (one that may write) records later: no reader's view is kept
    beyond one read, so none goes stale."""
    prefix = without_write_access()
    enqueue_for(data, "chat:1", "--at", LATER)
    directory = Path(data)
    with read_only(directory):
        follower = start("events", "chat:1", "--follow", "--json", "--data-dir", data,
                         prefix=prefix)  # fmt: skip
        try:
            assert follower.stdout is not None
            assert json.loads(follower.stdout.readline())["id"] == 1
            with writable(directory):
                second = enqueue_for(data, "chat:1", "--at", LATER)
            assert json.loads(follower.stdout.readline())["id"] == second
        finally:
            assert stop(follower, signal.SIGTERM) == 128 + signal.SIGTERM


@contextlib.contextmanager
def writable(directory: Path) -> Iterator[None]:
    """Inside ``read_only(directory)``: writable by its owner for a while (the test's own
    writes; root needs no such thing, but it does no harm)."""
    paths = [directory, *directory.rglob("*")]
    for path in paths:
        path.chmod(stat.S_IMODE(path.stat().st_mode) | stat.S_IWUSR)
    try:
        yield
    finally:
        for path in [directory, *directory.rglob("*")]:
            path.chmod(stat.S_IMODE(path.stat().st_mode) & ~stat.S_IWUSR)


SNAPSHOT_READER = """
import json, sys
import anyio
from ledger import LedgerStore

async def main(data_dir):
    runs = []

    def op(tx):
        runs.append(1)
        if len(runs) == 1:
            print("reading", flush=True)
            sys.stdin.readline()  # the test changes the ledger meanwhile
        return [event.id for event in tx.events()]

    async with LedgerStore(data_dir, projections=(), read_only=True) as store:
        ids = await store.run("chat:1", op, write=False, create=False)
    print(json.dumps({"runs": len(runs), "ids": ids}), flush=True)

anyio.run(main, sys.argv[1])
"""


@pytest.mark.anyio
async def test_a_snapshot_read_that_a_writer_changes_meanwhile_is_read_again(
    tmp_path: Path,
) -> None:
    """A reader that cannot write reads a ledger no writer has open as a snapshot (no locks);
    if a writer changes the file during that read, what was read may be torn, so it is read
    again rather than answered (or taken for corruption)."""
    prefix = without_write_access()
    directory = tmp_path / "data"

    def insert(tx: Any) -> Any:
        return tx.insert_event("note", {"n": 1})

    async with open_store(directory) as store:
        await store.run("chat:1", insert)
    script = tmp_path / "reader.py"
    script.write_text(SNAPSHOT_READER)
    with (
        read_only(directory),
        subprocess.Popen(
            [*prefix, sys.executable, str(script), str(directory)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        ) as reader,
    ):
        assert reader.stdout is not None
        assert reader.stdin is not None
        assert reader.stdout.readline() == "reading\n"
        with writable(directory):
            async with open_store(directory) as store:
                await store.run("chat:1", insert)
        assert not Path(f"{ledger_path(directory)}-wal").exists()
        reader.stdin.write("go on\n")
        reader.stdin.flush()
        result = json.loads(reader.stdout.readline())
    assert result == {"runs": 2, "ids": [1, 2]}


def ledger_path(directory: Path) -> Path:
    return directory / ledger_relpath("chat:1")


def test_reads_work_when_only_the_ledgers_are_read_only(data: str) -> None:
    """With the data directory and ``index.db`` writable but the ledgers' ``actors``
    directory not, the reading commands still read (they used to fail opening a ledger for
    writing)."""
    prefix = without_write_access()
    (intent,) = anyio.run(run_to_end, data, {"n": 1})
    with read_only(Path(data) / "actors"):
        result = subprocess.run(
            [*prefix, str(ACTORS), "events", "chat:1", "--json", "--data-dir", data],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    assert result.returncode == 0, result.stderr
    assert [event["id"] for event in json.loads(result.stdout)][:1] == [intent]


def test_a_ledger_it_may_not_read_is_reported_as_unreadable(data: str) -> None:
    """A ledger file this process may not open (mode 000) is ``unreadable`` in ``inspect``,
    with a message that says reading failed, not writing."""
    prefix = without_write_access()
    anyio.run(run_to_end, data, {"n": 1})
    path = Path(data) / ledger_relpath("chat:1")
    mode = stat.S_IMODE(path.stat().st_mode)
    path.chmod(0)
    try:
        with read_only(Path(data)):
            result = subprocess.run(
                [*prefix, str(ACTORS), "inspect", data, "--json"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
    finally:
        path.chmod(mode)
    assert result.returncode == 1, result.stderr
    (actor,) = json.loads(result.stdout)["actors"]
    assert actor["status"] == "unreadable"
    assert actor["error"].startswith(f"could not read ledger file {path}: cannot open")
    assert "written" not in actor["error"]
