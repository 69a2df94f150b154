"""runactors' runtime: Pykka actors, the supervisor, the executors and batch planning.

Users import :mod:`client`; this package never imports it. What :mod:`client` needs of the
runtime is exported here and nowhere else; the subpackages, by concern:

- :mod:`actors.runtime`: the actor system, the supervisor, one actor per run, sessions;
- :mod:`actors.spool`: the durable journal of what could not be delivered, and its replay;
- :mod:`actors.executors`: the thread and process pools that perform a run's jobs;
- :mod:`actors.status`: run handles, their records, ``status()`` results, process totals;
- :mod:`actors.delivery`: performing calls on a store (retry, create once, SQL fast path);
- :mod:`actors.queueing`: input checks, run queues, pending run IDs, the flush plan.

Every logger of the runtime and of :mod:`client` is under ``runactors`` (see
:mod:`actors._logging`), set up here, before any subpackage is imported.
"""

from actors import _logging  # noqa: F401  (the ``runactors`` logger's handler)
from actors.delivery import (
    KINDS,
    call_with_retry,
    create_sqlite_store,
    empty_counts,
    make_client,
)
from actors.executors import python_main
from actors.queueing import (
    CreateRunCall,
    PendingRunId,
    Terminate,
    check_dataset_input,
    check_metrics_mapping,
    check_status,
    check_step,
    check_text,
    check_timestamp,
    closed_error,
    metric_rows,
    param_pairs,
    tag_pairs,
)
from actors.runtime import (
    Session,
    SessionConfig,
    Ticket,
    exit_timeout,
    get_system,
    session_problems,
    stop_at_exit,
    ticket_done,
    wait_tickets,
)
from actors.spool import (
    NEW_SUFFIX,
    PREFIX,
    SIDE_SUFFIXES,
    Spool,
    SpoolError,
    SpoolGone,
    SpoolLocked,
    check_spool_dir,
    deliver,
    end_pending_runs,
    remove_stale_new,
    side_files,
    spool_files,
)
from actors.status import (
    FLUSH_BUCKETS,
    STATES,
    TOTALS,
    ClientStatus,
    RunHandle,
    RunState,
    RunStatus,
)

__all__ = [
    "FLUSH_BUCKETS",
    "KINDS",
    "NEW_SUFFIX",
    "PREFIX",
    "SIDE_SUFFIXES",
    "STATES",
    "TOTALS",
    "ClientStatus",
    "CreateRunCall",
    "PendingRunId",
    "RunHandle",
    "RunState",
    "RunStatus",
    "Session",
    "SessionConfig",
    "Spool",
    "SpoolError",
    "SpoolGone",
    "SpoolLocked",
    "Terminate",
    "Ticket",
    "call_with_retry",
    "check_dataset_input",
    "check_metrics_mapping",
    "check_spool_dir",
    "check_status",
    "check_step",
    "check_text",
    "check_timestamp",
    "closed_error",
    "create_sqlite_store",
    "deliver",
    "empty_counts",
    "end_pending_runs",
    "exit_timeout",
    "get_system",
    "make_client",
    "metric_rows",
    "param_pairs",
    "python_main",
    "remove_stale_new",
    "session_problems",
    "side_files",
    "spool_files",
    "stop_at_exit",
    "tag_pairs",
    "ticket_done",
    "wait_tickets",
]
