"""``RunActor``: one run's actor. It owns the run's queues and serializes its flushes.

A flush is a *round*: take everything queued (one snapshot), plan it, hand the job to the
executor, and wait for the job's result as a message. While a round is in flight, further
flush requests wait for the next round, which snapshots only after the current one ends.
So a run's operations reach the store in call order whatever the flushes do, and the
actor's mailbox never waits on I/O: ``status()`` and new flush requests are answered at once.

A background flush (``BACKGROUND_FLUSH``: ``flush_interval``, a full batch, ``max_queued``)
takes the same rounds, with nobody waiting. A failed round is kept in the session's
:class:`~actors._failures.FailureLog` until a ``flush()`` raises it (``close()`` raises the
rest), and logged as a warning when no ``flush()`` waits on it: never silent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pykka
from mlflow.exceptions import MlflowException

from actors._executor import DoneHook, failed_result
from actors._failures import FailureLog, RoundFailure
from actors._perform import Job, JobResult, JobStopped, empty_counts, failure_message
from actors._plan import plan_snapshot

if TYPE_CHECKING:
    from actors._session import RunHandle, Session


class FlushRequest:
    """Ask a run actor to flush; the reply is a future of that flush's outcome."""


_logger = logging.getLogger(__name__)

FLUSH = FlushRequest()
BACKGROUND_FLUSH = FlushRequest()  # told, not asked: nobody waits for its outcome


@dataclass(frozen=True)
class JobDone:
    """Told by the executor when a round's job has finished."""

    result: JobResult


@dataclass(frozen=True)
class RunFinished:
    """Told to the supervisor: the run is terminated and flushed, after ``seen`` flushes."""

    handle: RunHandle
    ref: pykka.ActorRef[Any]
    seen: int


def _fail(future: pykka.ThreadingFuture[None], message: str, log: FailureLog, token: int) -> None:
    exc = RoundFailure(message, log, token)
    future.set_exception((MlflowException, exc, None))


