"""Sending a job's calls whole through the SQL fast path for runs
(:mod:`actors.delivery._sql_runs`): one transaction, shared with the runs that other threads
of this process send at the same moment, instead of one or more per call.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from actors.delivery._attempts import Retries
from actors.delivery._fast_path import (
    FastPathUnavailable,
    client_fast_path,
    run_calls_are_mlflows,
)
from actors.delivery._jobs import (
    Job,
    JobResult,
    JobStopped,
    RetryEndHook,
    RetryHook,
    record_outcome,
)
from actors.delivery._retry import is_transient
from actors.delivery._run_work import whole_run


def write_whole_run(client: Any, job: Job, retries: Retries, result: JobResult) -> bool:
    """Store all of ``job``'s calls through the fast path: True once stored (``result.run_id``
    is then the run's ID, a created run's included); False when they must go through
    MLflow's API, call by call (nothing of them stored: not a database store, the switch
    off, a fallback, a run the writer does not take).

    A transient failure past the retries is raised: its outcome is unknown to the caller
    (a creation is then found by its ID, :mod:`actors.delivery._create_key`), as is
    :class:`~actors.delivery._jobs.JobStopped`.
    """
    work = whole_run(job.run_id, job.calls)
    if work is None or not work.small:  # a long run's round: batch by batch, as before
        return False
    fast = client_fast_path(client)
    if fast is None or fast.runs is None or fast.runs.unavailable is not None:
        return False
    if not run_calls_are_mlflows(client):
        return False
    try:
        stored = retries(partial(fast.runs.submit, work))
    except FastPathUnavailable as exc:
        result.sql_fast_path = fast.fell_back(str(exc))
        return False
    except JobStopped:
        raise
    except Exception as exc:
        if is_transient(exc):
            raise
        return False
    if stored:
        result.run_id = work.run_id
        result.sql_fast_path = "on"
    return stored


def can_group(job: Job) -> bool:
    """Whether ``job`` may go in a group of whole runs (:func:`perform_group`)."""
    work = whole_run(job.run_id, job.calls)
    return work is not None and work.small


def perform_group(
    open_client: Callable[[], Any],
    jobs: list[Job],
    on_retry: RetryHook | None = None,
    on_retry_end: RetryEndHook | None = None,
) -> list[JobResult | None]:
    """Store the jobs of one tracking URI as whole runs in ONE transaction: per job, its
    result once stored, or None for a job to be performed on its own (not taken, or the
    group failed: nothing of it stored, or, after a failure of unknown outcome, found stored
    by its ID when performed). Retried as a job's call is, with its hooks (the runs' status
    shows ``retrying``). Never raises."""
    fast = None
    try:
        client = open_client()
        fast = client_fast_path(client)
        if fast is None or fast.runs is None or fast.runs.unavailable is not None:
            return [None] * len(jobs)
        if not run_calls_are_mlflows(client):
            return [None] * len(jobs)
        works = [whole_run(job.run_id, job.calls) for job in jobs]
        given = [work for work in works if work is not None]
        timeout = min(job.retry_timeout for job in jobs)
        retries = Retries(timeout, on_retry, on_retry_end)
        stored = iter(retries(partial(fast.runs.write, given)))
    except FastPathUnavailable as exc:
        if fast is not None:
            fast.fell_back(str(exc))
        return [None] * len(jobs)
    except Exception:
        return [None] * len(jobs)
    results: list[JobResult | None] = []
    for job, work in zip(jobs, works, strict=True):
        if work is None or not next(stored):
            results.append(None)
            continue
        result = JobResult(run_id=work.run_id, sql_fast_path="on")
        for call in job.calls:
            record_outcome(result, call, None, work.run_id)
        results.append(result)
    return results
