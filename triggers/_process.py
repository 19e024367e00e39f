"""``run_process``: a subprocess that really stops when its signal aborts."""

from __future__ import annotations

import contextlib
import math
import os
import signal as signals
from pathlib import Path
from subprocess import DEVNULL, PIPE, CalledProcessError, CompletedProcess
from typing import IO, TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from anyio.abc import ByteReceiveStream, ByteSendStream, Process

    from ._abort import AbortSignal

    Command = str | bytes | os.PathLike[str] | Sequence[str | bytes | os.PathLike[str]]

__all__ = ["run_process"]

_GROUP_POLL_S = 0.01


async def run_process(
    command: Command,
    *,
    signal: AbortSignal | None = None,
    grace: float = 2.0,
    input: bytes | None = None,
    stdout: int | IO[Any] | None = PIPE,
    stderr: int | IO[Any] | None = PIPE,
    check: bool = False,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> CompletedProcess[bytes]:
    """Run a command to completion, or stop it when ``signal`` aborts.

    The command runs in a new session (its own process group), so a shell command and the
    programs it starts are stopped together. On abort, or when the caller's own cancel scope
    is cancelled, the group gets ``SIGTERM``; whatever still runs after ``grace`` seconds gets
    ``SIGKILL``; the child is always reaped before this returns or raises.

    Args:
        command: a string for the shell, or a program and its arguments.
        signal: stops the command when it aborts. If it is already aborted, nothing is
            started.
        grace: seconds between ``SIGTERM`` and ``SIGKILL``.
        input: bytes fed to the command's standard input (otherwise it reads nothing).
        stdout: ``PIPE`` (captured, the default), ``DEVNULL``, ``None`` or a file.
        stderr: like ``stdout``; ``subprocess.STDOUT`` merges it into standard output.
        check: raise ``CalledProcessError`` on a non-zero exit status.
        cwd: the working directory.
        env: the whole environment (replaces this process's).

    Returns:
        The completed process, with captured output as bytes.

    Raises:
        AbortError: ``signal`` aborted (with its reason); the command was stopped and reaped.
        CalledProcessError: ``check`` is set and the command exited with a non-zero status.
        ValueError: ``grace`` is negative or not finite.
        OSError: the command could not be started.
    """
    if not (isinstance(grace, int | float) and math.isfinite(grace) and grace >= 0):
        raise ValueError(f"grace must be a finite number of seconds >= 0, not {grace!r}")
    if signal is not None:
        signal.throw_if_aborted()
    process = await anyio.open_process(
        command,
        stdin=DEVNULL if input is None else PIPE,
        stdout=stdout,
        stderr=stderr,
        cwd=cwd,
        env=env,
        start_new_session=True,
    )
    outputs: list[bytes | None] = [None, None]
    try:
        with contextlib.nullcontext() if signal is None else signal.scope():
            async with anyio.create_task_group() as tg:
                if process.stdout is not None:
                    tg.start_soon(_drain, process.stdout, outputs, 0)
                if process.stderr is not None:
                    tg.start_soon(_drain, process.stderr, outputs, 1)
                if process.stdin is not None and input is not None:
                    tg.start_soon(_feed, process.stdin, input)
                await process.wait()
    except BaseException:
        with anyio.CancelScope(shield=True):
            await _stop(process, grace)
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await process.aclose()
    returncode = process.returncode
    assert returncode is not None
    if check and returncode != 0:
        raise CalledProcessError(returncode, command, outputs[0], outputs[1])
    return CompletedProcess(command, returncode, outputs[0], outputs[1])


async def _drain(stream: ByteReceiveStream, outputs: list[bytes | None], index: int) -> None:
    chunks = [chunk async for chunk in stream]
    outputs[index] = b"".join(chunks)


async def _feed(stream: ByteSendStream, data: bytes) -> None:
    # A command that exits without reading its input closes the pipe: not an error.
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
        await stream.send(data)
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
        await stream.aclose()


async def _stop(process: Process, grace: float) -> None:
    """SIGTERM the command's process group, SIGKILL what is left after ``grace``, reap the
    child.

    The group is signalled even when the child itself has already exited: what it started in
    the background (``cmd &``) is stopped too.
    """
    pid = process.pid
    _signal_group(pid, signals.SIGTERM)
    with anyio.move_on_after(grace):
        await process.wait()
        # No event tells when a process group empties: look every 10 ms, within the grace.
        while _group_running(pid):  # noqa: ASYNC110
            await anyio.sleep(_GROUP_POLL_S)
        return
    _signal_group(pid, signals.SIGKILL)
    await process.wait()


def _signal_group(pid: int, signum: int) -> None:
    # The child leads its own session, so its process group id is its pid (and that id is not
    # reused while the group has members).
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signum)


def _group_running(pgid: int) -> bool:
    """Whether a process of the group still runs (zombies waiting for a reaper do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesized command: state, ppid, pgrp, ...
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
