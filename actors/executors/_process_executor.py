"""``ProcessExecutor``: the tracking calls in worker processes, past the GIL.

Up to ``max_workers`` pool threads in this process each own one worker process (a fork of the
pre-imported worker template, :mod:`actors.executors._template`, never of this process, running
:mod:`actors.executors._worker`; started on first use and reused). A pool thread takes a job,
sends it
cloudpickled, relays the worker's progress to the run's record, and returns the result. If
the worker dies mid-job, the pool thread starts a new one and resumes the job
after the last call that completed; only the run of that job is affected. A ``create_run``
that was in flight when its worker died is not resent (it may have landed: resending could
make a second run); it is reported as failed instead.

Every other fault fails the job's unsent calls and leaves the pool whole: a call that cannot be
pickled fails alone, a worker that cannot start or a protocol fault fails the rest of the job.
Once the pool has shut down, no worker is started and nothing is sent. A forked child closes
its copies of the parent's worker sockets, so that workers exit when their parent closes them.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import socket
import threading
import time
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from multiprocessing.connection import Connection

import cloudpickle

from actors.delivery._fast_runs import can_group
from actors.delivery._jobs import Job, JobResult, merge_results, record_outcome
from actors.delivery._sqlite_gate import database_gate, uri_database_key
from actors.executors import _template, _worker
from actors.executors._executor import DoneHook, JobPool, StateHook
from actors.executors._payload import dumps_job, fail_rest, stop_rest
from actors.executors._process_groups import GROUP_JOBS, send_groupable
from actors.queueing._queues import CreateRunCall

# Every worker of this process, so that a forked child can close its copies of their sockets.
# Held while a worker's sockets are made and registered, and across os.fork(), so that a
# child never inherits a socket that is not registered yet.
_workers_lock = threading.Lock()
_workers: weakref.WeakSet[_Worker] = weakref.WeakSet()

# Told ``(pid, pidfd)`` of every worker once it runs: the keeper (actors.keeper) waits for a
# dead process's workers to be gone before it ends that process's runs. Must not raise.
worker_started: list[Callable[[int, int], None]] = []


class _Worker:
    """One worker process (forked by the template, so not our child: it is known by a pidfd
    it sends once it runs) and the parent's end of its socket."""

    def __init__(self, name: str) -> None:
        self.label = name
        self.name = name
        self.owner = os.getpid()
        self.pid: int | None = None
        self._pidfd: int | None = None
        self._lock = threading.Lock()  # pid and pidfd vs kill_process, close vs shutdown
        self._closed = False
        with _workers_lock:
            parent, child = socket.socketpair()
            try:
                _template.fork_worker(child)
            except BaseException:
                parent.close()
                child.close()
                raise
            child.close()
            self.conn = Connection(parent.detach())
            _workers.add(self)

    def hello(self) -> None:
        """Wait until the worker runs (its PID and pidfd), then send it this process's
        environment and working directory. ``EOFError`` if it never came up."""
        if self.pid is not None:
            return
        sock = socket.socket(fileno=self.conn.fileno())
        try:
            data, fds, _, _ = socket.recv_fds(sock, _worker.HELLO.size, 1)
            while data and len(data) < _worker.HELLO.size:
                data += sock.recv(_worker.HELLO.size - len(data))
        finally:
            sock.detach()
        if len(data) < _worker.HELLO.size or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise EOFError("the worker process did not start")
        (pid,) = _worker.HELLO.unpack(data)
        with self._lock:
            self.pid, self._pidfd = pid, fds[0]
            self.name = f"{self.label}[pid {pid}]"
        for hook in list(worker_started):
            hook(pid, fds[0])
        self.conn.send_bytes(pickle.dumps((dict(os.environ), os.getcwd())))

    def exited(self) -> bool:
        """Whether the worker has exited (one whose hello has not come has not)."""
        with self._lock:
            if self._pidfd is None:
                return self.pid is not None  # None until its hello; then gone once forgotten
            return bool(select.select([self._pidfd], [], [], 0)[0])

    def stop(self, timeout: float | None) -> None:
        """Close the socket (the worker exits when it sees EOF); kill it after ``timeout``."""
        self._close_conn()
        if os.getpid() != self.owner:  # a fork child's copy: the process is not ours
            return
        if not self._wait(timeout):
            self.kill_process()

    def kill(self) -> None:
        """Kill the worker and wait for it; close the socket too (only its pool thread may do
        that while a job is in flight: closing it under a blocked read could let the
        descriptor's number be reused under that read)."""
        self.kill_process()
        self._close_conn()

    def kill_process(self) -> None:
        """Kill the worker and wait until it is gone: its pool thread's read on the socket
        ends with EOF. A worker whose hello has not come is cut off instead (its socket shut
        down: its pool thread sees EOF, and the worker, if it ever runs, exits at once)."""
        if os.getpid() != self.owner:
            return
        with self._lock:
            pidfd = self._pidfd
            if pidfd is None:
                if not self._closed:
                    sock = socket.socket(fileno=self.conn.fileno())
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    finally:
                        sock.detach()
                return
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except OSError:  # gone already
                pass
        self._wait(None)

    def _wait(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` for the worker to be gone (exited and reaped by the
        template or, if the template died first, by init); ``True`` once it is gone."""
        with self._lock:  # a copy of the pidfd: another thread may be waiting too
            if self._pidfd is None:
                return True  # never ran (it exits at once on its closed socket), or gone
            pidfd = os.dup(self._pidfd)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                try:
                    signal.pidfd_send_signal(pidfd, 0)  # succeeds until it is reaped
                except ProcessLookupError:
                    break
                left = 0.05 if deadline is None else min(deadline - time.monotonic(), 0.05)
                if left <= 0:
                    return False
                if select.select([pidfd], [], [], left)[0]:  # exited: a zombie until reaped
                    time.sleep(0.001)
        finally:
            os.close(pidfd)
        self._forget_pidfd()
        return True

    def _forget_pidfd(self) -> None:
        with self._lock:
            pidfd, self._pidfd = self._pidfd, None
        if pidfd is not None:
            os.close(pidfd)

    def _close_conn(self) -> None:
        with self._lock:
            self._closed = True
            self.conn.close()

    def forget_in_child(self) -> None:
        """In a forked child: drop this process's copy of the parent's socket and pidfd."""
        self._lock = threading.Lock()  # a parent thread may have held it at fork time
        self.conn.close()
        self._closed = True
        self._forget_pidfd()


def _before_fork() -> None:
    _workers_lock.acquire()


def _after_fork_in_parent() -> None:
    _workers_lock.release()


def _after_fork_in_child() -> None:
    # The child's copies of the parent's worker sockets would keep those workers from ever
    # seeing their socket close, and so hold the parent's close() for the child's lifetime.
    for worker in list(_workers):
        try:
            worker.forget_in_child()
        except OSError:  # pragma: no cover - already closed
            pass
    _workers.clear()
    _workers_lock.release()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)


class _SlotClosed(Exception):
    """The pool has shut down: this slot starts no worker and sends nothing."""


class _Slot:
    """A pool thread's worker process, replaced when it dies, until the slot is closed."""

    def __init__(self, label: str, closed: bool = False) -> None:
        self.label = label
        self.worker: _Worker | None = None
        self._lock = threading.Lock()
        self._closed = closed
        self._busy = False  # a job is in flight: its pool thread owns the worker's socket

    def _live_worker(self) -> _Worker:
        """The slot's worker, a new one (forked by the template) if it has none or it died."""
        with self._lock:
            if self._closed:
                raise _SlotClosed
            self._busy = True
            worker = self.worker
            if worker is not None and worker.exited():
                worker.stop(0)  # died between jobs: close our end
                worker = None
            if worker is None:
                worker = self.worker = _Worker(self.label)
            return worker

    def _discard(self, worker: _Worker, timeout: float | None) -> None:
        """Stop a worker that died or can no longer be trusted."""
        worker.stop(timeout)
        with self._lock:
            if self.worker is worker:
                self.worker = None

    def stop(self, timeout: float | None) -> None:
        """Stop the worker for the pool's orderly shutdown (it stays the slot's worker until
        it has exited, so that :meth:`close` can still kill it past the pool's deadline)."""
        worker = self.worker
        if worker is not None:
            self._discard(worker, timeout)

    def close(self) -> None:
        """Close for good: start no worker again, kill and reap the current one."""
        with self._lock:
            self._closed = True
            worker, busy = self.worker, self._busy
            if not busy:
                self.worker = None
        if worker is None:
            return
        if busy:
            worker.kill_process()  # its pool thread sees EOF and discards it
        else:
            worker.kill()

    def run_job(self, job: Job, on_state: StateHook) -> JobResult:
        try:
            return self._run_job(job, on_state)
        finally:
            with self._lock:
                self._busy = False

    def _run_job(self, job: Job, on_state: StateHook) -> JobResult:
        prior: JobResult | None = None  # outcomes of calls made by workers that died
        remaining = list(job.calls)
        deaths = starts = 0
        while True:
            run_id = job.run_id if prior is None else prior.run_id
            refused = JobResult(run_id=run_id)
            try:
                payload = dumps_job(job, run_id, remaining, refused)
            except Exception as exc:  # the job as a whole cannot be pickled (its size, say)
                return fail_rest(prior, refused, remaining, f"could not pickle the job: {exc!r}")
            if refused.errors:  # calls that cannot be pickled failed here; the rest go on
                prior = refused if prior is None else merge_results(prior, refused)
                run_id = prior.run_id
            if payload is None:  # nothing sendable is left
                return fail_rest(prior, None, [], "")
            progress = JobResult(run_id=run_id)
            try:
                worker = self._live_worker()
            except _SlotClosed:
                return stop_rest(job, prior, progress, remaining)
            except Exception as exc:
                why = f"could not start a worker process: {exc!r}"
                return fail_rest(prior, progress, remaining, why)
            try:
                worker.hello()
            except (EOFError, OSError) as exc:  # the template died, or the pool closed
                self._discard(worker, 0)
                starts += 1
                if self._closed:
                    return stop_rest(job, prior, progress, remaining)
                if starts > 1:
                    why = f"could not start a worker process: {exc!r}"
                    return fail_rest(prior, progress, remaining, why)
                continue
            try:
                worker.conn.send_bytes(payload)
                while True:
                    message = cloudpickle.loads(worker.conn.recv_bytes())
                    if isinstance(message, JobResult):
                        return message if prior is None else merge_results(prior, message)
                    kind, *rest = message
                    if kind == "state":  # (state,) or (state, detail)
                        on_state(rest[0], worker.name, *rest[1:2])
                    elif kind == "call":  # the next call's outcome
                        record_outcome(progress, remaining.pop(0), rest[0], rest[1])
                    else:  # "refused": the worker could not read the job
                        why = f"the worker process could not read the job: {rest[0]}"
                        return fail_rest(prior, progress, remaining, why)
            except (EOFError, OSError):
                self._discard(worker, 1.0)
                deaths += 1
            except BaseException as exc:  # the exchange is out of step: trust no more of it
                self._discard(worker, 0)
                why = f"its worker process was stopped: {exc!r}"
                return fail_rest(prior, progress, remaining, why)
            prior = progress if prior is None else merge_results(prior, progress)
            if not remaining:
                return prior
            if self._closed:
                return stop_rest(job, prior, None, remaining)
            if deaths > 1 or isinstance(remaining[0], CreateRunCall):
                why = (
                    "its worker process died during create_run (not resent: it may have landed)"
                    if isinstance(remaining[0], CreateRunCall)
                    else "its worker process died twice"
                )
                return fail_rest(prior, None, remaining, why)
            on_state("waiting", None)


class ProcessExecutor(JobPool[_Slot]):
    """Performs jobs in up to ``max_workers`` worker processes, started on demand."""

    idle_timeout = None  # a worker process is costly to start: it lives as long as the pool

    def __init__(self, max_workers: int | None = None, name: str = "runactors") -> None:
        super().__init__(max_workers, name)
        self._slots: list[_Slot] = []
        self._slots_lock = threading.Lock()
        self._killed = False
        _template.acquire()  # its imports overlap with what comes before the first job

    def _open(self, index: int) -> _Slot:
        with self._slots_lock:
            slot = _Slot(f"{self.name}-worker-{index}", closed=self._killed)
            self._slots.append(slot)
        return slot

    def _perform(self, state: _Slot, job: Job, on_state: StateHook) -> JobResult:
        return state.run_job(job, on_state)

    group_jobs = GROUP_JOBS

    def _groupable(self, job: Job) -> bool:
        return can_group(job)

    def _group_turn(self, job: Job) -> AbstractContextManager[object]:
        # Worker processes meet at SQLite's lock, whose busy handler sleeps up to 100 ms per
        # look: the pool threads take turns on this process's gate instead, and the runs
        # queued while one waits go in its group (one commit) rather than in commits of
        # their own.
        return database_gate(uri_database_key(job.tracking_uri))

    def _run_many(self, state: _Slot, items: list[tuple[Job, StateHook, DoneHook]]) -> None:
        left = [] if self._abandoned else send_groupable(state, items)
        super()._run_many(state, items if self._abandoned else left)

    def _close(self, state: _Slot) -> None:
        state.stop(self._stop_timeout)

    def _after_shutdown(self) -> None:
        # Past the deadline: kill and reap every worker, and let no slot start another, so
        # that no process of this pool outlives close() and nothing is sent after it.
        with self._slots_lock:
            self._killed = True
            slots = list(self._slots)
        for slot in slots:
            slot.close()
        _template.release()

    def problems(self) -> list[str]:
        """The pool's problems, and each worker process that died (killed, out of memory)
        and is not replaced yet: its slot starts a new one at its next job."""
        problems = super().problems()
        for slot in list(self._slots):
            worker = slot.worker
            if worker is not None and worker.exited():
                problems.append(
                    f"worker pool {self.name}: its worker process {worker.name} died "
                    "(a new one starts at its next job)"
                )
        return problems

    def worker_pids(self) -> list[int]:
        """PIDs of the live worker processes."""
        pids = []
        for slot in list(self._slots):
            worker = slot.worker
            if worker is not None and worker.pid is not None and not worker.exited():
                pids.append(worker.pid)
        return pids
