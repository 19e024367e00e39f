"""Durable workflows, built as triggers (see ``triggers._workflow`` for the model).

::

    from triggers.workflows import sleep, start, step, workflow

    @step
    async def fetch(url: str) -> str: ...

    @workflow
    async def digest(url: str) -> str:
        page = await fetch(url)       # recorded; a replay returns it without fetching again
        await sleep("1h")             # durable: the run holds no task while it waits
        return page[:100]

    AgentDO = define_agent_do(workflows=[digest])
    run = await start(digest, ["https://example.com"], actor=host.get("user:1"))
    print(await run.result())
"""

from ._runs import Run as Run
from ._runs import RunFailedError as RunFailedError
from ._runs import get_run as get_run
from ._runs import start as start
from ._workflow import AbortController as AbortController
from ._workflow import Hook as Hook
from ._workflow import HookAlreadyResumedError as HookAlreadyResumedError
from ._workflow import HookConflictError as HookConflictError
from ._workflow import HookInfo as HookInfo
from ._workflow import HookNotFoundError as HookNotFoundError
from ._workflow import ReplayDivergenceError as ReplayDivergenceError
from ._workflow import RunCancelledError as RunCancelledError
from ._workflow import StepFailedError as StepFailedError
from ._workflow import StepMisuseError as StepMisuseError
from ._workflow import TypedHook as TypedHook
from ._workflow import Workflow as Workflow
from ._workflow import WorkflowError as WorkflowError
from ._workflow import create_hook as create_hook
from ._workflow import define_hook as define_hook
from ._workflow import gather as gather
from ._workflow import get_hook_by_token as get_hook_by_token
from ._workflow import get_writable as get_writable
from ._workflow import race as race
from ._workflow import resume_hook as resume_hook
from ._workflow import sleep as sleep
from ._workflow import step as step
from ._workflow import workflow as workflow

__all__ = [
    "AbortController",
    "Hook",
    "HookAlreadyResumedError",
    "HookConflictError",
    "HookInfo",
    "HookNotFoundError",
    "ReplayDivergenceError",
    "Run",
    "RunCancelledError",
    "RunFailedError",
    "StepFailedError",
    "StepMisuseError",
    "TypedHook",
    "Workflow",
    "WorkflowError",
    "create_hook",
    "define_hook",
    "gather",
    "get_hook_by_token",
    "get_run",
    "get_writable",
    "race",
    "resume_hook",
    "sleep",
    "start",
    "step",
    "workflow",
]
