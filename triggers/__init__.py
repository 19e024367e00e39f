"""The trigger contract and its engine.

A trigger (a ``DurableTrigger`` dict) says how to do one kind of durable work: ``acquire``
does it with a cancellation signal; ``commit`` / ``commit_cancelled`` / ``commit_failed`` write
the terminal facts in the transaction that ends the intent.
"""

from ._abort import AbortController as AbortController
from ._abort import AbortError as AbortError
from ._abort import AbortSignal as AbortSignal
from ._context import ClaimLostError as ClaimLostError
from ._context import StreamWriter as StreamWriter
from ._context import TriggerContext as TriggerContext
from ._distributed import DistributedAbortController as DistributedAbortController
from ._errors import FatalError as FatalError
from ._errors import IntentRejectedError as IntentRejectedError
from ._errors import TriggerDefinitionError as TriggerDefinitionError
from ._errors import TriggerError as TriggerError
from ._errors import TriggerFailedError as TriggerFailedError
from ._errors import UnknownTriggerError as UnknownTriggerError
from ._process import run_process as run_process
from ._results import Cancellation as Cancellation
from ._results import CancelResult as CancelResult
from ._results import CancelStatus as CancelStatus
from ._results import Failure as Failure
from ._scheduler import Scheduler as Scheduler
from ._scheduler import SchedulerConfig as SchedulerConfig
from ._spec import DurableTrigger as DurableTrigger
from ._spec import RetryPolicy as RetryPolicy
from ._spec import TriggerDef as TriggerDef
from ._spec import TriggerRegistry as TriggerRegistry
from ._tx import Tx as Tx

__all__ = [
    "AbortController",
    "AbortError",
    "AbortSignal",
    "CancelResult",
    "CancelStatus",
    "Cancellation",
    "ClaimLostError",
    "DistributedAbortController",
    "DurableTrigger",
    "Failure",
    "FatalError",
    "IntentRejectedError",
    "RetryPolicy",
    "Scheduler",
    "SchedulerConfig",
    "StreamWriter",
    "TriggerContext",
    "TriggerDef",
    "TriggerDefinitionError",
    "TriggerError",
    "TriggerFailedError",
    "TriggerRegistry",
    "Tx",
    "UnknownTriggerError",
    "run_process",
]
