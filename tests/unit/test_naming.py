"""Actor names to ledger file paths: any name maps to its own file inside ``data_dir``."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger import ledger_relpath
from tests.helpers import DONE, make_trigger, open_host

if TYPE_CHECKING:
    from actors import ActorHost

pytestmark = pytest.mark.anyio

HOSTILE_NAMES = [
    "chat:123",
    "a/b",
    "a_b",
    "a?b",
    "a\\b",
    "a b",
    "..",
    ".",
    "...",
    "../../etc/passwd",
    "/etc/passwd",
    "/",
    "./x",
    "x/../../y",
    ".hidden",
    "..hidden",
    "~root",
    "$HOME",
    "C:\\Windows\\system32",
    "con",
    "NUL",
    "Chat",
    "chat",
    "CHAT",
    "héllo wörld",
    "日本語のチャット",
    "emoji \U0001f600",
    "\u202eevil",
    "tab\tnew\nline",
    "\x01\x7f",
    "x" * 1024,
    "y" * 10 * 1024,
    "é" * 5000,
]
LONE_SURROGATES = ["\ud800", "a\udfffb", "\udc00../.."]


def assert_safe(path: PurePosixPath) -> None:
    """The path is relative, under ``actors/xx/`` and has no ``..`` or empty component."""
    assert isinstance(path, PurePosixPath)
    assert not path.is_absolute()
    assert ".." not in path.parts
    assert len(path.parts) == 3
    assert path.parts[0] == "actors"
    assert len(path.parts[1]) == 2
    assert all(c in "0123456789abcdef" for c in path.parts[1])
    name = path.parts[2]
    assert name.endswith(".db")
    assert not name.startswith(".")
    assert "/" not in name
    assert "\\" not in name
    assert "\x00" not in name
    # Every file system in common use allows 255 bytes per component.
    assert len(name.encode()) <= 255
    # The OS agrees: joined to a base directory it stays inside it.
    base = Path("/data")
    assert os.path.normpath(base / path).startswith("/data/actors/")


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=range(len(HOSTILE_NAMES)))
def test_hostile_names_stay_inside_actors_dir(name: str) -> None:
    """Slashes, dots, absolute paths, unicode and huge names all map inside actors/xx/."""
    assert_safe(ledger_relpath(name))


def test_hostile_names_are_pairwise_distinct() -> None:
    """No two distinct names (incl. case and slug-colliding ones) share a ledger file."""
    paths = [ledger_relpath(name) for name in HOSTILE_NAMES]
    assert len(set(paths)) == len(HOSTILE_NAMES)
    # Case-insensitive file systems (macOS, Windows) must not merge them either.
    assert len({str(p).lower() for p in paths}) == len(HOSTILE_NAMES)


def test_slug_colliding_names_differ() -> None:
    """'a/b', 'a_b' and 'a?b' share a readable slug but never a path."""
    paths = {ledger_relpath(n) for n in ("a/b", "a_b", "a?b", "a:b", "a b")}
    assert len(paths) == 5


def test_mapping_is_deterministic() -> None:
    """The same name always maps to the same path (a restarted host finds its ledgers)."""
    for name in HOSTILE_NAMES:
        assert ledger_relpath(name) == ledger_relpath(str(name))


def test_readable_slug_is_kept_for_plain_names() -> None:
    """A plain name keeps a readable slug in the file name."""
    assert ledger_relpath("tenant-42").name.startswith("tenant-42-")


@pytest.mark.parametrize("name", LONE_SURROGATES, ids=range(len(LONE_SURROGATES)))
def test_lone_surrogates_are_safe_or_refused(name: str) -> None:
    """A name with a lone surrogate maps to a safe path or is refused with ValueError."""
    try:
        path = ledger_relpath(name)
    except ValueError:
        return
    assert_safe(path)


def test_empty_name_is_refused() -> None:
    """An empty name raises ValueError."""
    with pytest.raises(ValueError, match="empty"):
        ledger_relpath("")


@pytest.mark.parametrize("name", ["\x00", "a\x00b", "ok\x00"])
def test_nul_is_refused(name: str) -> None:
    """A name holding NUL raises ValueError."""
    with pytest.raises(ValueError, match="NUL"):
        ledger_relpath(name)


@pytest.mark.parametrize("name", [None, 1, b"bytes", ["a"], Path("a")])
def test_non_str_is_refused(name: Any) -> None:
    """A name that is not a str raises TypeError saying so (an unhashable one too: the check
    comes before the cache)."""
    with pytest.raises(TypeError, match="actor name must be a str"):
        ledger_relpath(name)


def test_a_cached_path_is_the_path() -> None:
    """The cache gives back the very path computed the first time, for every caller."""
    first = ledger_relpath("cached-name")
    assert ledger_relpath("cached-name") is first
    assert first == PurePosixPath("actors", first.parts[1], first.name)


names = st.text(min_size=1, max_size=300).filter(lambda s: "\x00" not in s)


@given(names, names)
def test_random_names_are_safe_and_distinct(a: str, b: str) -> None:
    """For any two names both paths stay inside; distinct names get distinct paths."""
    pa, pb = ledger_relpath(a), ledger_relpath(b)
    assert_safe(pa)
    assert_safe(pb)
    assert (pa == pb) == (a == b)


@given(st.lists(st.sampled_from("a/_?.:A\\ é"), min_size=1, max_size=6), st.data())
def test_near_collisions_are_distinct(chars: list[str], data: st.DataObject) -> None:
    """Names built from slug-mapped characters never collide unless equal."""
    a = "".join(chars)
    b = "".join(data.draw(st.lists(st.sampled_from("a/_?.:A\\ é"), min_size=1, max_size=6)))
    assert (ledger_relpath(a) == ledger_relpath(b)) == (a == b)


# -- through a real host ---------------------------------------------------------------------


def files_under(root: Path) -> list[Path]:
    found = []
    for dirpath, _dirs, files in os.walk(root):
        found += [Path(dirpath, f) for f in files]
    return found


async def roundtrip(host: ActorHost, names: list[str]) -> dict[str, int]:
    """Enqueue one intent per name, wait for each, return name -> intent id."""
    ids: dict[str, int] = {}
    for i, name in enumerate(names):
        intent = await host.get(name).enqueue_trigger(trigger_kind="test.work", payload={"i": i})
        ids[name] = intent.id
    with anyio.fail_after(20):
        for name, intent_id in ids.items():
            state = await host.get(name).wait_for_intent(intent_id)
            assert state.status == "completed"
    return ids


async def test_host_keeps_every_name_inside_data_dir(tmp_path: Path) -> None:
    """Hostile names create files only under data_dir, each reading back its own events."""
    outside = tmp_path / "outside"
    outside.mkdir()
    data_dir = outside / "data"
    async with open_host(data_dir, make_trigger()) as host:
        await roundtrip(host, HOSTILE_NAMES)
        for i, name in enumerate(HOSTILE_NAMES):
            events = await host.get(name).events()
            assert [e.kind for e in events] == ["test.work.requested", DONE]
            assert events[0].payload == {"i": i}
    # Nothing escaped: every file under tmp_path is under data_dir.
    for path in files_under(tmp_path):
        assert path.resolve().is_relative_to(data_dir.resolve()), path
    ledgers = [p for p in files_under(data_dir / "actors") if p.suffix == ".db"]
    assert len(ledgers) == len(HOSTILE_NAMES)


async def test_names_survive_a_restart(tmp_path: Path) -> None:
    """A new host on the same data_dir finds each name's own ledger again."""
    async with open_host(tmp_path, make_trigger()) as host:
        ids = await roundtrip(host, ["a/b", "a_b", "a?b", "A/B"])
    async with open_host(tmp_path, make_trigger(), run_scheduler=False) as host:
        for i, (name, intent_id) in enumerate(ids.items()):
            events = await host.get(name).events()
            assert events[0].id == intent_id
            assert events[0].payload == {"i": i}


