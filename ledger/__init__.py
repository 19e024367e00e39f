"""Storage for durable triggers: one append-only ledger per actor.

The public face of the ``ledger`` package. It knows nothing of triggers: it stores events,
schedule rows, projections and attached output streams, and commits them in batches.
"""

from ._errors import IntentNotFoundError as IntentNotFoundError
from ._errors import LedgerBusyError as LedgerBusyError
from ._errors import LedgerCorruptError as LedgerCorruptError
from ._errors import LedgerError as LedgerError
from ._errors import LedgerNotFoundError as LedgerNotFoundError
from ._errors import LedgerUnavailableError as LedgerUnavailableError
from ._errors import LedgerWriteError as LedgerWriteError
from ._errors import PayloadError as PayloadError
from ._errors import ProjectionError as ProjectionError
from ._index import Directory as Directory
from ._index import IndexDB as IndexDB
from ._index import ProcessInfo as ProcessInfo
from ._models import JSON as JSON
from ._models import LONGEST_MS as LONGEST_MS
from ._models import Event as Event
from ._models import IntentState as IntentState
from ._models import IntentStatus as IntentStatus
from ._models import Projection as Projection
from ._models import datetime_to_ms as datetime_to_ms
from ._models import duration_ms as duration_ms
from ._models import ms_to_datetime as ms_to_datetime
from ._naming import ledger_relpath as ledger_relpath
from ._store import Clock as Clock
from ._store import Committed as Committed
from ._store import LedgerClosedError as LedgerClosedError
from ._store import LedgerStore as LedgerStore
from ._store import Store as Store
from ._store import system_clock as system_clock
from ._tx import MAX_PAYLOAD_BYTES as MAX_PAYLOAD_BYTES
from ._tx import IntentRow as IntentRow
from ._tx import LedgerTx as LedgerTx
from ._tx import NewClaim as NewClaim
from ._tx import TxEffects as TxEffects
from ._tx import check_event_id as check_event_id
from ._tx import check_events_query as check_events_query
from ._tx import check_kinds as check_kinds
from ._tx import check_position as check_position
from ._tx import check_text as check_text
from ._tx import dump_json as dump_json

__all__ = [
    "JSON",
    "LONGEST_MS",
    "MAX_PAYLOAD_BYTES",
    "Clock",
    "Committed",
    "Directory",
    "Event",
    "IndexDB",
    "IntentNotFoundError",
    "IntentRow",
    "IntentState",
    "IntentStatus",
    "LedgerBusyError",
    "LedgerClosedError",
    "LedgerCorruptError",
    "LedgerError",
    "LedgerNotFoundError",
    "LedgerStore",
    "LedgerTx",
    "LedgerUnavailableError",
    "LedgerWriteError",
    "NewClaim",
    "PayloadError",
    "ProcessInfo",
    "Projection",
    "ProjectionError",
    "Store",
    "TxEffects",
    "check_event_id",
    "check_events_query",
    "check_kinds",
    "check_position",
    "check_text",
    "datetime_to_ms",
    "dump_json",
    "duration_ms",
    "ledger_relpath",
    "ms_to_datetime",
    "system_clock",
]
