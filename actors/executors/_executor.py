"""Executors: where the tracking calls run, bounded so that many runs do not mean many writers.

:class:`ThreadExecutor` runs jobs on at most ``max_workers`` daemon threads, started on
demand (:class:`~actors.executors._threads.DaemonThreads`), ending when idle, and stopped by
:meth:`~ThreadExecutor.shutdown`. Daemon threads (not ``concurrent.futures``, whose workers
are joined before ``atexit`` handlers run and refuse new work there) let the actor system's
exit handler still flush and then stop within its bound.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

from actors.delivery._fast_runs import can_group
from actors.delivery._jobs import Job, JobResult, JobState, JobStopped, retry_error_text
from actors.delivery._perform import perform_job
from actors.executors._process_groups import GROUP_JOBS, deliver, perform_groupable
from actors.executors._threads import IDLE_TIMEOUT, DaemonThreads, ThreadsStopped
from actors.queueing._plan import Call

_logger = logging.getLogger("runactors.executors")

S = TypeVar("S")


class StateHook(Protocol):
    """Hears what a job is doing: ``state`` (``flushing``, ``retrying``, ``waiting``), on
    which ``worker``, and for ``retrying`` the transient error being retried (``detail``)."""

    def __call__(self, state: JobState, worker: str | None, detail: str | None = None) -> None: ...


DoneHook = Callable[[JobResult], None]


def default_max_workers() -> int:
    """The seed's pool size: ``min(2 x CPUs, 8)``."""
    return min((os.cpu_count() or 4) * 2, 8)


class Executor(Protocol):
    """What a run actor needs from an executor."""

    def submit(self, job: Job, on_state: StateHook, on_done: DoneHook) -> None: ...

    def shutdown(self, timeout: float | None = None) -> None: ...

    def problems(self) -> list[str]: ...


def failed_result(job: Job, exc: BaseException) -> JobResult:
    """The result of a job that could not be performed at all.

    With a spool, a job stopped because the client is closing is spooled, not failed."""
    result = JobResult(run_id=job.run_id)
    if job.stop_on_transient and isinstance(exc, JobStopped):
        result.unsent, result.unsent_error = list(job.calls), f"not sent: {exc}"
        return result
    result.errors.append(f"could not perform the run's calls: {exc!r}")
    if job.run_id is None:
        result.create_error = repr(exc)
    return result


class ExecutorShutDown(JobStopped):
    """Raised inside a job that the pool gave up on: nothing more of it may be sent."""


