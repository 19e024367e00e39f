"""Every public error survives pickling (process pools, logging handlers, test runners send
them between processes): same type, message and attributes."""

from __future__ import annotations

import pickle

import pytest

from actors import HostClosedError
from ledger import (
    IntentNotFoundError,
    LedgerBusyError,
    LedgerClosedError,
    LedgerCorruptError,
    LedgerNotFoundError,
    LedgerUnavailableError,
    LedgerWriteError,
    PayloadError,
)
from triggers import (
    AbortError,
    ClaimLostError,
    Failure,
    FatalError,
    IntentRejectedError,
    TriggerDefinitionError,
    TriggerFailedError,
    UnknownTriggerError,
)
from triggers.workflows import (
    HookAlreadyResumedError,
    HookConflictError,
    HookNotFoundError,
    ReplayDivergenceError,
    RunCancelledError,
    RunFailedError,
    StepFailedError,
)

FAILURE = Failure(error_type="ValueError", message="broke", attempts=3)

ERRORS = [
    IntentNotFoundError("chat:1", 7),
    LedgerBusyError("/data/a.db", 10.0),
    LedgerClosedError(),
    LedgerCorruptError("/data/a.db", "not a database"),
    LedgerNotFoundError("chat:1"),
    LedgerWriteError("/data/a.db", "disk full"),
    LedgerUnavailableError("postgresql://db/app", "cannot reconnect"),
    PayloadError("not JSON"),
    HostClosedError(),
    HostClosedError("chat:1", 3),
    AbortError("user"),
    ClaimLostError("intent 1 of 'chat': this attempt no longer holds its claim"),
    FatalError("no retry"),
    IntentRejectedError("summary", ["text: field required"]),
    TriggerDefinitionError("summary", "acquire", "must be async"),
    TriggerFailedError(FAILURE),
    UnknownTriggerError("nope", ["summary"]),
    HookAlreadyResumedError("approve:1", 4),
    HookConflictError("approve:1", 4),
    HookNotFoundError("approve:1"),
    ReplayDivergenceError(2, "step", "sleep"),
    RunCancelledError("stop"),
    RunFailedError(FAILURE),
    StepFailedError("fetch", "ValueError", "broke", 3),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda error: type(error).__name__)
def test_an_error_survives_pickling(error: BaseException) -> None:
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error)
    assert str(again) == str(error)
    assert again.args == error.args
    assert vars(again) == vars(error)
