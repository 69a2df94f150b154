"""Queueing: what a client has accepted and not yet sent. Input checks, each run's queues
(bounded by a shared budget), the pending run IDs handed out before a run exists, and the
plan that turns a run's queues into the calls of one flush.
"""

from actors.queueing._bounded_queues import BoundedRunQueues, WatchedRunQueues
from actors.queueing._budget import Budget
from actors.queueing._inputs import (
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
from actors.queueing._pending import PendingRunId
from actors.queueing._plan import (
    Call,
    LogBatchCall,
    LogInputsCall,
    SetTerminatedCall,
    plan_batches,
    plan_snapshot,
)
from actors.queueing._queues import CreateRunCall, RunQueues, Terminate, closed_error

__all__ = [
    "BoundedRunQueues",
    "Budget",
    "Call",
    "CreateRunCall",
    "LogBatchCall",
    "LogInputsCall",
    "PendingRunId",
    "RunQueues",
    "SetTerminatedCall",
    "Terminate",
    "WatchedRunQueues",
    "check_dataset_input",
    "check_metrics_mapping",
    "check_status",
    "check_step",
    "check_text",
    "check_timestamp",
    "closed_error",
    "metric_rows",
    "param_pairs",
    "plan_batches",
    "plan_snapshot",
    "tag_pairs",
]
