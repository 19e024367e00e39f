"""A throwaway PostgreSQL server for tests and benchmarks, from the installed server binaries.

``PostgresServer`` runs ``initdb`` on a temporary directory, starts ``postgres`` on a free port
of 127.0.0.1 (and a Unix socket in the same directory), and removes everything on ``stop``.
Nothing is read from or written to a system cluster. As root, the server runs as the
``postgres`` account (``initdb`` refuses root), which Debian's packages create.

On a machine without the binaries the PostgreSQL tier is skipped, saying what to install;
with ``DURABLE_TRIGGERS_REQUIRE_SYSTEM=1`` (set by ``.ci/run``) it fails instead.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

INSTALL = "apt-get install postgresql"


def find_bindir() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``, or None."""
    candidates: list[Path] = []
    env = os.environ.get("DURABLE_TRIGGERS_PG_BINDIR")
    if env:
        candidates.append(Path(env))
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version, reverse=True)
    candidates += versions
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True
            ).stdout.strip()
            candidates.append(Path(out))
    for directory in candidates:
        if all((directory / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return directory
    return None


def _version(path: Path) -> float:
    try:
        return float(path.parent.name)
    except ValueError:
        return 0.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """One throwaway server; ``start()`` then ``url(database)``, ``create_database``, ``stop()``."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="dt-pg-"))
        self.data = self.root / "data"
        self.port = 0
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            self._user = pwd.getpwnam("postgres")
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
        self._counter = 0

    def _run(self, *args: str | Path) -> None:
        user = self._user

        def demote() -> None:
            if user is not None:
                os.setgid(user.pw_gid)
                os.setuid(user.pw_uid)

        result = subprocess.run(
            [str(a) for a in args],
            capture_output=True,
            text=True,
            preexec_fn=demote,
            cwd=self.root,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{Path(str(args[0])).name} failed: {result.stderr or result.stdout}"
            )

    def start(self) -> None:
        """initdb and start the server; returns once it accepts connections."""
        self._run(
            self.bindir / "initdb", "-D", self.data, "-U", "postgres", "-A", "trust",
            "--no-sync", "-E", "UTF8", "--locale=C",
        )  # fmt: skip
        self.port = _free_port()
        self.resume()

    def resume(self) -> None:
        """Start the server (initialized, stopped by ``halt``) on its port; returns once it
        accepts connections."""
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            f"-c unix_socket_directories={self.root} -c fsync=on -c max_connections=200 "
            "-c shared_buffers=64MB"
        )
        self._run(
            self.bindir / "pg_ctl", "-D", self.data, "-l", self.root / "log", "-w", "-t", "60",
            "-o", options, "start",
        )  # fmt: skip

    def halt(self) -> None:
        """Stop the server (fast: connections are cut), keeping its files for ``resume``."""
        self._run(self.bindir / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def restart(self) -> None:
        """Stop (fast: connections are cut) and start again on the same port."""
        self._run(
            self.bindir / "pg_ctl", "-D", self.data, "-l", self.root / "log", "-m", "fast", "-w",
            "restart",
        )  # fmt: skip

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        self._counter += 1
        name = f"t{self._counter}"
        self._run(self.bindir / "psql" if (self.bindir / "psql").exists() else "psql",
                  "-h", self.root, "-p", str(self.port), "-U", "postgres", "-q",
                  "-c", f"CREATE DATABASE {name}")  # fmt: skip
        return self.url(name)

    def stop(self) -> None:
        """Stop the server and remove its files."""
        if self.port:
            with contextlib.suppress(RuntimeError):
                self._run(self.bindir / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
