"""Three processes, one controller, no run id passed around: A works, B aborts, C listens.

Run it with ``.venv/bin/python examples/distributed_abort/cross_process.py``. This process
starts A and C as subprocesses (``--role``), waits until both are listening, then acts as B.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile

import anyio
import structlog

from actors import ActorHost, define_agent_do
from triggers import AbortError, DistributedAbortController

AgentDO = define_agent_do()
ID = "task:build-123"


async def role_a(data_dir: str) -> None:
    """Process A: create the controller and run a long operation with its signal."""
    async with ActorHost(AgentDO, data_dir=data_dir, run_scheduler=False) as host:
        controller = await DistributedAbortController.create(ID, host=host)
        print("A: building", flush=True)
        try:
            with controller.signal.scope():
                await anyio.sleep_forever()
        except AbortError as error:
            print(f"A: build stopped, reason={error.reason!r}", flush=True)


async def role_c(data_dir: str) -> None:
    """Process C: reconnect by id and listen."""
    async with ActorHost(AgentDO, data_dir=data_dir, run_scheduler=False) as host:
        controller = await DistributedAbortController.create(ID, host=host)
        fired = anyio.Event()
        controller.signal.add_listener(lambda signal: fired.set())
        print("C: listening", flush=True)
        await fired.wait()
        print(f"C: task was cancelled, reason={controller.signal.reason!r}", flush=True)


async def main(data_dir: str) -> None:
    children = [
        subprocess.Popen(
            [sys.executable, __file__, "--role", role, data_dir], stdout=subprocess.PIPE, text=True
        )
        for role in ("a", "c")
    ]
    for child in children:  # wait until each says it is ready
        assert child.stdout is not None
        print(await anyio.to_thread.run_sync(child.stdout.readline), end="")
    # Process B: reconnect by id and abort.
    async with ActorHost(AgentDO, data_dir=data_dir, run_scheduler=False) as host:
        controller = await DistributedAbortController.create(ID, host=host)
        await controller.abort("Cancelled by admin")
        print("B: aborted", flush=True)
    for child in children:
        assert child.stdout is not None
        print(await anyio.to_thread.run_sync(child.stdout.read), end="")
        child.wait(timeout=30)


if __name__ == "__main__":
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    if len(sys.argv) > 2 and sys.argv[1] == "--role":
        anyio.run(role_a if sys.argv[2] == "a" else role_c, sys.argv[3])
    else:
        directory = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="dac-x-")
        anyio.run(main, directory)
