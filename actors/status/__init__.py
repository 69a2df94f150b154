"""Status: what every run is doing. A run's handle and its live record, the result types
``status()`` returns, and the process-wide totals the status endpoint serves.
"""

from actors.status._handle import FlushCall, RunHandle, RunWait
from actors.status._record import ErrorLog, RunRecord
from actors.status._results import STATES, ClientStatus, RunState, RunStatus
from actors.status._totals import FLUSH_BUCKETS, TOTALS

__all__ = [
    "FLUSH_BUCKETS",
    "STATES",
    "TOTALS",
    "ClientStatus",
    "ErrorLog",
    "FlushCall",
    "RunHandle",
    "RunRecord",
    "RunState",
    "RunStatus",
    "RunWait",
]
