"""A live client's side of the spool: with ``spool_dir``, every logged call is journaled
(the write-ahead journal, :mod:`actors.spool._journal`), what its rounds could not deliver
stays there, and each later flush of that run delivers it from there first.

With ``spool_dir``, every job runs with ``stop_on_transient``: it stops at the first call
that still fails transiently after its retries (or at the client closing), and reports the
calls it did not deliver. Those are in the journal already (every append is), and so is what
the run queued since once a commit is made (:mod:`actors.spool._journal_rounds`): they leave
memory before the run's actor hears of the round, so the flush reports only once they are on
disk. Permanent failures are reported, never spooled. A round that delivered everything
acknowledges its run's appends: they leave the journal at its next commit.

While a run has calls in the journal, its rounds go through :meth:`Spooler.resend`: on one
of the spooler's threads (up to the client's ``max_workers``, started on demand, so that runs
are re-sent in parallel as they are flushed), the journal's calls of that run (the round's
included) are delivered in order
(:func:`~actors.spool._replay.deliver_run`: each removed once delivered, a creation of unknown
outcome looked up first); if that fails transiently again, the run stays spooled, so
nothing is ever sent ahead of them. A spooled call that fails permanently is reported and
dropped, as a live round reports a call and goes on. A run whose round waits for one of
those threads reads ``spooled`` (its work is on disk), not ``waiting`` (which is for an
executor worker). A run's creation goes through those threads too (noted durably before it
is sent), then the round goes to the executor.

At close (:meth:`Spooler.close`) the journal's last commit writes what is still queued,
pending runs whose creation is spooled fail, and the journal is closed (deleted if empty),
for ``runactors replay``. (Without a journal, only what could not be delivered is written.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actors.delivery._jobs import (
    Job,
    JobResult,
    JobStopped,
    call_counts,
    empty_counts,
    failure_message,
    merge_results,
    record_outcome,
)
from actors.executors import DaemonThreads, ThreadsStopped
from actors.queueing._plan import Call, call_kind, plan_snapshot
from actors.queueing._queues import CreateRunCall
from actors.spool._files import write_problems
from actors.spool._journal import Journal
from actors.spool._journal_rounds import WORKER, JournalRounds
from actors.spool._replay import deliver_run
from actors.spool._spool import Spool

if TYPE_CHECKING:
    from actors.executors._executor import DoneHook, Executor, StateHook
    from actors.status._handle import RunHandle

_logger = logging.getLogger("runactors.spool")

CLOSE_RESERVE = 5.0  # seconds of a bounded close kept for spooling what could not be sent


def close_reserve(timeout: float | None) -> float:
    """How much of a close's ``timeout`` the last flush leaves for spooling: a quarter, at
    most :data:`CLOSE_RESERVE` seconds (none without a bound: the flush ends by itself)."""
    return 0.0 if timeout is None else min(CLOSE_RESERVE, timeout / 4)


class Spooler(JournalRounds):
    """One client session's journal, and the threads (``workers`` at most) that re-send
    spooled runs.

    Runs are keyed in the journal by their pending label (``pending-<session>-<n>``) or
    their run ID string: stable for the session's life, unique within it.
    """

    def __init__(
        self,
        spool_dir: str,
        tracking_uri: str,
        retry_timeout: float,
        name: str,
        workers: int = 1,
        journal_interval: float | None = None,
    ) -> None:
        self.spool_dir = spool_dir
        self.tracking_uri = tracking_uri
        self.retry_timeout = retry_timeout
        self.name = name
        self._spool: Spool | None = None
        self._keys: set[str] = set()  # runs with something in the journal
        self._lock = threading.Lock()  # opening and closing the journal, the keys
        self._idle = threading.Condition(threading.Lock())
        self._outstanding = 0  # rounds tracked and not yet reported
        self.workers = max(workers, 1)
        self._threads: DaemonThreads[Callable[[], None], None] = DaemonThreads(
            f"{name}-spool",
            self.workers,
            lambda _, work: work(),  # each item is the work itself
            lambda index: None,  # no state per thread
            what="re-sending spooled calls",
        )
        self._client_lock = threading.Lock()
        self._client: Any = None
        self._closed = False
        self.on_journal: Callable[[Path], None] | None = None  # told the new journal's path
        self._open_lock = threading.Lock()  # making the journal file (the writer may too)
        # The write-ahead journal: every append on disk within journal_interval seconds.
        self.journal = (
            None if journal_interval is None else Journal(self._journal, journal_interval, name)
        )

    # -- which runs are spooled ---------------------------------------------------------

    @staticmethod
    def key(handle: RunHandle) -> str:
        return str(handle.pending) if handle.pending is not None else str(handle.key)

    @property
    def path(self) -> Path | None:
        spool = self._spool
        return None if spool is None else spool.path

    def _journal(self) -> Spool:
        with self._open_lock:  # the journal's writer thread may be making it too
            if self._closed:
                raise JobStopped("the client is closed: its journal is closed")
            if self._spool is None:
                self._spool = Spool.create(self.spool_dir, self.tracking_uri)
                if self.on_journal is not None:
                    self.on_journal(self._spool.path)
            return self._spool

    def attach(self, handle: RunHandle) -> None:
        """A new run of the session: with a write-ahead journal, its appends are journaled."""
        if self.journal is not None:
            self.journal.attach(handle.queues, self.key(handle), handle.record.run_id)

    def _refresh(self, handle: RunHandle, spool: Spool, key: str) -> None:
        held = spool.has_run(key)
        if held:
            self._keys.add(key)
        else:
            self._keys.discard(key)
        handle.record.spooled = spool.counts(key) if held else empty_counts()

    # -- a round's outcome --------------------------------------------------------------

    def track(self, handle: RunHandle, on_done: DoneHook) -> DoneHook:
        """Wrap a round's ``on_done``: its undelivered calls are spooled (fsynced) before the
        actor hears of the round; :meth:`close` waits for every tracked round."""
        with self._idle:
            self._outstanding += 1
        # What the round took: the store has it once the round ends with nothing unsent.
        run, position = handle.queues.journal_run, handle.queues.taken

        def done(result: JobResult) -> None:
            try:
                if result.unsent:
                    self._spool_unsent(handle, result)
                elif run is not None and not result.spooled:  # not still on disk
                    run.ack(position)
            except BaseException:  # pragma: no cover - never lose the round's answer
                _logger.exception("spooling a round failed")
            try:
                on_done(result)  # before close() goes on: what the round lost is known
            finally:
                with self._idle:
                    self._outstanding -= 1
                    self._idle.notify_all()

        return done

    def _write(
        self, handle: RunHandle, calls: list[Call], run_id: str | None, create_attempted: bool
    ) -> Spool:
        """Append a run's calls to the journal, adding the run (its creation or its ID) first
        if the journal does not know it yet; durable when this returns."""
        key = self.key(handle)
        spool = self._journal()
        if spool.has_run(key):
            spool.append(key, calls)
        elif isinstance(calls[0], CreateRunCall):
            create = calls[0]
            spool.add_run(
                key,
                create=create,
                create_key=create.create_key,
                create_attempted=create_attempted,
                calls=calls[1:],
            )
        elif run_id is not None:
            spool.add_run(key, run_id=run_id, calls=calls)
        else:  # its creation is in flight or failed: these cannot be delivered
            raise ValueError(f"run {handle.record.label} has no ID and no creation to spool")
        self._refresh(handle, spool, key)
        return spool

    def _spool_unsent(self, handle: RunHandle, result: JobResult) -> None:
        if self.journal is not None:
            self._hold(handle, result)
            return
        since = handle.queues.take()  # queued since: goes behind, in order
        calls = list(result.unsent) + plan_snapshot(since)
        try:
            with self._lock:
                spool = self._write(handle, calls, result.run_id, result.unsent_attempted)
            handle.queues.release(since)  # on disk now: it leaves memory (and max_queued)
        except Exception as exc:  # a full disk, a closed journal: report what is lost
            handle.queues.put_back(since)  # still in memory: the next flush sends it
            why = f"not sent and could not be spooled: {exc!r}"
            result.errors.append(f"{result.unsent_error}; {why}")
            for call in result.unsent:
                record_outcome(result, call, f"{call_kind(call)} {why}", None)
            result.unsent = []
            return
        result.spool_notes.append(  # not lost: the flush that waits hears it, close() not
            f"{result.unsent_error}; {len(calls)} calls spooled to {spool.path} for redelivery"
        )
        result.unsent, result.spooled = [], True

    # -- re-sending ---------------------------------------------------------------------

    def resend(
        self,
        handle: RunHandle,
        job: Job,
        executor: Callable[[], Executor],
        on_state: StateHook,
        on_done: DoneHook,
        on_disk: Callable[[], None] | None = None,
    ) -> None:
        """Re-send the run's spooled calls, then hand ``job`` (the round's new calls) to
        the executor; or, if re-sending fails transiently, append its calls behind."""
        on_state("spooled", None)  # on disk, waiting for a re-sending thread
        work = partial(self._resend, handle, job, executor, on_state, on_done, on_disk)
        try:
            self._threads.submit(work)
        except ThreadsStopped as exc:  # the client closed meanwhile: spooled if it can be
            on_done(_stopped(job, exc))

    def _resend(
        self,
        handle: RunHandle,
        job: Job,
        executor: Callable[[], Executor],
        on_state: StateHook,
        on_done: DoneHook,
        on_disk: Callable[[], None] | None = None,
    ) -> None:
        key = self.key(handle)
        first = JobResult(run_id=job.run_id)
        on_state("flushing", WORKER)
        journal = self.journal
        if journal is not None and not self.holds(handle):  # a creation, then the executor
            if not self._create(handle, job, first, on_state):
                on_done(first)
                return
        else:
            try:
                if journal is not None:  # the round's calls go to disk, and from there
                    self._from_journal(handle, key, job, first, on_state, on_disk)
                else:
                    self._deliver(handle, key, first, on_state)
            except Exception as exc:  # the journal cannot be read or written
                first.errors.append(f"re-sending the spooled calls failed: {exc!r}")
            if self.holds(handle):  # still spooled: the new calls go behind, never ahead
                if job.calls:
                    first.unsent = list(job.calls)
                    first.unsent_error = "sent behind the run's spooled calls"
                else:
                    first.spooled = True
                on_done(first)
                return
            if journal is not None:  # the round's calls were delivered from the journal
                on_done(first)
                return
            job.run_id = first.run_id or job.run_id
        if not job.calls:
            on_done(first)
            return
        try:
            executor().submit(job, on_state, lambda rest: on_done(merge_results(first, rest)))
        except Exception as exc:  # closing: the executor is shut down
            on_done(merge_results(first, _stopped(job, exc)))

    def _deliver(self, handle: RunHandle, key: str, result: JobResult, on_state: StateHook) -> None:
        """Deliver the run's spooled calls in order into ``result``; stop at a transient
        failure (they stay spooled), report and drop a call that fails permanently."""
        with self._lock:
            spool = self._journal()
        client = self._store_client()
        run = handle.queues.journal_run

        def on_retry(exc: BaseException, delay: float) -> None:
            if self._closed or self._stopping:
                raise JobStopped("the client was closed")
            on_state("retrying", WORKER)

        try:
            while (entry := spool.run(key)) is not None:
                known = frozenset(e.run_id for e in spool.runs() if e.run_id is not None)
                outcome = deliver_run(
                    spool,
                    entry,
                    client,
                    self.tracking_uri,
                    self.retry_timeout,
                    on_retry=on_retry,
                    exclude=known,
                )
                for kind, n in outcome.delivered.items():
                    result.logged[kind] += n
                result.terminated = result.terminated or outcome.terminated  # as a live round
                if entry.run_id is None and outcome.run_id is not None:
                    result.run_id, result.created = outcome.run_id, True
                    if self.journal is not None and run is not None:
                        self.journal.learned(run, outcome.run_id)
                if outcome.error is None:
                    continue  # the loop ends: delivered runs leave the journal
                if outcome.transient or self._closed:  # they stay spooled: nothing lost
                    result.spool_notes.append(
                        f"re-sending spooled calls failed; they stay spooled: {outcome.error}"
                    )
                    return
                result.errors.append(outcome.error)
                if outcome.run_id is None:  # its creation failed for good: nothing can go
                    dropped = spool.drop_run(key)
                    result.create_error = outcome.error
                    handle.record.create_error = outcome.error
                    if handle.pending is not None:
                        handle.pending._set_failed(outcome.error)
                    if dropped:  # as a live round reports the calls behind a failed creation
                        calls, were = ("call", "was") if dropped == 1 else ("calls", "were")
                        result.errors.append(
                            f"{dropped} spooled {calls} of run {handle.record.label} {were} "
                            "dropped, not sent: its creation failed"
                        )
                    return
                for seq, _ in spool.calls(key, limit=1):
                    spool.remove([seq])
        finally:
            with self._lock:
                self._refresh(handle, spool, key)

    # -- health -------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """What keeps the spool from taking a write now (empty: nothing): see
        :func:`~actors.spool._files.write_problems`."""
        if self._closed:
            return []
        spool, failure = self._spool, None if self.journal is None else self.journal.failure
        return write_problems(None if spool is None else spool.path, Path(self.spool_dir), failure)

    # -- closing ------------------------------------------------------------------------

    def close(self, handles: list[RunHandle], timeout: float | None) -> list[str]:
        """Wait (up to ``timeout`` s) for the rounds still being reported, spool what is
        still queued, fail the pending runs whose creation is spooled, and close the
        journal (deleted if empty). What is left in it is not lost: one warning says where
        it is and how to deliver it. Returns what is lost (rounds still being sent at the
        bound: what they had not sent is not in the spool)."""
        end = None if timeout is None else time.monotonic() + timeout
        lost: list[str] = []
        self._stopping = True  # what the spooler still retries stops (and is spooled)
        with self._idle:
            while self._outstanding:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    lost.append(
                        f"{self._outstanding} rounds were still being sent when the client "
                        "closed; what they had not sent is not in the spool"
                    )
                    break
                self._idle.wait(left)
        with self._lock:
            for handle in handles:
                if self.journal is None:
                    lost += self._spool_queued(handle)
                else:  # in the journal's sink: the last commit writes it
                    handle.queues.discard()
        if self.journal is not None:
            lost += self._close_journal(handles)
        with self._lock:
            self._closed = True
            spool, self._spool = self._spool, None
        # Not under self._lock, which a re-sending thread takes: idle, or stopping at its next
        # retry now that the client is closed.
        self._threads.stop(None if end is None else max(end - time.monotonic(), 0.0))
        if spool is None:
            return lost
        left = spool.pending_calls()
        runs = 0
        for handle in handles:
            key = self.key(handle)
            if key not in self._keys:
                continue
            runs += 1
            handle.record.state = "spooled"
            entry = spool.run(key)
            if entry is not None and entry.run_id is None and handle.pending is not None:
                handle.pending._set_failed(
                    f"the client closed before its creation was delivered; it is in the "
                    f"spool {spool.path}, for runactors replay"
                )
        path = spool.path
        spool.close()
        if left:  # safe on disk: said once, not raised
            _logger.warning(
                "%d calls of %d runs were not delivered and are in the spool %s; "
                "run `runactors replay %s` once the store is back to deliver them",
                left,
                runs,
                path,
                self.spool_dir,
            )
        return lost

    def _spool_queued(self, handle: RunHandle) -> list[str]:
        """At close: what a run still has queued (the close's flush did not take it, or
        stopped at its bound) goes to the journal, behind what is spooled of the run;
        returns what could not go there (lost)."""
        if not handle.queues.has_work():
            return []
        snapshot = handle.queues.discard()  # to disk, or lost: it leaves memory either way
        calls = plan_snapshot(snapshot)
        try:
            self._write(handle, calls, handle.record.run_id, False)
        except Exception as exc:
            counts = empty_counts()
            for call in calls:
                for kind, n in call_counts(call).items():
                    counts[kind] += n
            message = f"queued at close, not sent and could not be spooled: {exc!r} ({counts})"
            handle.record.errors.add([message])
            return [failure_message(handle.record.label, [message])]
        return []


def _stopped(job: Job, exc: BaseException) -> JobResult:
    result = JobResult(run_id=job.run_id)
    result.unsent, result.unsent_error = list(job.calls), f"not sent: {exc}"
    return result
