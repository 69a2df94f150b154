"""The rounds of a live client's spooler with a write-ahead journal (``spool_dir``): what
differs from spooling only what could not be delivered (:mod:`actors.spool._spooling`).

* A round that cannot deliver everything (:meth:`JournalRounds._hold`): its calls are in the
  journal already, and so is what the run queued since once a commit is made; they leave
  memory, and the run's later rounds deliver it from the journal until it is empty.
* A run's creation (:meth:`JournalRounds._create`) is sent by the spooler, in the client's
  process, noted in the journal before it is sent and its ID recorded after, both durably,
  so that a replay after a crash never makes the run twice; the executor sends the rest of
  the round as usual (the SQL fast path, worker processes).
* At close (:meth:`JournalRounds._close_journal`), the journal's last commit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from actors.delivery._attempts import Retries, create_once, creation_error
from actors.delivery._jobs import Job, JobResult, JobStopped
from actors.delivery._retry import is_transient
from actors.delivery._store import make_client
from actors.queueing._plan import LogBatchCall
from actors.queueing._queues import CreateRunCall
from actors.spool._journal import Journal
from actors.spool._spool import Spool

if TYPE_CHECKING:
    from actors.executors._executor import StateHook
    from actors.status._handle import RunHandle

WORKER = "spool"  # the ``worker`` a run's status names while the spooler works on it


class JournalRounds:
    """The write-ahead journal's part of :class:`~actors.spool._spooling.Spooler`."""

    journal: Journal | None
    retry_timeout: float
    tracking_uri: str
    _lock: threading.Lock
    _closed: bool
    _stopping = False  # closing: what the spooler is still retrying stops, and is spooled
    _spool: Spool | None

    _keys: set[str]

    @staticmethod
    def key(handle: RunHandle) -> str:
        raise NotImplementedError

    def holds(self, handle: RunHandle) -> bool:
        """Whether the run has calls (or its creation) in the journal to deliver from there:
        spooled after a failure, or spilled out of memory (``max_queued``)."""
        run = handle.queues.journal_run
        return self.key(handle) in self._keys or (run is not None and run.spilled > run.acked)

    def spilled(self, handle: RunHandle) -> None:
        """The run's queued calls left memory for the journal (:mod:`actors.spool._spill`)."""
        self._keys.add(self.key(handle))  # set.add is atomic: no lock under the queues' lock

    @property
    def closed(self) -> bool:
        return self._closed

    def _journal(self) -> Spool:
        raise NotImplementedError

    def _refresh(self, handle: RunHandle, spool: Spool, key: str) -> None:
        raise NotImplementedError

    _client_lock: threading.Lock
    _client: Any

    def _store_client(self) -> Any:
        # Not under self._lock: opening a store can wait on a locked database, close() not.
        with self._client_lock:
            if self._client is None:  # as the executors make theirs: one HTTP attempt per call
                self._client = make_client(self.tracking_uri)
            return self._client

    def _hold(self, handle: RunHandle, result: JobResult) -> None:
        """With the write-ahead journal, a round's undelivered calls are in it already, and
        so is what the run queued since, once a commit is made: they leave memory, and the
        run's later rounds deliver it from the journal (it is ``spooled``) until it is empty."""
        key = self.key(handle)
        since = handle.queues.take()
        try:
            assert self.journal is not None
            self.journal.commit()
            with self._lock:
                spool = self._journal()
                self._refresh(handle, spool, key)
        except Exception as exc:  # a full disk, a closed journal: report what is lost
            handle.queues.put_back(since)
            why = f"not sent and could not be spooled: {exc!r}"
            result.errors.append(f"{result.unsent_error}; {why}")
            result.unsent = []
            return
        handle.queues.release(since)  # on disk: it leaves memory (and max_queued)
        result.spool_notes.append(
            f"{result.unsent_error}; {spool.pending_calls(key)} calls spooled to {spool.path} "
            "for redelivery"
        )
        result.unsent, result.spooled = [], True

    def _create(self, handle: RunHandle, job: Job, first: JobResult, on_state: StateHook) -> bool:
        """With the write-ahead journal, a run's creation is sent from here, noted in the
        journal before and its ID recorded after (both durable), so that a replay after a
        crash never makes the run twice; the executor then sends the rest of the round.
        False if it failed transiently (the round is then spooled)."""
        journal, run = self.journal, handle.queues.journal_run
        create = job.calls[0]
        assert journal is not None and run is not None and isinstance(create, CreateRunCall)
        assert run.create is not None

        def on_retry(exc: BaseException, delay: float) -> None:
            if self._closed or self._stopping:
                raise JobStopped("the client was closed")
            on_state("retrying", WORKER)

        try:
            journal.begin_creation(run)
            retries = Retries(self.retry_timeout, on_retry, None)
            run_id = create_once(self._store_client(), self.tracking_uri, run.create, retries)
            journal.created(run, run_id)
        except Exception as exc:
            held = isinstance(exc, JobStopped) or is_transient(exc)  # then it is spooled
            error = creation_error(exc, held)
            if held:
                first.unsent, first.unsent_error = list(job.calls), error
                first.unsent_attempted = True
                return False
            first.create_error = error  # the rest is reported unsent by the executor
            first.errors.append(error)
            run.abandon()
            job.calls, job.run_id = job.calls[1:], None
            return True
        first.run_id, first.created = run_id, True
        first.logged["tags"] += len(run.create.tags)
        # Tags the round added to the creation go in a batch: the creation is the journal's.
        extra = create.tags[len(run.create.tags) :]
        job.calls = [LogBatchCall([], [], extra)] * bool(extra) + job.calls[1:]
        job.run_id = run_id
        return True

    def _deliver(self, handle: RunHandle, key: str, result: JobResult, on_state: StateHook) -> None:
        raise NotImplementedError

    def _from_journal(
        self,
        handle: RunHandle,
        key: str,
        job: Job,
        first: JobResult,
        on_state: StateHook,
        on_disk: Callable[[], None] | None,
    ) -> None:
        """A held run's round with the journal: its calls go to disk (and leave memory: the
        round's entities leave ``max_queued``, told by ``on_disk``), then everything the
        journal has of the run is delivered from it, in order."""
        run = handle.queues.journal_run
        assert self.journal is not None
        self.journal.commit()
        job.calls = []
        if on_disk is not None:
            on_disk()
        spilled = 0 if run is None else run.spilled
        self._deliver(handle, key, first, on_state)
        if run is None:
            return
        run.on_disk = dict(handle.record.spooled)  # what the journal holds of it now
        if key in self._keys:
            return
        run.ack(spilled)  # all the journal had was sent: what left memory for it too
        # If the journal still has nothing of the run, what was on disk before was sent too:
        # what is still queued, if it was all there, leaves memory (it is not sent twice).
        written, spool = run.written, self._spool
        if spool is None or spool.has_run(key):
            return
        run.ack(written)
        delivered = handle.queues.drop_delivered(written)
        if delivered is not None:
            handle.queues.release(delivered)

    def _close_journal(self, handles: list[RunHandle]) -> list[str]:
        """The write-ahead journal's last commit; the runs it still holds read ``spooled``."""
        assert self.journal is not None
        try:
            self.journal.close()
        except Exception as exc:
            return [f"the journal could not be written at close: {exc!r}"]
        with self._lock:
            spool = self._spool
            if spool is None:
                return []
            held = {entry.key for entry in spool.runs()}
            for handle in handles:
                if self.key(handle) in held:
                    self._refresh(handle, spool, self.key(handle))
        return []
