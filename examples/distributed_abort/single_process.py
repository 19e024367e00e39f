"""A distributed abort controller in one process: create, hand out the signal, abort.

Run it with ``.venv/bin/python examples/distributed_abort/single_process.py``.
"""

from __future__ import annotations

import sys
import tempfile

import anyio
import structlog

from actors import ActorHost, define_agent_do
from triggers import AbortError, DistributedAbortController

AgentDO = define_agent_do()  # the controller's trigger is built into every actor class


async def long_operation(signal_name: str, controller: DistributedAbortController) -> None:
    try:
        with controller.signal.scope():
            await anyio.sleep_forever()  # stand-in for a long model call or HTTP request
    except AbortError as error:
        print(f"{signal_name}: stopped, reason={error.reason!r}")


async def main(data_dir: str) -> None:
    async with ActorHost(AgentDO, data_dir=data_dir) as host:
        # Create a controller with a meaningful id; a second create() gets the same one.
        controller = await DistributedAbortController.create("chat:user-123", host=host)
        same = await DistributedAbortController.create("chat:user-123", host=host)
        print(f"created {controller.id!r} run_id={controller.run_id} same={same.run_id}")
        async with anyio.create_task_group() as tg:
            tg.start_soon(long_operation, "operation", controller)
            await anyio.wait_all_tasks_blocked()
            await controller.abort("User cancelled")  # durable: a ledger fact
        await same.abort("again")  # idempotent: the first reason stays
        with anyio.fail_after(10):
            await same.signal.wait()
        print(f"signal reason after a second abort: {same.signal.reason!r}")


if __name__ == "__main__":
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    directory = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="dac-")
    anyio.run(main, directory)
