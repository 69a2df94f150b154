"""Groups of whole runs in the executors: what a pool thread takes at once, stored in ONE
transaction (:func:`actors.delivery._fast_runs.perform_group`): by the thread itself on the
thread executor (:func:`perform_groupable`), by its worker process on the process executor.

A worker commits what it is given; worker processes cannot share a transaction, so without
groups each run of a sweep is a commit of its own (an ``fsync`` on SQLite). A pool thread
takes up to :data:`GROUP_JOBS` queued jobs, sends those the fast path may take as one
message, and performs the rest (and any the worker did not store) one by one, as always.

A worker that dies during a group leaves its outcome unknown: the group is sent once more
to a new worker, where the runs already stored are found by their IDs (a creation's ID is its
create key's) and nothing is stored twice. If that one dies too, the group's jobs fail, as a
job whose worker died twice does.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import cloudpickle

from actors.delivery._fast_runs import can_group, perform_group
from actors.delivery._jobs import Job, JobResult, record_outcome, retry_error_text
from actors.queueing._plan import call_kind

# The executors' hooks (actors.executors._executor, which imports this module).
StateHook = Callable[..., None]
DoneHook = Callable[[JobResult], None]

_logger = logging.getLogger("runactors.executors")


def deliver(on_done: DoneHook, result: JobResult) -> None:
    """Hand a job's result to its run; never raises (a pool thread outlives its callbacks)."""
    try:
        on_done(result)
    except BaseException:
        _logger.exception("delivering a job's result failed")


GROUP_JOBS = 32  # jobs a pool thread takes at once, at most


class GroupLost(Exception):
    """The group could not be sent or its worker stopped: perform its jobs one by one."""


def send_group(slot: object, jobs: list[Job], tell: StateHook) -> list[JobResult | None]:
    """The results of ``jobs`` (same tracking URI) stored by ``slot``'s worker as one group;
    None for a job to be performed on its own; ``tell(state, worker, detail)`` hears what
    the group is doing (``flushing``, ``retrying``), as a job's ``on_state``. Raises
    :class:`GroupLost` when nothing may be concluded (the slot closed, no worker started)."""
    payload = bytes(cloudpickle.dumps(("group", jobs)))
    for _attempt in (1, 2):
        try:
            worker = slot._live_worker()  # type: ignore[attr-defined]
            worker.hello()
            tell("flushing", worker.name)
        except Exception as exc:
            raise GroupLost(repr(exc)) from exc
        try:
            worker.conn.send_bytes(payload)
            while (message := cloudpickle.loads(worker.conn.recv_bytes()))[0] == "state":
                tell(message[1], worker.name, *message[2:3])  # (state,) or (state, detail)
            kind, results = message
        except (EOFError, OSError):
            slot._discard(worker, 1.0)  # type: ignore[attr-defined]
            continue
        except BaseException as exc:  # the exchange is out of step: trust no more of it
            slot._discard(worker, 0)  # type: ignore[attr-defined]
            return [_failed(job, f"its worker process was stopped: {exc!r}") for job in jobs]
        finally:
            with slot._lock:  # type: ignore[attr-defined]
                slot._busy = False  # type: ignore[attr-defined]
        if kind != "group" or len(results) != len(jobs):
            slot._discard(worker, 0)  # type: ignore[attr-defined]
            return [_failed(job, f"unexpected answer {kind!r}") for job in jobs]
        return list(results)
    return [_failed(job, "its worker process died twice") for job in jobs]


def _failed(job: Job, why: str) -> JobResult:
    result = JobResult(run_id=job.run_id)
    for call in job.calls:
        record_outcome(result, call, f"{call_kind(call)} not sent: {why}", None)
    return result


def groupable(jobs: list[Job]) -> list[int]:
    """The indices of ``jobs`` that may go in one group (the first one's tracking URI)."""
    if len(jobs) < 2:
        return []
    uri = jobs[0].tracking_uri
    picked = [i for i, job in enumerate(jobs) if job.tracking_uri == uri and can_group(job)]
    return picked if len(picked) > 1 else []


def _teller(items: list[tuple[Job, StateHook, DoneHook]], picked: list[int]) -> StateHook:
    """One ``on_state`` for a group: each of its jobs' own."""

    def tell(state: str, worker: str | None, detail: str | None = None) -> None:
        for index in picked:
            items[index][1](state, worker, detail)

    return tell


def _left(
    items: list[tuple[Job, StateHook, DoneHook]],
    picked: list[int],
    stored: list[JobResult | None],
    started: float,
) -> list[tuple[Job, StateHook, DoneHook]]:
    """Deliver the group's stored results; the items left to perform one by one, those the
    group did not store with what is left of their ``retry_timeout`` (a group retried until
    its store's outage outlasted it must not wait as long again for each of its runs)."""
    spent = time.monotonic() - started
    again = []
    for index, result in zip(picked, stored, strict=True):
        job, on_state, on_done = items[index]
        if result is None:
            left = max(job.retry_timeout - spent, 0.0)
            again.append((dataclasses.replace(job, retry_timeout=left), on_state, on_done))
        else:
            deliver(on_done, result)
    return again + [item for index, item in enumerate(items) if index not in picked]


def send_groupable(
    slot: object, items: list[tuple[Job, StateHook, DoneHook]]
) -> list[tuple[Job, StateHook, DoneHook]]:
    """Store the whole runs among ``items`` as one group in ``slot``'s worker, each result
    delivered as soon as it is known; the items left to perform one by one."""
    jobs = [job for job, _, _ in items]
    picked = groupable(jobs)
    if not picked:
        return items
    started = time.monotonic()
    try:
        stored = send_group(slot, [jobs[index] for index in picked], _teller(items, picked))
    except Exception:  # GroupLost, a job that cannot be pickled: one by one
        stored = [None] * len(picked)
    return _left(items, picked, stored, started)


def perform_groupable(
    name: str,
    items: list[tuple[Job, StateHook, DoneHook]],
    open_client: Callable[[str], Any],
    check_open: Callable[[], None],
) -> list[tuple[Job, StateHook, DoneHook]]:
    """:func:`send_groupable` on this thread (the thread executor), with the client
    ``open_client(uri)`` gives; ``check_open`` raises between retries once the pool is
    abandoned."""
    jobs = [job for job, _, _ in items]
    picked = groupable(jobs)
    if not picked:
        return items
    tell = _teller(items, picked)
    tell("flushing", name)

    def on_retry(exc: BaseException, delay: float) -> None:
        check_open()
        tell("retrying", name, retry_error_text(exc))

    started, uri = time.monotonic(), jobs[picked[0]].tracking_uri
    group = [jobs[index] for index in picked]
    stored = perform_group(
        lambda: open_client(uri), group, on_retry, partial(tell, "flushing", name)
    )
    return _left(items, picked, stored, started)
