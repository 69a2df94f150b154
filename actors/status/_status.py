"""What every run actor is doing: the live record an actor keeps, and the snapshots callers get.

A :class:`RunRecord` is written by its run's actor (and the executor thread working for it),
by the supervisor (``ready``, ``stopped``, ``closed``) and by the spooler (``spooled``, its
spooled counts, a failed creation), and read by anyone. Writes that change several fields
together, or read and change one, hold the record's ``lock``; so does :meth:`RunRecord.snapshot`,
which thus never sees half of such a change (a round's entities both still in flight and
already logged, say). The lock is only ever held for a few assignments, never around a call
to the store, so ``status()`` answers at once even while the actor's flush is waiting on a
slow store; the ``log_*`` calls never take it.

States (``RunStatus.state``):

==========  ==================================================================
``idle``     nothing in flight; operations may be queued, waiting for a flush
``ready``    a flush is requested and the run waits for its actor (a client has a bounded
             number of live run actors; runs get one first come, first served)
``waiting``  a flush is planned and waits for a free executor worker
``flushing`` the run's calls are being made
``retrying`` a call failed transiently and is being retried with backoff
``spooled``  the run's work is in the spool (``spool_dir``) and not being re-sent right now
             (between flushes, or waiting for one of the spooler's re-sending threads);
             its next flush re-sends it first
``stopped``  terminated and fully flushed (as its last flush returns); its actor stops
``crashed``  the actor failed; the next flush starts a new one for the run
``closed``   the client was closed (``status()`` still answers, with the final state)
==========  ==================================================================

A run's ``errors`` stay bounded however long the service runs: see :class:`ErrorLog`.

Transient failures are not errors (they are retried, within ``retry_timeout``): ``retries``
counts them, per run, for the life of the client (every retried attempt of every call,
creation look-ups included), and ``last_retry_error`` is the latest one's type and message
(cut to 500 characters). It is *kept* after the run recovers, so that an operator can still
see what the last outage looked like; whether the run is retrying *now* is its ``state``.
A call that still fails when its ``retry_timeout`` is spent lands in ``errors``.

:data:`TOTALS` adds up what every run of the process did (entities logged, errors, retries,
and the duration of each flush round): the counters of the status endpoint, which never go
down, also when clients close or are dropped (their runs' records go, the totals stay).
"""

from __future__ import annotations

import bisect
import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from actors.delivery._jobs import KINDS, JobResult, empty_counts
from actors.queueing._pending import PendingRunId
from actors.queueing._queues import RunQueues

STATES = (
    "idle",
    "ready",
    "waiting",
    "flushing",
    "retrying",
    "spooled",
    "stopped",
    "crashed",
    "closed",
)
BUSY_STATES = frozenset({"ready", "waiting", "flushing", "retrying"})

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
    state: str = "idle"
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
            )


@dataclass(frozen=True)
class RunStatus:
    """One run, as its actor saw it at the moment of the snapshot."""

    pending_id: PendingRunId | None
    run_id: str | None
    state: str
    queued: dict[str, int]
    logged: dict[str, int]
    errors: list[str]
    worker: str | None = None
    errors_dropped: int = 0  # errors past the cap of ``errors``, counted in it as one line
    retries: int = 0  # transient failures retried so far (cumulative)
    last_retry_error: str | None = None  # the latest of them, kept after recovery
    spooled: dict[str, int] = field(default_factory=empty_counts)  # on disk, to be re-sent
    # On a database store: "on" (metrics through the SQL fast path), "off", or "fallback:
    # why" (through MLflow's log_batch); None before any metrics or on other stores.
    sql_fast_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "pending_id": None if self.pending_id is None else str(self.pending_id),
            "run_id": self.run_id,
            "state": self.state,
            "queued": dict(self.queued),
            "logged": dict(self.logged),
            "errors": list(self.errors),
            "worker": self.worker,
            "errors_dropped": self.errors_dropped,
            "retries": self.retries,
            "last_retry_error": self.last_retry_error,
            "spooled": dict(self.spooled),
            "sql_fast_path": self.sql_fast_path,
        }


@dataclass(frozen=True)
class ClientStatus:
    """A snapshot of every run of one client."""

    runs: list[RunStatus]
    tracking_uri: str | None = None
    executor: str | None = None
    closed: bool = False  # the client is closed: ``runs`` hold their final state
    client_id: int | None = None  # the number in its runs' pending labels; None before use

    def counts(self) -> dict[str, int]:
        """Runs per state, e.g. ``{"idle": 3, "flushing": 1}``."""
        counts: dict[str, int] = {}
        for run in self.runs:
            counts[run.state] = counts.get(run.state, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "tracking_uri": self.tracking_uri,
            "executor": self.executor,
            "closed": self.closed,
            "runs": [run.to_dict() for run in self.runs],
        }


# Upper bounds (seconds) of the ``runactors_flush_seconds`` buckets: from a round that
# finds the store idle (milliseconds) to one that retries for a whole ``retry_timeout``.
FLUSH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True)
class Totals:
    """What every run of this process did since it started (or forked), at one moment."""

    logged: dict[str, int]  # entities sent and acknowledged, per kind
    errors: int  # errors recorded in runs' ``errors`` (a repeated failure counts each time)
    retries: int  # transient failures retried
    flush_buckets: list[int]  # rounds per bucket of FLUSH_BUCKETS (not cumulative), +Inf last
    flush_count: int  # flush rounds that ended
    flush_seconds: float  # their total duration


class ProcessTotals:
    """The process-wide counters behind the status endpoint's ``*_total`` families.

    Added to where a run's record changes (a round's end, an error, a retry): a few
    additions under a lock per round, never on the ``log_*`` path. Nothing is taken away
    when a client closes, so the counters never go down; a forked child starts at zero.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()  # after a fork: the parent's may have been held
        self._logged = empty_counts()
        self._errors = 0
        self._retries = 0
        self._buckets = [0] * (len(FLUSH_BUCKETS) + 1)
        self._count = 0
        self._seconds = 0.0

    def add_round(self, logged: dict[str, int], seconds: float) -> None:
        index = bisect.bisect_left(FLUSH_BUCKETS, seconds)  # le: a bound is its own bucket
        with self._lock:
            for kind, n in logged.items():
                self._logged[kind] = self._logged.get(kind, 0) + n
            self._buckets[index] += 1
            self._count += 1
            self._seconds += seconds

    def add_errors(self, n: int) -> None:
        with self._lock:
            self._errors += n

    def add_retry(self) -> None:
        with self._lock:
            self._retries += 1

    def snapshot(self) -> Totals:
        with self._lock:
            return Totals(
                logged=dict(self._logged),
                errors=self._errors,
                retries=self._retries,
                flush_buckets=list(self._buckets),
                flush_count=self._count,
                flush_seconds=self._seconds,
            )


TOTALS = ProcessTotals()
os.register_at_fork(after_in_child=TOTALS._reset)
