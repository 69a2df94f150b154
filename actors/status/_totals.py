"""The process-wide totals behind the status endpoint's counters.

:data:`TOTALS` adds up what every run of the process did (entities logged, errors, retries,
and the duration of each flush round): the counters of the status endpoint, which never go
down, also when clients close or are dropped (their runs' records go, the totals stay).
"""

from __future__ import annotations

import bisect
import os
import threading
from dataclasses import dataclass

from actors.delivery._jobs import empty_counts

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
        self._seconds = 0.0

    def add_round(self, logged: dict[str, int], seconds: float) -> None:
        index = bisect.bisect_left(FLUSH_BUCKETS, seconds)  # le: a bound is its own bucket
        with self._lock:
            for kind, n in logged.items():
                self._logged[kind] = self._logged.get(kind, 0) + n
            self._buckets[index] += 1
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
                flush_seconds=self._seconds,
            )


TOTALS = ProcessTotals()


os.register_at_fork(after_in_child=TOTALS._reset)
