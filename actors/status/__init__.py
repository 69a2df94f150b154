"""Status: what every run is doing. A run's handle and its live record, the result types
``status()`` returns, and the process-wide totals the status endpoint serves.
"""

from actors.status._handle import FlushCall, RunHandle, RunWait
from actors.status._status import (
    FLUSH_BUCKETS,
    STATES,
    TOTALS,
    ClientStatus,
    ErrorLog,
    RunRecord,
    RunStatus,
)

__all__ = [
    "FLUSH_BUCKETS",
    "STATES",
    "TOTALS",
    "ClientStatus",
    "ErrorLog",
    "FlushCall",
    "RunHandle",
    "RunRecord",
    "RunStatus",
    "RunWait",
]
