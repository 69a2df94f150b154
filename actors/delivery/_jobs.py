"""A job and its result: one run's calls for one flush round, and the accounting of what
each call delivered or why it failed.

A :class:`Job` is plain data (picklable with cloudpickle, so a worker process can run it);
its :class:`JobResult` records every outcome call by call (entities logged per kind, errors,
the calls left unsent for the spool), and results of a job made in parts merge in order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from actors.queueing._plan import Call, LogBatchCall, LogInputsCall, SetTerminatedCall
from actors.queueing._queues import CreateRunCall

KINDS = ("metrics", "params", "tags", "datasets")

# What a round in progress is doing, as the one performing it reports it (an executor: waiting
# for a worker, flushing, retrying; the spooler: spooled). Part of ``RunState``.
JobState = Literal["waiting", "flushing", "retrying", "spooled"]


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
