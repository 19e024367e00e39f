"""Shared test configuration: anyio on asyncio, the --long flag, and the storage backends.

Test modules marked ``contract`` run every test twice: on SQLite files and on a throwaway
PostgreSQL database. ``tests.helpers.open_host(tmp_path, ...)`` opens the host on the backend
of the running test, so one suite states the semantics both backends must share. Tests that
look at SQLite files themselves are marked ``sqlite_only``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests import helpers
from tests.postgres import INSTALL, PostgresServer, find_bindir
from tests.system import REQUIRED

if TYPE_CHECKING:
    from collections.abc import Iterator

BACKENDS = ("sqlite", "postgres")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", help="run long soak tests")
    parser.addoption(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="run contract tests on this backend only (default: both)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames and metafunc.definition.get_closest_marker("contract"):
        chosen = metafunc.config.getoption("--backend")
        metafunc.parametrize("backend", [chosen] if chosen else BACKENDS, indirect=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="soak test: run with --long")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server for the session (started on first use)."""
    bindir = find_bindir()
    if bindir is None:
        message = f"PostgreSQL server binaries are not installed ({INSTALL})"
        if REQUIRED:
            pytest.fail(message + "; DURABLE_TRIGGERS_REQUIRE_SYSTEM=1 requires them")
        pytest.skip(message)
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def database_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty database on the session's server."""
    return postgres_server.create_database()


@pytest.fixture(autouse=True)
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """The storage backend of this test: ``sqlite`` unless a contract test asks otherwise."""
    name: str = getattr(request, "param", "sqlite")
    if name == "postgres":
        if request.node.get_closest_marker("sqlite_only"):
            pytest.skip("looks at SQLite files themselves")
        helpers.DATABASE_URL = request.getfixturevalue("database_url")
    try:
        yield name
    finally:
        helpers.DATABASE_URL = None
