"""The write-ahead journal of a live client (``spool_dir``): every logged operation reaches
the spool's SQLite file within ``journal_interval`` seconds, and leaves it once the store
has acknowledged it.

The caller's thread only hands each append to a sink (a ``deque``, under the run's queue
lock, so the sink holds every run's appends in their order) and counts it: the run's
*position*. One daemon thread per client, the writer, makes a *group commit* every
``journal_interval`` seconds: one durable transaction (``synchronous=FULL``) for everything
appended meanwhile, all runs, planned into calls as a flush would plan them, plus the
deletes of what was acknowledged. With ``journal_interval=0`` an append waits (after its
queue lock) until a commit holds it, and concurrent appends share commits.

A round acknowledges its run's appends up to the position of its take
(:meth:`JournalRun.ack`, told by the spooler when the round ended with nothing unsent): the
journal rows wholly at or below it are deleted at the next commit, and appends at or below
it that were not written yet are never written (the store has them: a fast store keeps the
journal nearly empty). A row that spans the acknowledged position stays until a later round
acknowledges the rest; if the process dies meanwhile, ``runactors replay`` sends that row
again, which stores nothing twice (MLflow's stores keep a metric point once, an identical
param is accepted again, tags and termination are overwritten with the same values).

A run's creation is never left to chance: the spooler notes it in the journal (durably)
before sending it, and records the run ID (durably) before anything else is sent to the run
(:meth:`Journal.begin_creation`, :meth:`Journal.created`), so that a replay after a crash
either finds the run or knows it was never sent. The journal's rows, the creation and the
run IDs are the format :mod:`actors.spool._replay` delivers: a dead process's journal needs
nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from actors.queueing._plan import Call, plan_batches
from actors.queueing._queues import (
    J_CREATE,
    J_DATASETS,
    J_METRICS,
    J_PARAMS,
    J_TAGS,
    J_TERMINATE,
    CreateRunCall,
    RunQueues,
)
from actors.spool._group_commit import GroupWrite
from actors.spool._spool import Spool

_logger = logging.getLogger("runactors.spool")

DEFAULT_INTERVAL = 0.2
_GIL_SWITCH = 0.005  # how long a thread may wait for the GIL (sys.getswitchinterval())


class JournalRun:
    """One run's bookkeeping in the journal: its key, its creation or ID, the positions
    drained from the sink and acknowledged by the store, and its rows ``(seq, last)``."""

    __slots__ = (
        "abandoned",
        "acked",
        "create",
        "drained",
        "journal",
        "key",
        "on_disk",
        "rows",
        "run_id",
        "spilled",
        "sync",
        "written",
    )

    def __init__(
        self, journal: Journal, key: str, create: CreateRunCall | None, run_id: str | None
    ) -> None:
        self.journal = journal
        self.key = key
        self.create = create
        self.run_id = run_id
        self.sync = journal.interval == 0
        self.drained = 0  # appends taken from the sink by the writer (their positions)
        self.written = 0  # appends on disk (or skipped: acknowledged before being written)
        self.acked = 0  # appends the store has acknowledged (or that will never be sent)
        self.rows: deque[tuple[int, int]] = deque()  # (seq, last position it holds)
        self.abandoned = False  # its creation will never be sent: it leaves the journal
        # Appends up to this position left memory unsent (max_queued): the journal delivers
        # them, so the run's rounds deliver from it until they acknowledge past it.
        self.spilled = 0
        self.on_disk: dict[str, int] = {}  # entities of its calls in the journal (status())

    def ack(self, position: int) -> None:
        """The store has every append up to ``position``: it may leave the journal."""
        if position > self.acked:
            self.acked = position
            self.journal.acked.append(self)

    def abandon(self) -> None:
        """The run's creation failed for good, or was dropped: nothing of it will be sent."""
        self.abandoned = True
        self.journal.acked.append(self)

    def wait(self, position: int) -> None:
        """Until the append at ``position`` is on disk (or acknowledged)."""
        self.journal.wait_written(self, position)


