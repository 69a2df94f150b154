"""Performing one run's planned calls against a tracking store: the work an executor runs.

A :class:`Job` is plain data (picklable with cloudpickle, so a worker process can run it);
:func:`perform_job` never raises: every failure is recorded in the :class:`JobResult`,
call by call, so that one failed batch does not stop the ones after it (as in the seed).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from mlflow.entities import Metric, Param, RunTag

from actors.delivery._create_key import creation_with_key, find_created_run, uses_create_key_tag
from actors.delivery._fast_path import FastPathUnavailable, client_fast_path, log_batch_is_mlflows
from actors.delivery._retry import call_with_retry, is_transient
from actors.delivery._sqlite_gate import database_gate, uri_database_key
from actors.delivery._store import request_deadline
from actors.queueing._plan import (
    Call,
    CreateRunCall,
    LogBatchCall,
    LogInputsCall,
    SetTerminatedCall,
)

if TYPE_CHECKING:
    from actors.delivery._sql_metrics import ClientFastPath

KINDS = ("metrics", "params", "tags", "datasets")

T = TypeVar("T")

RetryHook = Callable[[BaseException, float], None]
# Called once a call that was retried has finished (either way): the run is no longer retrying.
RetryEndHook = Callable[[], None]
# (call, error text or None, run ID known after the call)
CallHook = Callable[[Call, "str | None", "str | None"], None]


RETRY_ERROR_CHARS = 500  # how much of a transient error ``status()`` shows


def retry_error_text(exc: BaseException) -> str:
    """How ``RunStatus.last_retry_error`` shows a transient failure: its type and message, cut."""
    text = f"{type(exc).__name__}: {exc}"
    if len(text) > RETRY_ERROR_CHARS:
        text = text[:RETRY_ERROR_CHARS] + "..."
    return text


def empty_counts() -> dict[str, int]:
    return dict.fromkeys(KINDS, 0)


@dataclass
class Job:
    """One run's calls for one flush round."""

    tracking_uri: str
    run_id: str | None
    calls: list[Call]
    retry_timeout: float
    label: str = ""  # how failures name the run while its ID is unknown
    # With a spool: stop at the first call that still fails transiently after its retries
    # (or at JobStopped), so that it and every later call can be spooled in order.
    stop_on_transient: bool = False


@dataclass
class JobResult:
    run_id: str | None
    created: bool = False
    create_error: str | None = None
    logged: dict[str, int] = field(default_factory=empty_counts)
    errors: list[str] = field(default_factory=list)
    terminated: bool = False
    # With ``stop_on_transient``: the calls not delivered, in order, the first being the one
    # that failed (its error in ``unsent_error``); ``unsent_attempted`` if that one was sent
    # (a creation then has an unknown outcome and is looked up before it is sent again).
    unsent: list[Call] = field(default_factory=list)
    unsent_error: str | None = None
    unsent_attempted: bool = False
    spooled: bool = False  # set by the spooler once ``unsent`` is on disk
    # Why calls of the round are in the spool (not delivered, not lost): raised to a flush
    # that waits on the round, as ``errors`` are, but nothing that ``close()`` raises.
    spool_notes: list[str] = field(default_factory=list)
    # On a database store, how the round's metric-only batches went: "on" (the SQL fast
    # path), "off" (switched off or not served) or "fallback: why" (MLflow's log_batch).
    sql_fast_path: str | None = None


class JobStopped(Exception):
    """Raised by an executor's hook: the client is closing, send nothing more of this job."""


def call_counts(call: Call) -> dict[str, int]:
    """Entities per kind that one call delivers."""
    counts = empty_counts()
    if isinstance(call, CreateRunCall):
        counts["tags"] = len(call.tags)
    elif isinstance(call, LogBatchCall):
        counts["metrics"] = len(call.metrics)
        counts["params"] = len(call.params)
        counts["tags"] = len(call.tags)
    elif isinstance(call, LogInputsCall):
        counts["datasets"] = len(call.datasets)
    return counts


def _add(target: dict[str, int], counts: dict[str, int]) -> None:
    for kind, n in counts.items():
        target[kind] += n


def _metrics(call: LogBatchCall) -> list[Metric]:
    return [
        Metric(
            key,
            value,
            timestamp,
            step,
            model_id=model_id,
            dataset_name=dataset_name,
            dataset_digest=dataset_digest,
        )
        for key, value, timestamp, step, model_id, dataset_name, dataset_digest in call.metrics
    ]


def _fast_path_call(call: Call) -> bool:
    """Whether the SQL fast path may carry ``call``: a log_batch of metrics only, none of
    them with a ``model_id`` (MLflow also writes those to the logged model)."""
    return (
        isinstance(call, LogBatchCall)
        and bool(call.metrics)
        and not call.params
        and not call.tags
        and all(metric[4] is None for metric in call.metrics)
    )


