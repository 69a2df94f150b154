"""``RunActor``: one run's actor. It owns the run's queues and serializes its flushes.

A flush is a *round*: take everything queued (one snapshot), plan it, hand the job to the
executor, and wait for the job's result as a message. The actor gets one round at a time
from the supervisor (a :class:`Flush`) and tells it when the round has ended
(:class:`RoundEnded`); requests that come meanwhile wait at the supervisor for the next
round, which snapshots only after the current one ends. So a run's operations reach the
store in call order whatever the flushes do, and the actor's mailbox never waits on I/O.

A background flush (``flush_interval``, a full batch, ``max_queued``) is a round with no
``flush()`` waiting on it. A failed round is logged as a warning when no ``flush()`` waits
on it: never silent. What it lost is kept in the session's
:class:`~actors.runtime._failures.FailureLog` until a ``flush()`` raises it (``close()`` raises the
rest); calls it put in the spool are not lost, and are not kept there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pykka

from actors.delivery._jobs import (
    KINDS,
    Job,
    JobResult,
    JobState,
    JobStopped,
    empty_counts,
    failure_message,
)
from actors.executors._executor import DoneHook, failed_result
from actors.queueing._plan import plan_snapshot
from actors.runtime._failures import FailureLog, round_failure

if TYPE_CHECKING:
    from actors.runtime._session import Session
    from actors.status._handle import RunHandle, RunWait
    from actors.status._results import RunState


_logger = logging.getLogger("runactors.runtime")


@dataclass(frozen=True)
class Flush:
    """Told by the supervisor: start a round of ``handle``'s run, and settle ``waits`` (the
    ``flush()`` calls that asked for it; none for a background flush) when it ends."""

    handle: RunHandle
    waits: list[RunWait]


@dataclass(frozen=True)
class JobDone:
    """Told by the executor when a round's job has finished."""

    result: JobResult


@dataclass(frozen=True)
class RoundEnded:
    """Told to the supervisor: the round it sent has ended (``crashed``: the actor is dead)."""

    session: Session
    handle: RunHandle
    ref: pykka.ActorRef[Any]
    crashed: bool = False


def _fail(waits: list[RunWait], message: str, log: FailureLog, lost: str | None) -> None:
    """Settle ``waits`` with ``message``; ``lost`` (what is lost of it) is kept in ``log``."""
    failure = round_failure(log, message, lost)
    for wait in waits:
        wait.settle(failure)