class _Segment:
    """Appends of one run between two terminations: planned together, as a round would."""

    def __init__(self) -> None:
        self.params: list[Any] = []
        self.tags: list[Any] = []
        self.metrics: list[Any] = []
        self.datasets: list[Any] = []

    def calls(self, terminate: Any = None) -> list[Call]:
        return plan_batches(None, self.params, self.tags, self.metrics, self.datasets, terminate)


def _plan(ops: list[tuple[int, int, Any]]) -> list[tuple[Call, int]]:
    """A run's drained appends as journal rows ``(call, last position)``, in order; a row's
    position is that of the last append of its segment."""
    out: list[tuple[Call, int]] = []
    segment, last = _Segment(), 0
    for position, kind, payload in ops:
        if kind == J_CREATE:
            continue  # the run's entry carries it
        last = position
        if kind == J_METRICS:
            segment.metrics += payload
        elif kind == J_PARAMS:
            segment.params += payload
        elif kind == J_TAGS:
            segment.tags += payload
        elif kind == J_DATASETS:
            segment.datasets += payload
        elif kind == J_TERMINATE:
            out += [(call, last) for call in segment.calls(payload)]
            segment = _Segment()
    out += [(call, last) for call in segment.calls()]
    return out


class Journal:
    """A client session's write-ahead journal: the sink, the writer thread, the commits.

    ``open_spool`` returns the session's :class:`Spool` (created at first use).
    """

    def __init__(self, open_spool: Callable[[], Spool], interval: float, name: str) -> None:
        self.interval = interval
        self.sink: deque[Any] = deque()
        # Runs with acknowledgements not yet applied (deques: appended from any thread, and
        # drained by popping, so that nothing appended during a commit is missed).
        self.acked: deque[JournalRun] = deque()
        self._open_spool = open_spool
        # Creations to note durably: (run, None) attempted, (run, run ID) created.
        self._notes: deque[tuple[JournalRun, str | None]] = deque()
        self._commit_lock = threading.Lock()
        self._written = threading.Condition(threading.Lock())
        self._wake = threading.Event()
        self._stopped = False
        self._failed: str | None = None  # the last commit's error, until one succeeds
        self.on_commit: Callable[[], None] | None = None  # told after each commit
        self._thread = threading.Thread(target=self._run, name=f"{name}-journal", daemon=True)
        self._thread.start()

    # -- the caller's side --------------------------------------------------------------

    def attach(self, queues: RunQueues, key: str, run_id: str | None) -> JournalRun:
        """Journal a new run's appends from now on (its creation first, if it has one)."""
        run = JournalRun(self, key, queues.create, run_id)
        queues.journal_run = run
        queues.sink = self.sink
        if queues.create is not None:
            queues._journal(J_CREATE, queues.create)
            if run.sync:
                run.wait(queues.appended)
        return run

    def wait_written(self, run: JournalRun, position: int) -> None:
        with self._written:
            while run.written < position and run.acked < position and not self._stopped:
                self._wake.set()
                self._written.wait(0.5)

    def wake(self) -> None:
        """Ask the writer for a commit now (a call waits for room in memory)."""
        self._wake.set()

    @property
    def failure(self) -> str | None:
        """Why the last commit failed (a full disk...), or None."""
        return self._failed

    # -- the writer -----------------------------------------------------------------------

    def _run(self) -> None:
        # What is appended just after a commit drained the sink waits for the next commit to
        # drain it and for that commit to end: so the next one starts as early as the
        # interval, less the longest of the last commits (and a GIL switch), allows.
        took: deque[float] = deque([0.0], maxlen=8)
        while not self._stopped:
            wait = self.interval - max(took) - _GIL_SWITCH - took[-1]
            self._wake.wait(None if self.interval == 0 else max(wait, 0.0))
            self._wake.clear()
            if self._stopped:
                return
            began = time.monotonic()
            with contextlib.suppress(Exception):  # commit() logs its failures; retried next
                self.commit()
            took.append(time.monotonic() - began)

    def commit(self) -> None:
        """One group commit of everything appended and acknowledged so far (any thread)."""
        try:
            self._commit()
        finally:  # made or failed: calls waiting for room in memory look again
            if self.on_commit is not None:
                self.on_commit()

    def _commit(self) -> None:
        with self._commit_lock:
            sink = self.sink
            drained: dict[JournalRun, list[tuple[int, int, Any]]] = {}
            for _ in range(len(sink)):
                run, kind, payload = sink.popleft()
                run.drained += 1
                drained.setdefault(run, []).append((run.drained, kind, payload))
            acked = {self.acked.popleft() for _ in range(len(self.acked))}
            notes = [self._notes.popleft() for _ in range(len(self._notes))]
            writes: list[GroupWrite] = []
            positions: list[list[int]] = []
            for run, ops in drained.items():
                ops = [op for op in ops if op[0] > run.acked]
                if not ops:
                    continue
                planned = _plan(ops)
                pending = run.run_id is None and run.create is not None
                if not planned and not pending:
                    continue
                create = run.create if run.run_id is None else None
                writes.append(GroupWrite(run.key, run.run_id, create, [c for c, _ in planned]))
                positions.append([last for _, last in planned])
            deletes: list[int] = []
            dropped: list[str] = []
            for run in acked:
                deletes += [seq for seq, last in run.rows if last <= run.acked]
                if run.abandoned and run.run_id is None:
                    dropped.append(run.key)
            if writes or deletes or dropped or notes:
                attempted = [(run.key, run.create) for run, run_id in notes if run_id is None]
                created = [(run.key, run_id) for run, run_id in notes if run_id is not None]
                try:
                    seqs = self._open_spool().commit_group(
                        writes, deletes, dropped, attempted, created
                    )
                except Exception as exc:
                    self._failed = f"{type(exc).__name__}: {exc}"
                    _logger.warning("could not write the journal: %s", self._failed)
                    self._undo(drained, acked)
                    self._notes.extendleft(reversed(notes))
                    raise
                self._failed = None
                for run in acked:
                    while run.rows and run.rows[0][1] <= run.acked:
                        run.rows.popleft()
                by_key = {run.key: run for run in drained}
                for write, run_seqs, lasts in zip(writes, seqs, positions, strict=True):
                    by_key[write.key].rows.extend(zip(run_seqs, lasts, strict=True))
                self._count({*by_key.values(), *acked})
            for run in drained:
                run.written = run.drained
        with self._written:
            self._written.notify_all()

    def _count(self, runs: set[JournalRun]) -> None:
        """After a commit: what the journal holds of the runs it changed (``journaled``)."""
        with contextlib.suppress(Exception):  # a count is not worth failing a commit for
            counts = self._open_spool().run_counts([run.key for run in runs])
            for run in runs:
                run.on_disk = counts.get(run.key, {})

    def _undo(
        self, drained: dict[JournalRun, list[tuple[int, int, Any]]], acked: set[JournalRun]
    ) -> None:
        """A commit failed: its appends go back to the front of the sink, in order, to be
        written by the next one (they are still in memory too); its acknowledgements wait."""
        self.acked.extend(acked)
        back = [(run, kind, payload) for run, ops in drained.items() for _, kind, payload in ops]
        for run in drained:
            run.drained -= len(drained[run])
        # Runs' orders are kept; interleaving between runs does not matter.
        self.sink.extendleft(reversed(back))

    # -- creations ------------------------------------------------------------------------

    def begin_creation(self, run: JournalRun) -> None:
        """Durably note the run's creation as attempted, before it is sent. Runs created at
        once share a commit: this one's, or the one in progress when it asks."""
        assert run.create is not None
        self._notes.append((run, None))
        self.commit()

    def created(self, run: JournalRun, run_id: str) -> None:
        """Durably record the run's ID, before anything else is sent to the run."""
        run.run_id = run_id
        self._notes.append((run, run_id))
        self.commit()

    def learned(self, run: JournalRun, run_id: str) -> None:
        """The run's ID, recorded in the journal by a delivery from it."""
        run.run_id = run_id

    # -- closing --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the writer and make the last commit (in the caller's thread)."""
        self._stopped = True
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(5.0)
        try:
            self.commit()
        finally:
            with self._written:
                self._written.notify_all()
