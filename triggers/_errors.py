"""Errors of the trigger engine (``AbortError`` lives with the abort primitives)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ledger._errors import reduce_error

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ledger import Event

    from ._results import Failure


class TriggerError(Exception):
    """Root of the trigger engine's errors."""

    __reduce__ = reduce_error


class TriggerDefinitionError(TriggerError, TypeError):
    """A trigger spec is invalid; nothing was registered.

    Attributes:
        trigger: the trigger's kind (or its position when it has no valid kind).
        key: the spec key at fault, or None when the spec as a whole is.
    """

    def __init__(self, trigger: str, key: str | None, problem: str) -> None:
        self.trigger = trigger
        self.key = key
        where = f"trigger {trigger!r}" + (f", key {key!r}" if key else "")
        super().__init__(f"{where}: {problem}")


class UnknownTriggerError(TriggerError, LookupError):
    """No trigger of this kind is registered on the actor class.

    Attributes:
        kind: the unknown kind.
    """

    def __init__(self, kind: object, known: Sequence[str] = ()) -> None:
        self.kind = kind
        hint = f"; registered kinds: {', '.join(sorted(known))}" if known else ""
        super().__init__(f"no trigger of kind {kind!r} is registered{hint}")


class IntentRejectedError(TriggerError, ValueError):
    """``parse_intent`` refused the payload; nothing was written.

    Attributes:
        kind: the trigger kind.
        errors: the validation messages.
    """

    def __init__(self, kind: str, errors: Sequence[str]) -> None:
        self.kind = kind
        self.errors = tuple(errors)
        super().__init__(f"payload rejected by trigger {kind!r}: " + "; ".join(self.errors))


class FatalError(Exception):
    """Raise from ``acquire`` to fail the intent at once, without retries."""


class TriggerFailedError(TriggerError):
    """The intent ended ``failed``.

    Attributes:
        failure: what the failure fact records (error type, message, attempts).
        facts: the events recorded with the intent's id, when known (empty otherwise).
    """

    def __init__(self, failure: Failure, *, facts: Sequence[Event] = ()) -> None:
        self.failure = failure
        self.facts = list(facts)
        super().__init__(
            f"trigger failed after {failure.attempts} attempt(s): "
            f"{failure.error_type}: {failure.message}"
        )