SURROGATE_SCRIPT = """
import sys
from pathlib import Path

import anyio
import pytest

from ledger import ledger_relpath
from tests.helpers import DONE, make_trigger, open_host
from tests.unit.test_naming import roundtrip

async def main(data_dir: Path, name: str) -> None:
    async with open_host(data_dir / repr(name), make_trigger()) as host:
        try:
            ledger_relpath(name)
        except ValueError:
            with pytest.raises(ValueError, match="actor name"):
                host.get(name)
        else:
            await roundtrip(host, [name])
            events = await host.get(name).events()
            assert [e.kind for e in events] == ["test.work.requested", DONE]
        await roundtrip(host, ["plain"])
    print("OK")

for escaped in sys.argv[2:]:
    anyio.run(main, Path(sys.argv[1]), escaped.encode("ascii").decode("unicode_escape"))
"""


async def test_host_handles_lone_surrogates(tmp_path: Path) -> None:
    """A lone-surrogate name is refused by host.get (ValueError) or fully works; the host
    survives either way, keeps serving other actors and shuts down.

    Runs in a child process: when the host mishandles such a name its shutdown can hang
    (shielded), which no cancel scope here could bound.
    """
    escaped = [name.encode("unicode_escape").decode("ascii") for name in LONE_SURROGATES]
    with anyio.move_on_after(20) as scope:
        result = await anyio.run_process(
            [sys.executable, "-c", SURROGATE_SCRIPT, str(tmp_path / "data"), *escaped],
            check=False,
            cwd=Path(__file__).parents[2],
        )
    assert not scope.cancelled_caught, "the host hung (shutdown never finished)"
    output = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, output[-3000:]
    assert result.stdout.decode().count("OK") == len(LONE_SURROGATES)
    for path in files_under(tmp_path):
        assert path.resolve().is_relative_to(tmp_path.resolve())


@pytest.mark.parametrize(
    ("name", "error"), [("", ValueError), ("a\x00", ValueError), (7, TypeError)]
)
def test_host_get_refuses_bad_names(tmp_path: Path, name: Any, error: type[Exception]) -> None:
    """host.get refuses empty, NUL-holding and non-str names before touching disk."""
    from actors import ActorHost, define_agent_do

    host = ActorHost(define_agent_do(triggers=[make_trigger()]), data_dir=tmp_path / "d")
    with pytest.raises(error):
        host.get(name)
    assert not (tmp_path / "d").exists()


def test_combinations_of_hostile_names_are_distinct() -> None:
    """Concatenations of hostile fragments never collide (the hash covers the exact name)."""
    fragments = ["a", "/", "_", "?", "..", "A", "é"]
    names_ = {"".join(p) for p in itertools.product(fragments, repeat=3)}
    assert len({ledger_relpath(n) for n in names_}) == len(names_)
