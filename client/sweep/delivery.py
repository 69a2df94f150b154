"""How long a worker's client spent delivering, measured where the trial runs.

Delivery time is what users should judge the tracking by: from each ``flush()`` to the
moment the store acknowledged its operations, with overlapping flushes counted once (the
client is "delivering" while any flush is outstanding). It runs in the background, beside
the training; the training loop itself only pays for its ``log_*`` and ``flush`` calls,
timed as ``call_seconds``.

A process's first delivery also starts its client's executor and opens the store (seconds
of imports and schema checks on a cold process): it is kept apart as ``startup_seconds``,
with the metric points acknowledged by its end (``startup_points``), so that the rate of
delivery after it says what a warm client does.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from client import QueueingClient, RunOperations


class DeliveryClock:
    """Busy time of one process's client: the union of its flushes' outstanding intervals.

    An asynchronous flush is made through :meth:`flush`; a daemon thread awaits its
    completion (in order: one flush per run is in flight at a time) and closes its interval.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._outstanding = 0
        self._busy_since = 0.0
        self._delivered = 0.0
        self.call_seconds = 0.0
        self.startup_seconds: float | None = None  # the first busy interval, once it ended
        self.startup_points = 0
        self.count_points: Callable[[], int] | None = None  # metric points acknowledged now
        self._waiting: queue.SimpleQueue[RunOperations] = queue.SimpleQueue()
        self._waiter: threading.Thread | None = None

    def _begin(self) -> None:
        with self._lock:
            if self._outstanding == 0:
                self._busy_since = time.perf_counter()
            self._outstanding += 1

    def _end(self) -> None:
        with self._lock:
            self._outstanding -= 1
            if self._outstanding == 0:
                busy = time.perf_counter() - self._busy_since
                self._delivered += busy
                if self.startup_seconds is None:
                    self.startup_seconds = busy
                    self.startup_points = self.count_points() if self.count_points else 0

    def flush(self, client: QueueingClient) -> None:
        """Flush ``client`` asynchronously, timed until its operations are done."""
        self._begin()
        try:
            operations = client.flush(synchronous=False)
        except BaseException:
            self._end()
            raise
        if self._waiter is None:
            self._waiter = threading.Thread(
                target=self._await, name="runactors-sweep-delivery", daemon=True
            )
            self._waiter.start()
        self._waiting.put(operations)

    def _await(self) -> None:
        while True:
            operations = self._waiting.get()
            with contextlib.suppress(Exception):  # a failure is the trial's to report
                operations.await_completion()
            self._end()

    @contextlib.contextmanager
    def delivering(self) -> Iterator[None]:
        """Time a synchronous flush made in the block."""
        self._begin()
        try:
            yield
        finally:
            self._end()

    @contextlib.contextmanager
    def calling(self) -> Iterator[None]:
        """Time tracking calls made by the training loop in the block."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.call_seconds += time.perf_counter() - started

    @property
    def outstanding(self) -> int:
        """Flushes not yet acknowledged."""
        with self._lock:
            return self._outstanding

    @property
    def seconds(self) -> float:
        """Delivery time so far, the flushes outstanding now counted up to now."""
        with self._lock:
            busy = time.perf_counter() - self._busy_since if self._outstanding else 0.0
            return self._delivered + busy