class RunActor(pykka.ThreadingActor):
    """The actor of one run (pending or addressed by its ID) at a time.

    Between rounds it holds nothing of its run, so the supervisor may hand an idle actor
    to the next run that waits for one instead of stopping it and starting another.
    """

    use_daemon_thread = True  # the exit handler, not thread joins, bounds shutdown

    def __init__(
        self, supervisor: pykka.ActorRef[Any], session: Session, handle: RunHandle
    ) -> None:
        super().__init__()
        self._supervisor = supervisor
        self._session = session
        self._handle = handle
        self._inflight = False
        self._creating = False
        self._waiters: list[RunWait] = []

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Flush):
            # An idle actor may be handed to another run (the supervisor saves a thread).
            self._handle = message.handle
            self._on_flush(message.waits)
            return None
        if isinstance(message, JobDone):
            self._on_job_done(message.result)
            return None
        raise TypeError(f"{self} got an unexpected message: {message!r}")

    def _on_flush(self, waits: list[RunWait]) -> None:
        try:
            self._start_round(waits)
        except Exception as exc:
            if self._inflight:  # the job may be running: the actor crashes (on_failure)
                raise
            # Nothing was sent (the snapshot is back in the queues): this round fails alone.
            record = self._handle.record
            record.state = self._at_rest()
            waits, self._waiters = self._waiters, []
            message = failure_message(record.label, [f"could not start the flush: {exc!r}"])
            if not waits:
                _logger.warning("a background flush failed: %s", message)
            _fail(waits, message, self._session.failures, message)
            self._end_round()

    def _start_round(self, waiters: list[RunWait]) -> None:
        handle, record = self._handle, self._handle.record
        self._waiters = waiters  # from here on, a crash fails them (on_failure)
        snapshot = handle.queues.take()
        spooler = self._session.spooler
        spooled = spooler is not None and spooler.holds(handle)
        # Waiting for an executor worker, or (its work on disk) for a re-sending thread.
        record.state = "spooled" if spooled else "waiting"
        if snapshot.is_empty() and not spooled:
            record.state = self._at_rest()
            self._waiters = []
            for waiter in waiters:
                waiter.settle()
            self._end_round()
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
        with record.lock:  # taken from the queues, now counted in flight
            record.inflight = snapshot.counts()
        ref = self.actor_ref
        budget, held = self._session.budget, snapshot.held()
        counted = [budget is not None]  # the round's entities, until they leave memory

        def leave_memory() -> None:
            # Once: at the round's end, or (delivered from the journal) once on disk.
            if counted[0]:
                counted[0] = False
                budget.release(held)  # type: ignore[union-attr]

        def on_state(state: JobState, worker: str | None, detail: str | None = None) -> None:
            # Called on the executor's thread, while only this run's job writes these fields.
            with record.lock:
                if state == "retrying":
                    record.note_retry(detail)  # counts it for status() and the endpoint
                record.state, record.worker = state, worker

        session = self._session

        def on_disk() -> None:  # delivered from the journal: out of memory, not in flight
            leave_memory()
            with record.lock:  # until the spooler counts the journal exactly
                spooled, record.inflight = record.inflight, empty_counts()
                record.spooled = {kind: record.spooled[kind] + spooled[kind] for kind in KINDS}

        def on_done(result: JobResult) -> None:
            leave_memory()  # the round's entities leave memory, delivered or not
            try:
                ref.tell(JobDone(result))
            except pykka.ActorDeadError:  # stopped or crashed meanwhile: nobody to tell
                if result.errors:  # but what it lost is kept, for close() to raise
                    session.failures.add(failure_message(job.label, result.errors))

        done: DoneHook = on_done
        if spooler is not None:  # undelivered calls go to the spool (actors.spool._spooling)
            job.stop_on_transient = True
            done = spooler.track(handle, on_done)
            # With a write-ahead journal, a creation is sent by the spooler (noted durably).
            if spooled or (spooler.journal is not None and snapshot.create is not None):
                spooler.resend(handle, job, self._session.executor, on_state, done, on_disk)
                return
        try:
            self._session.executor().submit(job, on_state, done)
        except Exception as exc:  # the executor is shut down: fail this round only
            if spooler is not None:  # on_done, inside done, gives the budget back
                done(failed_result(job, JobStopped(str(exc))))
                return
            leave_memory()
            self._on_job_done(failed_result(job, exc))

    def _on_job_done(self, result: JobResult) -> None:
        handle, record = self._handle, self._handle.record
        self._inflight = False
        keeper = self._session.keeper if handle.pending is not None else None
        if result.created and result.run_id is not None:
            record.run_id = result.run_id
            self._session.share_params(handle, result.run_id)  # with its ID string's
            if handle.pending is not None:
                handle.pending._set_created(result.run_id)
            if keeper is not None:
                keeper.run_id(self._session.id, str(handle.pending), result.run_id)
        elif self._creating and result.create_error is not None:
            record.create_error = result.create_error
            if handle.pending is not None:
                handle.pending._set_failed(result.create_error)
        with record.lock:  # a snapshot sees the round in flight or accounted, never both
            for kind, n in result.logged.items():
                record.logged[kind] += n
            if result.sql_fast_path is not None:
                record.sql_fast_path = result.sql_fast_path
            record.end_round(result)  # the process's totals and the round's duration
            record.inflight = empty_counts()
            record.errors.add(result.errors + result.spool_notes)
            record.terminated = record.terminated or result.terminated
            record.state, record.worker = ("spooled" if result.spooled else self._at_rest()), None
        if keeper is not None and result.terminated:  # delivered: not the keeper's to end
            keeper.terminated(self._session.id, str(handle.pending))
        waiters, self._waiters = self._waiters, []
        if result.errors or result.spool_notes:
            message = failure_message(record.label, result.errors + result.spool_notes)
            if not waiters:
                _logger.warning("a background flush failed: %s", message)
            lost = failure_message(record.label, result.errors) if result.errors else None
            _fail(waiters, message, self._session.failures, lost)
        else:
            for waiter in waiters:
                waiter.settle()
        self._end_round()

    def _at_rest(self) -> RunState:
        """The state a round leaves its run in, set before its waiters hear the outcome (a
        ``flush()`` that returned sees ``stopped`` for a finished run, not a moment later).
        ``failed``: its creation was refused for good (a live round, the journal's creation
        or the spooler's re-send noted it), so nothing of it can ever be sent."""
        handle = self._handle
        if handle.record.run_id is None and handle.record.create_error is not None:
            return "failed"
        if handle.record.terminated and not handle.queues.has_work():
            return "stopped"
        return "idle"

    def _end_round(self, crashed: bool = False) -> None:
        try:
            self._supervisor.tell(RoundEnded(self._session, self._handle, self.actor_ref, crashed))
        except pykka.ActorDeadError:  # the actor system stopped (at exit): nobody to tell
            pass

    def _fail_waiters(self, message: str, lost: bool = True) -> None:
        """Fail the round's waiters with ``message``; ``lost``: it names a loss (kept for
        ``close()``), not a round whose outcome is still accounted elsewhere."""
        pending = self._handle.pending
        if self._inflight and self._creating and pending is not None:
            # Its creation's outcome would come back to a dead actor: settle it now.
            pending._set_failed(message)
        waiters, self._waiters = self._waiters, []
        if waiters:
            text = failure_message(self._handle.record.label, [message])
            _fail(waiters, text, self._session.failures, text if lost else None)

    def on_stop(self) -> None:
        # Stopped by the supervisor: idle (it set the state), or the client is closing.
        # With a spool, a round cut short here is not lost: the spooler spools what it did
        # not send, and what it lost reaches the failure log (on_done, above).
        spooled = self._session.spooler is not None
        self._fail_waiters("the client was closed before this flush completed", not spooled)
        if self._session.closed:
            record = self._handle.record
            if record.state != "failed":  # a run whose creation was refused stays so
                record.state = "stopped" if record.terminated and not self._inflight else "closed"

    def on_failure(self, *exc_info: Any) -> None:
        record = self._handle.record
        error = f"run actor crashed: {exc_info[1]!r}"
        record.errors.add([error])
        record.state = "crashed"
        if not self._waiters:  # nobody waits to hear it: keep it for close()
            self._session.failures.add(failure_message(record.label, [error]))
            _logger.warning("%s", failure_message(record.label, [error]))
        self._fail_waiters(error)
        # The supervisor frees the actor's place and gives later requests to a new actor.
        self._end_round(crashed=True)
