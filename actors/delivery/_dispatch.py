"""Sending one call to the store: through the SQLite gate, or, for metric-only batches on a
database store, through the SQL fast path, one batch at a time or several in one transaction.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from mlflow.entities import Param, RunTag

from actors.delivery._attempts import Retries
from actors.delivery._fast_path import ClientFastPath, FastPathUnavailable
from actors.delivery._jobs import JobResult, JobStopped
from actors.delivery._retry import is_transient
from actors.delivery._sqlite_gate import database_gate
from actors.queueing._plan import (
    Call,
    LogBatchCall,
    LogInputsCall,
    SetTerminatedCall,
)
from actors.queueing._queues import metric_entity


def fast_path_call(call: Call) -> bool:
    """Whether the SQL fast path may carry ``call``: a log_batch of metrics only, none of
    them with a ``model_id`` (MLflow also writes those to the logged model)."""
    return (
        isinstance(call, LogBatchCall)
        and bool(call.metrics)
        and not call.params
        and not call.tags
        and all(metric[4] is None for metric in call.metrics)
    )


def invoke_fast(
    fast: ClientFastPath,
    client: Any,
    run_id: str,
    call: LogBatchCall,
    result: JobResult,
    gate: str | None,
) -> None:
    """One attempt at a metric-only batch on a database store: through the writer while it
    serves this database, else (or when it cannot take this batch: nothing of it stored)
    through MLflow's ``log_batch``. MLflow's errors, transient ones included, propagate as
    from ``log_batch``, for the caller's retries."""
    writer = fast.writer
    if writer is None:
        result.sql_fast_path = "off"
    elif writer.unavailable is not None:
        result.sql_fast_path = f"fallback: {writer.unavailable}"
    else:
        try:
            writer.write_queued(run_id, [call.metrics])
        except FastPathUnavailable as exc:
            result.sql_fast_path = fast.fell_back(str(exc))
        else:
            result.sql_fast_path = "on"
            return
    invoke(client, run_id, call, gate)


def invoke(client: Any, run_id: str, call: Call, gate: str | None) -> None:
    """One attempt at ``call``; on a SQLite store, holding its file's gate
    (:mod:`actors.delivery._sqlite_gate`, keyed by ``gate``)."""
    with database_gate(gate):
        _send(client, run_id, call)


def _send(client: Any, run_id: str, call: Call) -> None:
    if isinstance(call, LogBatchCall):
        client.log_batch(
            run_id=run_id,
            metrics=[metric_entity(row) for row in call.metrics],
            params=[Param(key, value) for key, value in call.params],
            tags=[RunTag(key, value) for key, value in call.tags],
        )
    elif isinstance(call, LogInputsCall):
        client.log_inputs(run_id=run_id, datasets=call.datasets)
    elif isinstance(call, SetTerminatedCall):
        client.set_terminated(run_id=run_id, status=call.status, end_time=call.end_time)
    else:  # pragma: no cover - the plan only makes the calls above after creation
        raise TypeError(f"unexpected call {call!r}")


ROUND_BATCHES = 16  # consecutive metric-only batches of a job stored in one transaction


def fast_group(calls: list[Call], start: int) -> list[LogBatchCall]:
    """The metric-only batches that open ``calls[start:]``, ROUND_BATCHES at most."""
    group: list[LogBatchCall] = []
    for call in calls[start : start + ROUND_BATCHES]:
        if not fast_path_call(call):
            break
        assert isinstance(call, LogBatchCall)
        group.append(call)
    return group


def write_group(
    fast: ClientFastPath,
    run_id: str,
    group: list[LogBatchCall],
    retries: Retries,
    result: JobResult,
) -> bool:
    """Store ``group`` (2 batches or more of one run) in ONE fast-path transaction, retried
    as one call: one commit (an ``fsync`` on SQLite) and one run check instead of one per
    batch. False when the writer cannot take them (nothing stored): a fallback, or a batch
    MLflow refuses, is then met batch by batch, each reported on its own as without grouping.
    A transient failure past the retries is raised, as the first batch's alone would be.
    Nothing counts as done before the commit, so a worker that dies inside the transaction
    leaves every batch of it to the resumed job (a re-sent metric is stored once)."""
    writer = fast.writer
    if writer is None or writer.unavailable is not None:
        return False
    batches = [call.metrics for call in group]
    try:
        retries(partial(writer.write_queued, run_id, batches))
    except FastPathUnavailable as exc:  # said once, as for a single batch
        result.sql_fast_path = fast.fell_back(str(exc))
        return False
    except JobStopped:
        raise
    except Exception as exc:
        if is_transient(exc):
            raise
        return False
    return True
