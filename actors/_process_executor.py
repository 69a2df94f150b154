"""``ProcessExecutor``: the tracking calls in worker processes, past the GIL.

Up to ``max_workers`` pool threads in this process each own one worker process (a fresh
interpreter running :mod:`actors._worker`, started on first use and reused). A pool thread takes
a job, sends it cloudpickled, relays the worker's progress to the run's record, and returns
the result. If the worker dies mid-job, the pool thread starts a fresh one and resumes the job
after the last call that completed; only the run of that job is affected. A ``create_run``
that was in flight when its worker died is not resent (it may have landed: resending could
make a second run); it is reported as failed instead.
"""

from __future__ import annotations

import os
import site
import socket
import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path

import cloudpickle

from actors._executor import JobPool, StateHook
from actors._perform import Job, JobResult, compress_errors, record_outcome
from actors._plan import CreateRunCall

# The folder that holds the ``actors`` package, so that workers import the same code.
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


def _site_dirs() -> set[str]:
    # An installed package needs no PYTHONPATH; putting site-packages there would move it
    # ahead of the standard library in the worker.
    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    return {str(Path(d).resolve()) for d in dirs}


class _Worker:
    """One worker process and the parent's end of its socket."""

    def __init__(self, name: str) -> None:
        parent, child = socket.socketpair()
        env = dict(os.environ)
        if _PACKAGE_ROOT not in _site_dirs():  # running from a source tree: point at it
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p
            )
        self.process = subprocess.Popen(
            [sys.executable, "-m", "actors._worker", str(child.fileno())],
            pass_fds=(child.fileno(),),
            env=env,
            stdin=subprocess.DEVNULL,
        )
        child.close()
        self.conn = Connection(parent.detach())
        self.name = f"{name}[pid {self.process.pid}]"

    def stop(self, timeout: float | None) -> None:
        self.conn.close()  # the worker exits when its socket closes
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class _Slot:
    """A pool thread's worker process, replaced when it dies."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.worker: _Worker | None = None

    def run_job(self, job: Job, on_state: StateHook) -> JobResult:
        prior: JobResult | None = None  # outcomes of calls made by workers that died
        remaining = list(job.calls)
        deaths = 0
        while True:
            if self.worker is None or self.worker.process.poll() is not None:
                self.worker = _Worker(self.label)
            worker = self.worker
            run_id = job.run_id if prior is None else prior.run_id
            progress = JobResult(run_id=run_id)
            try:
                worker.conn.send_bytes(
                    cloudpickle.dumps(
                        Job(job.tracking_uri, run_id, remaining, job.retry_timeout, job.label)
                    )
                )
                while True:
                    message = cloudpickle.loads(worker.conn.recv_bytes())
                    if isinstance(message, JobResult):
                        return message if prior is None else _merge(prior, message)
                    kind, *rest = message
                    if kind == "state":
                        on_state(rest[0], worker.name)
                    else:  # "call": the next call's outcome
                        record_outcome(progress, remaining.pop(0), rest[0], rest[1])
            except (EOFError, OSError):
                worker.stop(1.0)
                self.worker = None
                deaths += 1
            prior = progress if prior is None else _merge(prior, progress)
            if not remaining:
                return prior
            if deaths > 1 or isinstance(remaining[0], CreateRunCall):
                why = (
                    "its worker process died during create_run (not resent: it may have landed)"
                    if isinstance(remaining[0], CreateRunCall)
                    else "its worker process died twice"
                )
                for call in remaining:
                    record_outcome(prior, call, f"{type(call).__name__} not sent: {why}", None)
                prior.errors = compress_errors(prior.errors)
                return prior
            on_state("waiting", None)


def _merge(done: JobResult, rest: JobResult) -> JobResult:
    """The outcome of a job resumed after a worker died: earlier calls, then the rest."""
    merged = JobResult(run_id=rest.run_id or done.run_id)
    merged.created = done.created or rest.created
    merged.create_error = done.create_error or rest.create_error
    merged.terminated = done.terminated or rest.terminated
    for kind in merged.logged:
        merged.logged[kind] = done.logged[kind] + rest.logged[kind]
    merged.errors = compress_errors(done.errors + rest.errors)
    return merged


class ProcessExecutor(JobPool[_Slot]):
    """Performs jobs in up to ``max_workers`` worker processes, started on demand."""

    def __init__(self, max_workers: int | None = None, name: str = "runactors") -> None:
        super().__init__(max_workers, name)
        self._slots: list[_Slot] = []

    def _open(self, index: int) -> _Slot:
        slot = _Slot(f"{self.name}-worker-{index}")
        self._slots.append(slot)
        return slot

    def _perform(self, state: _Slot, job: Job, on_state: StateHook) -> JobResult:
        return state.run_job(job, on_state)

    def _close(self, state: _Slot) -> None:
        if state.worker is not None:
            state.worker.stop(self._stop_timeout)
            state.worker = None

    def _after_shutdown(self) -> None:
        for slot in list(self._slots):  # past the deadline: leave no process behind
            worker = slot.worker
            if worker is not None and worker.process.poll() is None:
                worker.process.kill()

    def worker_pids(self) -> list[int]:
        """PIDs of the live worker processes."""
        return [
            slot.worker.process.pid
            for slot in list(self._slots)
            if slot.worker is not None and slot.worker.process.poll() is None
        ]
