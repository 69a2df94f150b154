"""``max_queued`` with a write-ahead journal (``spool_dir``): what is on disk leaves memory.

Every append of a client with a journal reaches the disk within ``journal_interval``. So when
its :class:`~actors.queueing._budget.Budget` is full, the calls need not wait for a round to
end (which, with the store down, takes ``retry_timeout``) nor be refused: :class:`Spill`
takes out of memory the queued entities of each run whose appends are all in the journal
(:meth:`~actors.queueing._queues.RunQueues.spill_locked`), and marks the run as delivered from
the journal (:attr:`~actors.spool._journal.JournalRun.spilled`): its next rounds go through
the spooler, which sends the journal's calls of the run in order, then acknowledges them, so
nothing is sent ahead of them and nothing is stored twice. A run with appends not on disk yet
asks the journal's writer for a commit now; the budget's waiting calls look again after it.

Nothing leaves memory when the journal failed (a full disk: the calls then block and are
refused as without a journal), for a run whose creation is still queued or whose ID the
journal does not know (its creation is in flight: the journal's replay could not report what
a failed creation drops), or with a termination queued (the run ends by a round).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from actors.delivery._jobs import KINDS

if TYPE_CHECKING:
    from actors.spool._spooling import Spooler
    from actors.status._handle import RunHandle


class Spill:
    """A client session's :data:`~actors.queueing._budget.Spill`: called with the lock of all
    its queues held (the budget's), it frees what the journal holds of them."""

    def __init__(self, spooler: Spooler, handles: Callable[[], Iterable[RunHandle]]) -> None:
        self._spooler = spooler
        self._handles = handles

    def __call__(self) -> tuple[int, bool]:
        """Entities that left memory, and whether a commit in progress may free more."""
        spooler, journal = self._spooler, self._spooler.journal
        if journal is None or journal.failure is not None or spooler.closed:
            return 0, False
        freed, due = 0, False
        for handle in list(self._handles()):
            queues, run = handle.queues, handle.queues.journal_run
            if (
                run is None
                or run.abandoned
                or queues.create is not None
                or queues.terminate is not None
                or (run.run_id is None and not spooler.holds(handle))
            ):
                continue
            if not (queues.params or queues.tags or queues.metrics or queues.datasets):
                continue
            if run.written < queues.appended:  # not all on disk yet: after the next commit
                due = True
                continue
            snapshot = queues.spill_locked()
            run.spilled = queues.appended
            spooler.spilled(handle)
            counts = snapshot.counts()
            record = handle.record
            with record.lock:  # until the spooler counts the journal exactly
                record.spooled = {kind: record.spooled[kind] + counts[kind] for kind in KINDS}
            freed += snapshot.held()
        if due:
            journal.wake()
        return freed, due