class JobPool(Generic[S]):
    """What both executors share: a job queue and up to ``max_workers`` daemon threads,
    started on demand (:class:`DaemonThreads`), each holding a per-thread state ``S`` (a
    worker process, say); a thread idle for :attr:`idle_timeout` seconds ends.

    A pool thread never dies of a job: whatever performing a job raises becomes that job's
    failed result, so the pool stays whole and every job gets an answer. Once
    :meth:`shutdown` has passed its deadline the pool is *abandoned*: jobs still queued fail
    without being performed, and ``_after_shutdown`` stops whatever is still running.
    """

    idle_timeout: float | None = IDLE_TIMEOUT
    group_jobs = 1  # jobs a pool thread takes at once (groups of whole runs)

    def __init__(self, max_workers: int | None, name: str) -> None:
        self.max_workers = max_workers or default_max_workers()
        self.name = name
        self._threads: DaemonThreads[tuple[Job, StateHook, DoneHook], S] = DaemonThreads(
            name,
            self.max_workers,
            self._serve,
            self._open,
            self._close,
            idle_timeout=self.idle_timeout,
            what="delivering a job's result",  # _run never raises: only on_done can
        )
        self._lock = threading.Lock()
        self._put_back: set[int] = set()  # id() of jobs a group put back, not stored by it
        self._closed = False
        self._abandoned = False
        self._stop_timeout: float | None = None

    def submit(self, job: Job, on_state: StateHook, on_done: DoneHook) -> None:
        try:
            self._threads.submit((job, on_state, on_done))
        except ThreadsStopped:
            raise RuntimeError("executor is shut down") from None

    def _serve(self, state: S, item: tuple[Job, StateHook, DoneHook]) -> None:
        """Perform the job ``item`` and, if it may share a group, the groupable jobs queued
        now (up to :attr:`group_jobs`, taken from the queue in their order, the others left
        in theirs for an idle thread)."""
        items = [item]
        try:
            grouped = self.group_jobs > 1 and not self._alone(item) and self._groupable(item[0])
        except Exception:  # a bug: this job alone, as always
            _logger.exception("taking a group of jobs failed")
            grouped = False
        with self._group_turn(item[0]) if grouped else nullcontext():
            if grouped:  # taken after the turn: what queued meanwhile joins the group
                try:
                    items += self._threads.take_more(
                        lambda it: id(it[0]) not in self._put_back and self._groupable(it[0]),
                        self.group_jobs - 1,
                    )
                except Exception:  # a bug: this job alone (the queue lost nothing)
                    _logger.exception("taking a group of jobs failed")
            self._run_many(state, items)

    def _group_turn(self, job: Job) -> AbstractContextManager[object]:
        """Held while a group for ``job``'s store is taken and stored (the process
        executor's: one pool thread at a time per SQLite file); nothing here."""
        return nullcontext()

    def _groupable(self, job: Job) -> bool:
        """Whether ``job`` may share a group (see :meth:`_run_many`)."""
        return False

    def _alone(self, item: tuple[Job, StateHook, DoneHook]) -> bool:
        """Whether ``item`` was put back by a group that did not store it: performed alone."""
        with self._lock:
            if id(item[0]) in self._put_back:
                self._put_back.discard(id(item[0]))
                return True
            return False

    def _run_many(self, state: S, items: list[tuple[Job, StateHook, DoneHook]]) -> None:
        """Perform the first of the jobs a pool thread took at once (those a group did not
        store) and put the others back for idle threads, so that a slow or failing run
        never holds up the runs that happened to be taken with it; each result delivered
        as soon as it is known; never raises."""
        if len(items) > 1 and not self._abandoned:
            rest = items[1:]
            with self._lock:
                self._put_back.update(id(job) for job, _, _ in rest)
            if self._threads.put_back(rest):
                items = items[:1]
            else:  # stopped meanwhile: this thread performs them, in their order
                with self._lock:
                    self._put_back.difference_update(id(job) for job, _, _ in rest)
        for job, on_state, on_done in items:
            deliver(on_done, self._run(state, job, on_state))

    def _run(self, state: S, job: Job, on_state: StateHook) -> JobResult:
        """Perform one job; never raises."""
        if self._abandoned:
            return failed_result(job, ExecutorShutDown("the client was closed before it started"))
        try:
            return self._perform(state, job, on_state)
        except BaseException as exc:  # a bug, a MemoryError: this job fails, the thread goes on
            _logger.exception("performing a job failed")
            return failed_result(job, exc)

    def _open(self, index: int) -> S:
        """A new pool thread's state; must not raise (start anything costly lazily)."""
        raise NotImplementedError

    def _perform(self, state: S, job: Job, on_state: StateHook) -> JobResult:
        raise NotImplementedError

    def _close(self, state: S) -> None:
        """Release a thread's state when the thread ends (idle, or the pool shut down)."""

    def shutdown(self, timeout: float | None = None) -> None:
        """Finish the jobs already submitted, then stop; wait up to ``timeout`` seconds.

        Past the deadline, jobs not started yet fail unperformed and ``_after_shutdown``
        stops what is still running: nothing of this pool is sent after this returns
        (except, on the thread executor, the one call each thread may be blocked in).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop_timeout = timeout
        self._threads.stop(timeout)
        self._abandoned = True
        self._after_shutdown()

    def _after_shutdown(self) -> None:
        """Whatever must not outlive the pool even past the deadline."""

    def problems(self) -> list[str]:
        """Why the pool cannot perform jobs now (empty: it can): it was shut down, or one of
        its threads died (a job never kills one; something else did)."""
        if self._closed:
            return [f"worker pool {self.name}: shut down"]
        return [f"worker pool {self.name}: its thread {t.name} died" for t in self._threads.died()]


class ThreadExecutor(JobPool[str]):
    """Performs jobs on up to ``max_workers`` daemon threads, one ``MlflowClient`` per URI."""

    def __init__(self, max_workers: int | None = None, name: str = "runactors") -> None:
        super().__init__(max_workers, name)
        self._clients: dict[str, Any] = {}
        # Not the pool's lock: making a client opens the store, which can block on a locked
        # database, and shutdown() must never wait behind that.
        self._clients_lock = threading.Lock()

    def _client(self, uri: str) -> Any:
        client = self._clients.get(uri)
        if client is None:
            from actors.delivery._store import make_client

            with self._clients_lock:
                client = self._clients.get(uri)
                if client is None:
                    # MLflow's HTTP retries off for these calls only: the user's own clients
                    # in this process keep MLflow's settings.
                    client = self._clients[uri] = make_client(uri)
        return client

    def _open(self, index: int) -> str:
        return threading.current_thread().name

    group_jobs = GROUP_JOBS

    def _groupable(self, job: Job) -> bool:
        return can_group(job)

    def _run_many(self, state: str, items: list[tuple[Job, StateHook, DoneHook]]) -> None:
        """Whole runs among ``items`` in one transaction on this thread; the rest (and
        any the group did not store) one by one."""
        if not self._abandoned:
            try:
                items = perform_groupable(state, items, self._client, self._check_open)
            except BaseException:  # a bug: perform them one by one, as always
                _logger.exception("performing a group of runs failed")
        super()._run_many(state, items)

    def _check_open(self) -> None:
        # A thread cannot be stopped in the middle of a call; between calls and retries it
        # stops once the pool is abandoned.
        if self._abandoned:
            raise ExecutorShutDown("the client was closed: the rest of the job was not sent")

    def _perform(self, state: str, job: Job, on_state: StateHook) -> JobResult:
        def on_retry(exc: BaseException, delay: float) -> None:
            self._check_open()
            on_state("retrying", state, retry_error_text(exc))

        def on_retry_end() -> None:
            on_state("flushing", state)

        def on_call(call: Call, error: str | None, run_id: str | None) -> None:
            self._check_open()

        on_state("flushing", state)
        try:
            open_client = partial(self._client, job.tracking_uri)
            return perform_job(open_client, job, on_retry, on_call, on_retry_end)
        except BaseException as exc:  # a bad URI, a broken store: fail this job alone
            return failed_result(job, exc)
