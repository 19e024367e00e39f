"""``run_process`` with real child processes: completion, abort (SIGTERM, then SIGKILL after the
grace), the caller's own cancellation, pre-aborted signals, and no zombie left behind."""

from __future__ import annotations

import os
import select
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

from triggers import AbortController, AbortError, AbortSignal, run_process

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs Linux pidfd_open"),
]


class PidPipe:
    """A pipe the child writes pids to, one per line, so the test knows what started."""

    def __init__(self) -> None:
        self.read_fd, write_fd = os.pipe()
        self.writer = os.fdopen(write_fd, "wb")
        self._buffer = b""
        self.seen: list[int] = []

    async def next_pid(self) -> int:
        """Wait for the next pid line the child prints."""
        while b"\n" not in self._buffer:
            chunk = await anyio.to_thread.run_sync(
                os.read, self.read_fd, 64, abandon_on_cancel=True
            )
            assert chunk, "the child exited before printing its pid"
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return int(line)

    async def abort_after_pid(self, controller: AbortController, reason: str) -> None:
        """Abort ``controller`` once the child has printed a pid (kept in ``self.seen``)."""
        self.seen.append(await self.next_pid())
        controller.abort(reason)

    def close(self) -> None:
        self.writer.close()
        os.close(self.read_fd)


@pytest.fixture
async def pids() -> AsyncIterator[PidPipe]:
    pipe = PidPipe()
    yield pipe
    pipe.close()


def reaped(pid: int) -> bool:
    """The process is gone entirely: not running and not a zombie (no /proc entry)."""
    return not Path(f"/proc/{pid}").exists()


def children() -> set[int]:
    """This process's child processes (zombies included)."""
    found: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        found.update(int(pid) for pid in (task / "children").read_text().split())
    return found


async def wait_exited(pid: int) -> None:
    """Wait until ``pid`` (not our child) has exited, through a pidfd."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        readable, _, _ = await anyio.to_thread.run_sync(select.select, [fd], [], [], 30)
        assert readable, f"process {pid} still runs 30 s after its group was stopped"
    finally:
        os.close(fd)


async def test_returns_the_completed_process() -> None:
    """Without an abort the completed process comes back with its output and status."""
    done = await run_process(["sh", "-c", "cat; echo err >&2; exit 3"], input=b"hello")
    assert (done.returncode, done.stdout, done.stderr) == (3, b"hello", b"err\n")
    assert done.args == ["sh", "-c", "cat; echo err >&2; exit 3"]


async def test_a_string_runs_in_the_shell() -> None:
    """A str command goes to the shell; an unaborted signal changes nothing."""
    done = await run_process("echo $((6 * 7))", signal=AbortController().signal)
    assert (done.returncode, done.stdout) == (0, b"42\n")


async def test_check_raises_on_failure() -> None:
    """``check=True`` raises CalledProcessError carrying the status and the output."""
    with pytest.raises(subprocess.CalledProcessError) as caught:
        await run_process(["sh", "-c", "echo out; echo why >&2; exit 5"], check=True)
    assert (caught.value.returncode, caught.value.stdout, caught.value.stderr) == (
        5, b"out\n", b"why\n",
    )  # fmt: skip


async def test_abort_stops_sleep_and_reaps_it(pids: PidPipe) -> None:
    """Aborting the signal of a running ``sleep 30`` stops it with SIGTERM (the grace here is
    far longer than the test may run), reaps it, and raises AbortError with the reason."""
    controller = AbortController()
    command = ["sh", "-c", "echo $$; exec sleep 30"]
    async with anyio.create_task_group() as tg:
        tg.start_soon(pids.abort_after_pid, controller, "user pressed stop")
        with pytest.raises(AbortError) as caught:
            await run_process(command, signal=controller.signal, grace=600, stdout=pids.writer)
    assert caught.value.reason == "user pressed stop"
    (pid,) = pids.seen
    assert reaped(pid), "the aborted child is still running or a zombie"


async def test_sigterm_ignored_is_killed_after_the_grace(pids: PidPipe) -> None:
    """A child that ignores SIGTERM is killed with SIGKILL once the grace has passed."""
    controller = AbortController()
    command = ["sh", "-c", "trap '' TERM; echo $$; exec sleep 30"]
    async with anyio.create_task_group() as tg:
        tg.start_soon(pids.abort_after_pid, controller, "stop")
        with pytest.raises(AbortError):
            await run_process(command, signal=controller.signal, grace=0.05, stdout=pids.writer)
    (pid,) = pids.seen
    assert reaped(pid)


async def test_abort_reaches_the_whole_process_group(pids: PidPipe) -> None:
    """A shell's own children (here a backgrounded sleep) are stopped with it."""
    controller = AbortController()
    command = ["sh", "-c", "sleep 300 & echo $!; wait"]
    async with anyio.create_task_group() as tg:
        tg.start_soon(pids.abort_after_pid, controller, "stop")
        with pytest.raises(AbortError):
            await run_process(command, signal=controller.signal, grace=600, stdout=pids.writer)
    await wait_exited(pids.seen[0])


async def test_pre_aborted_signal_starts_nothing(tmp_path: Path) -> None:
    """An already aborted signal raises AbortError before the command is started."""
    marker = tmp_path / "ran"
    with pytest.raises(AbortError) as caught:
        await run_process(["touch", str(marker)], signal=AbortSignal.abort("too late"))
    assert caught.value.reason == "too late"
    assert not marker.exists()


async def test_timeout_signal_stops_the_command() -> None:
    """An ``AbortSignal.timeout`` stops the command; the reason is a TimeoutError, and no child
    of this process is left, running or zombie."""
    with pytest.raises(AbortError) as caught:
        await run_process(["sleep", "30"], signal=AbortSignal.timeout(0.05))
    assert isinstance(caught.value.reason, TimeoutError)
    assert children() == set()


async def test_cancelling_the_caller_stops_the_command(pids: PidPipe) -> None:
    """Cancelling the caller's own scope (no signal involved) also stops and reaps the child;
    the cancellation propagates as cancellation, not AbortError."""
    command = ["sh", "-c", "echo $$; exec sleep 30"]
    pid = 0
    with anyio.CancelScope() as scope:

        async def cancel_once_started() -> None:
            nonlocal pid
            pid = await pids.next_pid()
            scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_once_started)
            await run_process(command, grace=600, stdout=pids.writer)
    assert scope.cancelled_caught
    assert pid
    assert reaped(pid)


@pytest.mark.parametrize("grace", [-1, float("nan"), float("inf")])
async def test_bad_grace_is_refused(grace: float, tmp_path: Path) -> None:
    """A negative or non-finite grace raises ValueError and starts nothing."""
    marker = tmp_path / "ran"
    with pytest.raises(ValueError, match="grace"):
        await run_process(["touch", str(marker)], grace=grace)
    assert not marker.exists()


async def test_abort_stops_what_an_exited_shell_left_running(pids: PidPipe) -> None:
    """A shell that exits at once, leaving a background child that holds its output open:
    the abort still stops that child (the whole group is signalled, not only the leader)."""
    controller = AbortController()
    command = ["sh", "-c", "sleep 300 & echo $! >&2; exit 0"]
    async with anyio.create_task_group() as tg:
        tg.start_soon(pids.abort_after_pid, controller, "stop")
        with pytest.raises(AbortError):
            await run_process(command, signal=controller.signal, grace=600, stderr=pids.writer)
    await wait_exited(pids.seen[0])
