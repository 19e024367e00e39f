"""``ActorHost(gc_threshold=)``: the cyclic collector's first threshold is raised while hosts
run, and what was there before comes back after the last one."""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Any

import pytest

from actors import ActorHost, define_agent_do
from tests.helpers import make_trigger, open_host

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.anyio

DEFAULT = (700, 10, 10)


@pytest.fixture(autouse=True)
def _thresholds() -> Iterator[None]:
    """Each test starts from CPython's defaults and leaves the process as it found it."""
    found = gc.get_threshold()
    gc.set_threshold(*DEFAULT)
    yield
    gc.set_threshold(*found)


async def test_a_running_host_raises_the_first_threshold_and_puts_it_back(
    tmp_path: Path,
) -> None:
    async with open_host(tmp_path, make_trigger()):
        assert gc.get_threshold() == (10_000, 10, 10)
    assert gc.get_threshold() == DEFAULT
    async with open_host(tmp_path, make_trigger(), gc_threshold=2_500, run_scheduler=False):
        assert gc.get_threshold() == (2_500, 10, 10), "a client raises it too"
    assert gc.get_threshold() == DEFAULT


async def test_none_leaves_the_collector_alone(tmp_path: Path) -> None:
    async with open_host(tmp_path, make_trigger(), gc_threshold=None):
        assert gc.get_threshold() == DEFAULT


async def test_a_higher_threshold_is_kept(tmp_path: Path) -> None:
    gc.set_threshold(50_000, 5, 5)
    async with open_host(tmp_path, make_trigger()):
        assert gc.get_threshold() == (50_000, 5, 5)
    assert gc.get_threshold() == (50_000, 5, 5)


async def test_the_last_host_to_stop_restores_the_thresholds(tmp_path: Path) -> None:
    async with open_host(tmp_path / "a", make_trigger()):
        async with open_host(tmp_path / "b", make_trigger(), gc_threshold=20_000):
            assert gc.get_threshold() == (20_000, 10, 10)
        assert gc.get_threshold() == (20_000, 10, 10), "another host still runs"
    assert gc.get_threshold() == DEFAULT


async def test_thresholds_changed_while_a_host_runs_are_kept(tmp_path: Path) -> None:
    async with open_host(tmp_path, make_trigger()):
        gc.set_threshold(3_000, 4, 4)
    assert gc.get_threshold() == (3_000, 4, 4)


async def test_a_host_that_fails_to_start_leaves_the_thresholds(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    host = ActorHost(define_agent_do(triggers=[make_trigger()]), data_dir=not_a_directory)
    with pytest.raises(FileExistsError):
        async with host:
            pass
    assert gc.get_threshold() == DEFAULT
    async with open_host(tmp_path / "ok", make_trigger()):
        assert gc.get_threshold() == (10_000, 10, 10), "the failed start left no holder"
    assert gc.get_threshold() == DEFAULT


@pytest.mark.parametrize(
    ("value", "error"),
    [(0, ValueError), (-5, ValueError), (True, TypeError), (1.5, TypeError), ("10", TypeError)],
)
def test_bad_thresholds_are_refused(tmp_path: Path, value: Any, error: type[Exception]) -> None:
    spec = define_agent_do(triggers=[make_trigger()])
    with pytest.raises(error, match="gc_threshold"):
        ActorHost(spec, data_dir=tmp_path, gc_threshold=value)
    assert gc.get_threshold() == DEFAULT
    assert not any(tmp_path.iterdir()), "nothing was created"
