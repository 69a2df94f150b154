"""runactors' runtime: Pykka actors, the supervisor, the executors and batch planning.

Users import :mod:`client`; this package never imports it.
"""

from actors._executor import Executor, ThreadExecutor, default_max_workers
from actors._inputs import (
    check_dataset_input,
    check_metrics_mapping,
    check_status,
    check_step,
    check_text,
    check_timestamp,
    metric_rows,
    param_pairs,
    tag_pairs,
)
from actors._new_sqlite import create_sqlite_store
from actors._pending import PendingRunId
from actors._perform import Job, JobResult, failure_message, perform_job
from actors._plan import (
    Call,
    CreateRunCall,
    LogBatchCall,
    LogInputsCall,
    SetTerminatedCall,
    plan_batches,
)
from actors._queues import CreateRun, RunQueues, Terminate, closed_error
from actors._retry import call_with_retry, is_transient
from actors._run_actor import RunActor
from actors._session import RunHandle, Session, SessionConfig
from actors._spool import check_spool_dir
from actors._status import STATES, ClientStatus, RunRecord, RunStatus
from actors._supervisor import Supervisor, Ticket
from actors._system import ActorSystem, exit_timeout, get_system, ticket_done, wait_tickets

__all__ = [
    "STATES",
    "ActorSystem",
    "Call",
    "ClientStatus",
    "CreateRun",
    "CreateRunCall",
    "Executor",
    "Job",
    "JobResult",
    "LogBatchCall",
    "LogInputsCall",
    "PendingRunId",
    "RunActor",
    "RunHandle",
    "RunQueues",
    "RunRecord",
    "RunStatus",
    "Session",
    "SessionConfig",
    "SetTerminatedCall",
    "Supervisor",
    "Terminate",
    "ThreadExecutor",
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
    "default_max_workers",
    "exit_timeout",
    "failure_message",
    "get_system",
    "is_transient",
    "metric_rows",
    "param_pairs",
    "perform_job",
    "plan_batches",
    "tag_pairs",
    "ticket_done",
    "wait_tickets",
]
