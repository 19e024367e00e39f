"""Custom TTLs: a controller that expires by itself fires with a reason ending "(expired)".

Run it with ``.venv/bin/python examples/distributed_abort/custom_ttl.py``. A host running the
scheduler carries out the expiry (the TTL is a due time, not a sleeping task).
"""

from __future__ import annotations

import sys
import tempfile
from datetime import timedelta

import anyio
import structlog

from actors import ActorHost, define_agent_do
from triggers import DistributedAbortController

AgentDO = define_agent_do()


async def main(data_dir: str) -> None:
    async with ActorHost(AgentDO, data_dir=data_dir) as host:
        # Short-lived controller for a quick operation (here half a second, to see it expire).
        short_lived = await DistributedAbortController.create(
            "quick-task", host=host, ttl=0.5, grace=timedelta(minutes=5)
        )
        # Long-lived controller for batch jobs (7 days).
        long_lived = await DistributedAbortController.create(
            "batch-job", host=host, ttl=timedelta(days=7)
        )
        with anyio.fail_after(30):
            await short_lived.signal.wait()
        reason = short_lived.signal.reason
        print(f"quick-task fired: {reason!r}")
        if isinstance(reason, str) and reason.endswith("(expired)"):
            print("quick-task expired: cleaning up")
        # Within the grace period a late subscriber finds the fired controller.
        late = await DistributedAbortController.create("quick-task", host=host)
        with anyio.fail_after(30):
            await late.signal.wait()
        print(f"late subscriber: same={late.run_id == short_lived.run_id} fired at once")
        await anyio.wait_all_tasks_blocked()
        print(f"batch-job aborted: {long_lived.signal.aborted}")


if __name__ == "__main__":
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    directory = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="dac-ttl-")
    anyio.run(main, directory)
