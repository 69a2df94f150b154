"""Performing one run's planned calls against a tracking store: the work an executor runs.

A :class:`~actors.delivery._jobs.Job` is plain data (picklable with cloudpickle, so a
worker process can run it); :func:`perform_job` never raises: every failure is recorded in
the job's result, call by call, so that one failed batch does not stop the ones after it (as
in the seed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

from actors.delivery._attempts import Retries, create_once, creation_error
from actors.delivery._dispatch import fast_group, fast_path_call, invoke, invoke_fast, write_group
from actors.delivery._fast_path import (
    ClientFastPath,
    client_fast_path,
    log_batch_is_mlflows,
)
from actors.delivery._fast_runs import write_whole_run
from actors.delivery._jobs import (
    CallHook,
    Job,
    JobResult,
    JobStopped,
    RetryEndHook,
    RetryHook,
    compress_errors,
    record_outcome,
)
from actors.delivery._retry import is_transient
from actors.delivery._sqlite_gate import uri_database_key
from actors.queueing._plan import Call, LogBatchCall, call_kind
from actors.queueing._queues import CreateRunCall

_logger = logging.getLogger("runactors.delivery")


def perform_job(
    open_client: Callable[[], Any],
    job: Job,
    on_retry: RetryHook | None = None,
    on_call: CallHook | None = None,
    on_retry_end: RetryEndHook | None = None,
) -> JobResult:
    """Make the job's calls in order on the ``MlflowClient`` that ``open_client`` returns,
    retrying transient failures for up to ``job.retry_timeout`` seconds each; ``on_call``
    hears each outcome.

    Opening the client is retried like a call: opening a SQLite store reads its schema, which
    fails while another connection holds the database locked. If it still fails, every call
    of the job fails with that error. ``on_retry`` hears each retry, ``on_retry_end`` that the
    retried call is over, so that a run's state goes from ``retrying`` back to ``flushing``.
    """
    retries = Retries(job.retry_timeout, on_retry, on_retry_end)
    try:
        client = retries(open_client)
    except Exception as exc:
        if not (job.stop_on_transient and _spoolable(exc)):
            raise
        result = JobResult(run_id=job.run_id)
        result.unsent, result.unsent_error = list(job.calls), f"opening the store failed: {exc!r}"
        return result
    result = _perform(client, job, retries, on_call)
    result.errors = compress_errors(result.errors)
    return result


_whole_run_faults: list[str] = []  # said once per process


def fell_back_from_whole_run(exc: BaseException) -> str:
    """Warn once that whole runs failed with ``exc`` (a bug, or an MLflow it does not know),
    so their calls go through MLflow's API; the run's ``sql_fast_path`` status text."""
    if not _whole_run_faults:
        _whole_run_faults.append(repr(exc))
        _logger.warning(
            "SQL fast path for whole runs failed (%r): their calls go through MLflow's API",
            exc,
            exc_info=exc,
        )
    return f"fallback: {exc!r}"


def _spoolable(exc: BaseException) -> bool:
    """Whether a failed call goes to the spool (with ``stop_on_transient``) rather than
    being reported: a transient failure past its retries, or the client closing."""
    return isinstance(exc, JobStopped) or is_transient(exc)


def _perform(client: Any, job: Job, retries: Retries, on_call: CallHook | None) -> JobResult:
    result = JobResult(run_id=job.run_id)
    unavailable: str | None = None  # the store failed a call past its retries
    fast: ClientFastPath | None = None  # looked up at the first metric-only batch
    gate = uri_database_key(job.tracking_uri)  # a SQLite file: its writers take turns
    stored_until = 0  # the calls before it were stored with an earlier call's group
    grouping = True  # until the writer refuses a group: then batch by batch
    try:
        if write_whole_run(client, job, retries, result):  # all stored in one transaction
            stored_until = len(job.calls)
    except Exception as exc:  # transient past the retries, or the client closing
        if job.stop_on_transient and _spoolable(exc):
            result.unsent, result.unsent_error = list(job.calls), f"not sent: {exc!r}"
            result.unsent_attempted = True  # a creation may have landed: looked up first
            return result
        if isinstance(exc, JobStopped):
            raise
        if is_transient(exc):
            unavailable = f"the store was unavailable past retry_timeout ({exc!r})"
        else:  # a fault of the fast path itself, which stored nothing: MLflow's calls instead
            result.sql_fast_path = fell_back_from_whole_run(exc)

    def report(index: int, call: Call, error: str | None, run_id: str | None) -> bool:
        """Account one call's outcome; False when the job must stop (the client closes)."""
        record_outcome(result, call, error, run_id)
        if on_call is not None:
            try:
                on_call(call, error, run_id)
            except JobStopped:
                if not job.stop_on_transient:
                    raise
                result.unsent = list(job.calls[index + 1 :])
                result.unsent_error = "the client was closed before these calls were sent"
                return False
        return True

    for index, call in enumerate(job.calls):
        error: str | None = None
        failure: Exception | None = None
        run_id = result.run_id
        if index < stored_until:
            if not report(index, call, None, run_id):
                return result
            continue
        if unavailable is not None:
            # retry_timeout bounds the round, not each of its calls: the rest would only
            # wait out the same outage once more each.
            error = f"{call_kind(call)} not sent: {unavailable}"
        elif isinstance(call, CreateRunCall):
            try:
                run_id = create_once(client, job.tracking_uri, call, retries)
            except Exception as exc:
                held = job.stop_on_transient and _spoolable(exc)  # then it is spooled
                error, failure = creation_error(exc, held), exc
        elif run_id is None:
            error = f"run {job.label} has no ID: its creation failed, so this call was not sent"
        else:
            if fast is None and fast_path_call(call):
                fast = client_fast_path(client)
            try:
                if (
                    fast is not None
                    and fast.database
                    and fast_path_call(call)
                    and log_batch_is_mlflows(client)
                ):
                    assert isinstance(call, LogBatchCall)
                    group = fast_group(job.calls, index) if grouping else []
                    if len(group) > 1 and write_group(fast, run_id, group, retries, result):
                        result.sql_fast_path = "on"
                        stored_until = index + len(group)
                    else:
                        grouping = grouping and len(group) < 2
                        retries(partial(invoke_fast, fast, client, run_id, call, result, gate))
                else:
                    if fast is not None and fast.database and fast_path_call(call):
                        result.sql_fast_path = "off"  # log_batch patched or wrapped: it runs
                    retries(partial(invoke, client, run_id, call, gate))
            except Exception as exc:
                error = f"{call_kind(call)} failed: {exc!r}"
                failure = exc
        if job.stop_on_transient and failure is not None and _spoolable(failure):
            result.unsent, result.unsent_error = list(job.calls[index:]), error
            result.unsent_attempted = True  # failed or stopped while being retried
            return result
        if failure is not None and is_transient(failure):
            unavailable = f"the store was unavailable past retry_timeout ({failure!r})"
        if not report(index, call, error, run_id):
            return result
    return result