def _invoke_fast(
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
    _invoke(client, run_id, call, gate)


def _invoke(client: Any, run_id: str, call: Call, gate: str | None) -> None:
    """One attempt at ``call``; on a SQLite store, holding its file's gate
    (:mod:`actors.delivery._sqlite_gate`, keyed by ``gate``)."""
    with database_gate(gate):
        _send(client, run_id, call)


def _send(client: Any, run_id: str, call: Call) -> None:
    if isinstance(call, LogBatchCall):
        client.log_batch(
            run_id=run_id,
            metrics=_metrics(call),
            params=[Param(key, value) for key, value in call.params],
            tags=[RunTag(key, value) for key, value in call.tags],
        )
    elif isinstance(call, LogInputsCall):
        client.log_inputs(run_id=run_id, datasets=call.datasets)
    elif isinstance(call, SetTerminatedCall):
        client.set_terminated(run_id=run_id, status=call.status, end_time=call.end_time)
    else:  # pragma: no cover - the plan only makes the calls above after creation
        raise TypeError(f"unexpected call {call!r}")


def compress_errors(errors: list[str]) -> list[str]:
    """Collapse runs of the same message: a dead run fails every batch the same way."""
    out: list[str] = []
    count = 0
    for index, error in enumerate(errors):
        count += 1
        if index + 1 == len(errors) or errors[index + 1] != error:
            out.append(error if count == 1 else f"{error} (x{count})")
            count = 0
    return out


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
    retries = _Retries(job.retry_timeout, on_retry, on_retry_end)
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


def record_outcome(result: JobResult, call: Call, error: str | None, run_id: str | None) -> None:
    """Account one call's outcome in ``result`` (in workers and pool threads)."""
    counts = call_counts(call)
    if error is None:
        _add(result.logged, counts)
        if isinstance(call, CreateRunCall):
            result.run_id, result.created = run_id, True
        elif isinstance(call, SetTerminatedCall):
            result.terminated = True
    else:
        result.errors.append(error)
        if isinstance(call, CreateRunCall):
            result.create_error = error


def _create(client: Any, call: CreateRunCall, gate: str | None) -> str:
    with database_gate(gate):
        run = client.create_run(
            experiment_id=call.experiment_id,
            start_time=call.start_time,
            tags=dict(call.tags),
            run_name=call.run_name,
        )
    return str(run.info.run_id)


class _Retries:
    """Runs one call with :func:`call_with_retry` and tells the hooks when retrying starts
    and when it is over."""

    def __init__(
        self, timeout: float, on_retry: RetryHook | None, on_retry_end: RetryEndHook | None
    ) -> None:
        self.timeout = timeout
        self.on_retry = on_retry
        self.on_retry_end = on_retry_end
        self._retried = False

    def _note(self, exc: BaseException, delay: float) -> None:
        self._retried = True
        if self.on_retry is not None:
            self.on_retry(exc, delay)

    def __call__(self, fn: Callable[[], T]) -> T:
        self._retried = False
        try:
            # Each HTTP request of the call waits at most what is left of its retry_timeout.
            with request_deadline(time.monotonic() + self.timeout):
                return call_with_retry(fn, self.timeout, self._note)
        finally:
            if self._retried and self.on_retry_end is not None:
                self.on_retry_end()


class CreationFailed(Exception):
    """A ``create_run`` that failed past its retries, named: which run in which experiment,
    the creation's own last error, and the look-up's if an attempt ended in one. Its cause
    is the last error raised, so that it is as transient as that one."""


def _creation_failed(
    call: CreateRunCall, created: BaseException | None, looked_up: BaseException | None
) -> CreationFailed:
    name = "a run" if call.run_name is None else f"run {call.run_name!r}"
    text = f"creating {name} in experiment {call.experiment_id} failed: {created!r}"
    if looked_up is not None:
        text += f"; looking up whether an earlier attempt made the run also failed: {looked_up!r}"
    return CreationFailed(text)


def _create_once(client: Any, tracking_uri: str, call: CreateRunCall, retries: _Retries) -> str:
    """Create the run, retrying transient failures without ever making a second run.

    On a tracking server the creation carries its create key (:mod:`actors.delivery._create_key`),
    and an attempt after one whose outcome is unknown (any transient failure: the request
    may have landed and only its answer been lost) first looks the run up by that key. In a
    local database a failed creation is a rolled-back transaction: it is simply sent again.
    A failure is raised as :class:`CreationFailed`, naming the creation (not only the look-up
    that the last attempt may have ended in).
    """
    key = call.create_key or str(uuid.uuid4())
    to_send = creation_with_key(tracking_uri, call, key)
    look_up = uses_create_key_tag(tracking_uri)
    attempted = False
    created: BaseException | None = None  # the creation's last error
    looked_up: BaseException | None = None  # the look-up's, if the last attempt ended in it

    def attempt() -> str:
        nonlocal attempted, created, looked_up
        looked_up = None
        if attempted and look_up:
            try:
                found = find_created_run(client, tracking_uri, to_send, key)
            except Exception as exc:
                looked_up = exc
                raise
            if found is not None:
                return found
        attempted = True
        try:
            return _create(client, to_send, uri_database_key(tracking_uri))
        except Exception as exc:
            created = exc
            raise

    try:
        return retries(attempt)
    except JobStopped:
        raise
    except Exception as exc:
        raise _creation_failed(call, created or exc, looked_up) from exc


def _spoolable(exc: BaseException) -> bool:
    """Whether a failed call goes to the spool (with ``stop_on_transient``) rather than
    being reported: a transient failure past its retries, or the client closing."""
    return isinstance(exc, JobStopped) or is_transient(exc)


ROUND_BATCHES = 16  # consecutive metric-only batches of a job stored in one transaction


def _fast_group(calls: list[Call], start: int) -> list[LogBatchCall]:
    """The metric-only batches that open ``calls[start:]``, ROUND_BATCHES at most."""
    group: list[LogBatchCall] = []
    for call in calls[start : start + ROUND_BATCHES]:
        if not _fast_path_call(call):
            break
        assert isinstance(call, LogBatchCall)
        group.append(call)
    return group


def _write_group(
    fast: ClientFastPath,
    run_id: str,
    group: list[LogBatchCall],
    retries: _Retries,
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


def _perform(client: Any, job: Job, retries: _Retries, on_call: CallHook | None) -> JobResult:
    result = JobResult(run_id=job.run_id)
    unavailable: str | None = None  # the store failed a call past its retries
    fast: ClientFastPath | None = None  # looked up at the first metric-only batch
    gate = uri_database_key(job.tracking_uri)  # a SQLite file: its writers take turns
    stored_until = 0  # the calls before it were stored with an earlier call's group
    grouping = True  # until the writer refuses a group: then batch by batch

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
            error = f"{type(call).__name__.removesuffix('Call')} not sent: {unavailable}"
        elif isinstance(call, CreateRunCall):
            try:
                run_id = _create_once(client, job.tracking_uri, call, retries)
            except Exception as exc:
                said = str(exc) if isinstance(exc, CreationFailed) else repr(exc)
                error, failure = f"create_run failed: {said}", exc
        elif run_id is None:
            error = f"run {job.label} has no ID: its creation failed, so this call was not sent"
        else:
            if fast is None and _fast_path_call(call):
                fast = client_fast_path(client)
            try:
                if (
                    fast is not None
                    and fast.database
                    and _fast_path_call(call)
                    and log_batch_is_mlflows(client)
                ):
                    assert isinstance(call, LogBatchCall)
                    group = _fast_group(job.calls, index) if grouping else []
                    if len(group) > 1 and _write_group(fast, run_id, group, retries, result):
                        result.sql_fast_path = "on"
                        stored_until = index + len(group)
                    else:
                        grouping = grouping and len(group) < 2
                        retries(partial(_invoke_fast, fast, client, run_id, call, result, gate))
                else:
                    retries(partial(_invoke, client, run_id, call, gate))
            except Exception as exc:
                error = f"{type(call).__name__.removesuffix('Call')} failed: {exc!r}"
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


def merge_results(done: JobResult, rest: JobResult) -> JobResult:
    """One outcome of calls made in two parts, earlier ones first: a job resumed after its
    worker died, or a run's re-sent spooled calls followed by its round."""
    merged = JobResult(run_id=rest.run_id or done.run_id)
    merged.created = done.created or rest.created
    merged.create_error = done.create_error or rest.create_error
    merged.terminated = done.terminated or rest.terminated
    for kind in merged.logged:
        merged.logged[kind] = done.logged[kind] + rest.logged[kind]
    merged.errors = compress_errors(done.errors + rest.errors)
    merged.spool_notes = compress_errors(done.spool_notes + rest.spool_notes)
    merged.unsent, merged.unsent_error = rest.unsent, rest.unsent_error
    merged.unsent_attempted = rest.unsent_attempted
    merged.sql_fast_path = rest.sql_fast_path or done.sql_fast_path
    return merged


def failure_message(run_label: str, errors: list[str]) -> str:
    """The seed's failure text for one run, which callers and tests match on."""
    return (
        f"Failed to perform one or more operations on the run with ID {run_label}."
        f" Failed operations: {errors}"
    )
