"""What every run actor is doing: the live record an actor keeps, read into ``status()``.

A :class:`RunRecord` is written by its run's actor (and the executor thread working for it),
by the supervisor (``ready``, ``stopped``, ``closed``) and by the spooler (``spooled``, its
spooled counts, a failed creation), and read by anyone. Writes that change several fields
together, or read and change one, hold the record's ``lock``; so does :meth:`RunRecord.snapshot`,
which thus never sees half of such a change (a round's entities both still in flight and
already logged, say). The lock is only ever held for a few assignments, never around a call
to the store, so ``status()`` answers at once even while the actor's flush is waiting on a
slow store; the ``log_*`` calls never take it.

A run's ``errors`` stay bounded however long the service runs: see :class:`ErrorLog`.

Transient failures are not errors (they are retried, within ``retry_timeout``): ``retries``
counts them, per run, for the life of the client (every retried attempt of every call,
creation look-ups included), and ``last_retry_error`` is the latest one's type and message
(cut to 500 characters). It is *kept* after the run recovers, so that an operator can still
see what the last outage looked like; whether the run is retrying *now* is its ``state``.
A call that still fails when its ``retry_timeout`` is spent lands in ``errors``.

The result types ``status()`` returns are in :mod:`actors.status._results`, the process-wide
totals in :mod:`actors.status._totals`.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from actors.delivery._jobs import KINDS, JobResult, empty_counts
from actors.queueing._pending import PendingRunId
from actors.queueing._queues import RunQueues
from actors.status._results import RunState, RunStatus
from actors.status._totals import TOTALS

ERRORS_FIRST = 10  # a run's first distinct error messages, kept for good
ERRORS_LATEST = 40  # and its latest ones
ERROR_CHARS = 4000  # longer messages (an echoed request, say) are cut
_REPEATED = re.compile(r"(.*) \(x(\d+)\)", re.DOTALL)  # as failure lists collapse repeats


class ErrorLog:
    """A run's error messages, repeats collapsed and the list capped.

    A failure that recurs at every flush (an unknown run ID, a store that refuses a batch)
    is one entry, ``message (xN)``, not one entry per flush. Past ``ERRORS_FIRST +
    ERRORS_LATEST`` distinct messages, the first ones stay, the least recently seen of the
    others are dropped, and a line in their place counts the errors dropped. Written by the
    run's actor; read by any thread (``status()``), hence the lock.
    """

    __slots__ = ("_first", "_latest", "_lock", "dropped")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._first: dict[str, int] = {}  # message -> count, in order of first occurrence
        self._latest: dict[str, int] = {}  # message -> count, least recently seen first
        self.dropped = 0  # errors (repeats included) whose message is no longer kept

    def add(self, messages: Iterable[str]) -> None:
        added = 0
        with self._lock:
            for message in messages:
                text, count = _split_count(message)
                added += count
                if text in self._first:
                    self._first[text] += count
                elif len(self._first) < ERRORS_FIRST:
                    self._first[text] = count
                else:
                    self._latest[text] = self._latest.pop(text, 0) + count
                    if len(self._latest) > ERRORS_LATEST:
                        self.dropped += self._latest.pop(next(iter(self._latest)))
        if added:
            TOTALS.add_errors(added)

    def messages(self) -> list[str]:
        """The kept messages, oldest first, with the dropped ones counted in their place."""
        with self._lock:
            first, latest = list(self._first.items()), list(self._latest.items())
            dropped = self.dropped
        out = [_with_count(text, n) for text, n in first]
        if dropped:
            out.append(f"... {dropped} more errors not kept (the first and the latest are) ...")
        out.extend(_with_count(text, n) for text, n in latest)
        return out


def _split_count(message: str) -> tuple[str, int]:
    match = _REPEATED.fullmatch(message)
    text, count = (match.group(1), int(match.group(2))) if match else (message, 1)
    if len(text) > ERROR_CHARS:
        text = text[:ERROR_CHARS] + f"... ({len(text) - ERROR_CHARS} more characters)"
    return text, count


def _with_count(text: str, count: int) -> str:
    return text if count == 1 else f"{text} (x{count})"


@dataclass
class RunRecord:
    """The live, actor-owned state of one run."""

    pending: PendingRunId | None
    run_id: str | None = None
    state: RunState = "idle"
    inflight: dict[str, int] = field(default_factory=empty_counts)
    logged: dict[str, int] = field(default_factory=empty_counts)
    errors: ErrorLog = field(default_factory=ErrorLog)
    terminated: bool = False
    create_error: str | None = None
    worker: str | None = None
    retries: int = 0
    last_retry_error: str | None = None
    spooled: dict[str, int] = field(default_factory=empty_counts)
    round_started: float | None = None  # monotonic time the round in flight started
    sql_fast_path: str | None = None  # the last round's, with metrics on a database store
    # Held by compound writes and by snapshot() (reentrant: a holder may call note_retry).
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    @property
    def label(self) -> str:
        """How messages name the run: its ID once known, else its pending label."""
        return self.run_id or str(self.pending)

    def note_retry(self, detail: str | None) -> None:
        """A call of this run failed transiently and is retried (on the executor's thread)."""
        with self.lock:
            self.retries += 1
            self.last_retry_error = detail
        TOTALS.add_retry()

    def start_round(self) -> None:
        """A flush round of this run starts: its duration is measured from here."""
        self.round_started = time.monotonic()

    def end_round(self, result: JobResult) -> None:
        """A flush round ended with ``result`` (called by the run actor once it is accounted):
        one observation of ``runactors_flush_seconds``, the round's entities logged."""
        with self.lock:
            started, self.round_started = self.round_started, None
        seconds = 0.0 if started is None else time.monotonic() - started
        TOTALS.add_round(result.logged, seconds)

    def snapshot(self, queues: RunQueues) -> RunStatus:
        with self.lock:  # the queues are read without their lock: a lock-free estimate
            queued = queues.counts()
            inflight = self.inflight
            state = self.state
            if state == "stopped" and queues.has_work():  # logged to again since it finished
                state = "idle"
            return RunStatus(
                pending_id=self.pending,
                run_id=self.run_id,
                state=state,
                queued={kind: queued[kind] + inflight[kind] for kind in KINDS},
                logged=dict(self.logged),
                errors=self.errors.messages(),
                worker=self.worker,
                errors_dropped=self.errors.dropped,
                retries=self.retries,
                last_retry_error=self.last_retry_error,
                spooled=dict(self.spooled),
                sql_fast_path=self.sql_fast_path,
                journaled=journaled(queues),
            )


def journaled(queues: RunQueues) -> dict[str, int]:
    """Entities of the run in the write-ahead journal, not yet acknowledged by the store (as
    of its last commit or delivery); zeros without one."""
    run = queues.journal_run
    on_disk = {} if run is None else run.on_disk
    return {kind: on_disk.get(kind, 0) for kind in KINDS}