class RunActor(pykka.ThreadingActor):
    """The actor of one run (pending or addressed by its ID)."""

    use_daemon_thread = True  # the exit handler, not thread joins, bounds shutdown

    def __init__(
        self, supervisor: pykka.ActorRef[Any], session: Session, handle: RunHandle
    ) -> None:
        super().__init__()
        self._supervisor = supervisor
        self._session = session
        self._handle = handle
        self._seen = 0
        self._inflight = False
        self._creating = False
        self._waiters: list[pykka.ThreadingFuture[None]] = []
        self._next: list[pykka.ThreadingFuture[None]] = []
        self._next_requested = False  # a request (perhaps a background one) awaits a round

    def on_receive(self, message: Any) -> Any:
        if message is FLUSH:
            return self._on_flush()
        if message is BACKGROUND_FLUSH:
            self._on_background_flush()
            return None
        if isinstance(message, JobDone):
            self._on_job_done(message.result)
            return None
        raise TypeError(f"{self} got an unexpected message: {message!r}")

    def _on_flush(self) -> pykka.ThreadingFuture[None]:
        self._seen += 1
        done: pykka.ThreadingFuture[None] = pykka.ThreadingFuture()
        if self._inflight:
            self._next.append(done)
            self._next_requested = True
        else:
            self._start_round([done])
        return done

    def _on_background_flush(self) -> None:
        self._seen += 1
        if self._inflight:
            self._next_requested = True
        else:
            self._start_round([])

    def _start_round(self, waiters: list[pykka.ThreadingFuture[None]]) -> None:
        handle, record = self._handle, self._handle.record
        self._waiters = waiters  # from here on, a crash fails them (on_failure)
        # Busy before the queues look empty: the supervisor skips a run only when it sees
        # both no work and no round, so a flush can never slip past a round being started.
        record.state = "waiting"
        snapshot = handle.queues.take()
        spooler = self._session.spooler
        spooled = spooler is not None and spooler.holds(handle)
        if snapshot.is_empty() and not spooled:
            record.state = "idle"
            self._waiters = []
            for waiter in waiters:
                waiter.set(None)
            self._report_if_finished()
            return
        try:
            calls = plan_snapshot(snapshot)
        except BaseException:
            handle.queues.put_back(snapshot)  # nothing was sent: the next round retries it
            record.state = "idle"
            raise
        job = Job(
            tracking_uri=self._session.config.tracking_uri,
            run_id=record.run_id,
            calls=calls,
            retry_timeout=self._session.config.retry_timeout,
            label=record.label,
        )
        if record.run_id is None and snapshot.create is None and record.create_error:
            job.label = f"{record.label} (creation failed: {record.create_error})"
        self._inflight = True
        record.start_round()  # runactors_flush_seconds measures from here
        self._creating = snapshot.create is not None
        record.inflight = snapshot.counts()
        ref = self.actor_ref
        budget, held = self._session.budget, snapshot.held()

        def on_state(state: str, worker: str | None, detail: str | None = None) -> None:
            # Called on the executor's thread; only this run's job writes these fields.
            if state == "retrying":
                record.note_retry(detail)  # counts it for status() and the endpoint
            record.state, record.worker = state, worker

        def on_done(result: JobResult) -> None:
            if budget is not None:  # the round's entities leave memory, delivered or not
                budget.release(held)
            try:
                ref.tell(JobDone(result))
            except pykka.ActorDeadError:  # stopped or crashed meanwhile: nobody to tell
                pass

        done: DoneHook = on_done
        if spooler is not None:  # undelivered calls go to the spool (actors._spooling)
            job.stop_on_transient = True
            done = spooler.track(handle, on_done)
            if spooled:
                spooler.resend(handle, job, self._session.executor, on_state, done)
                return
        try:
            self._session.executor().submit(job, on_state, done)
        except Exception as exc:  # the executor is shut down: fail this round only
            if spooler is not None:  # on_done, inside done, gives the budget back
                done(failed_result(job, JobStopped(str(exc))))
                return
            if budget is not None:
                budget.release(held)
            self._on_job_done(failed_result(job, exc))

    def _on_job_done(self, result: JobResult) -> None:
        handle, record = self._handle, self._handle.record
        self._inflight = False
        if result.created and result.run_id is not None:
            record.run_id = result.run_id
            if handle.pending is not None:
                handle.pending._set_created(result.run_id)
        elif self._creating and result.create_error is not None:
            record.create_error = result.create_error
            if handle.pending is not None:
                handle.pending._set_failed(result.create_error)
        for kind, n in result.logged.items():
            record.logged[kind] += n
        if result.sql_fast_path is not None:
            record.sql_fast_path = result.sql_fast_path
        record.end_round(result)  # the process's totals and the round's duration
        record.inflight = empty_counts()
        record.errors.add(result.errors)
        record.terminated = record.terminated or result.terminated
        record.state, record.worker = ("spooled" if result.spooled else "idle"), None
        waiters, self._waiters = self._waiters, []
        if result.errors:
            message = failure_message(record.label, result.errors)
            failures = self._session.failures
            token = failures.add(message)
            if not waiters:
                _logger.warning("runactors: a background flush failed: %s", message)
            for waiter in waiters:
                _fail(waiter, message, failures, token)
        else:
            for waiter in waiters:
                waiter.set(None)
        if self._next_requested:
            waiters, self._next, self._next_requested = self._next, [], False
            self._start_round(waiters)
        else:
            self._report_if_finished()

    def _report_if_finished(self) -> None:
        if self._handle.record.terminated and not self._handle.queues.has_work():
            self._supervisor.tell(RunFinished(self._handle, self.actor_ref, self._seen))

    def _fail_waiters(self, message: str) -> None:
        pending = self._handle.pending
        if self._inflight and self._creating and pending is not None:
            # Its creation's outcome would come back to a dead actor: settle it now.
            pending._set_failed(message)
        waiters = self._waiters + self._next
        self._waiters, self._next, self._next_requested = [], [], False
        if not waiters:
            return
        text = failure_message(self._handle.record.label, [message])
        failures = self._session.failures
        token = failures.add(text)
        for waiter in waiters:
            _fail(waiter, text, failures, token)

    def on_stop(self) -> None:
        record = self._handle.record
        self._fail_waiters("the client was closed before this flush completed")
        record.state = "stopped" if record.terminated and not self._inflight else "closed"

    def on_failure(self, *exc_info: Any) -> None:
        record = self._handle.record
        error = f"run actor crashed: {exc_info[1]!r}"
        record.errors.add([error])
        record.state = "crashed"
        if not (self._waiters or self._next):  # nobody waits to hear it: keep it for close()
            self._session.failures.add(failure_message(record.label, [error]))
            _logger.warning("runactors: %s", failure_message(record.label, [error]))
        self._fail_waiters(error)
