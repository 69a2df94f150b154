"""``Budget``: the bound ``max_queued`` puts on what one client holds in memory.

It counts the entities (metrics, params, tags, datasets) a client holds, queued or in a
round in flight: an append adds, the end of a round (delivered or failed) and a discard
subtract. Its lock is also the lock of every queue of the client, so an append updates the
count under the one lock it takes anyway; the hot path pays a subtraction and a comparison
(it keeps the room left, not the entities held, so the check needs no second attribute).
An append that would pass the bound asks for a flush, then waits (the lock released) until
a round ends and leaves room, for at most the client's ``retry_timeout`` seconds.

With a write-ahead journal (``spool_dir``), what is on disk need not stay in memory: a full
budget first asks :attr:`Budget.spill` to move the queued entities of runs whose appends are
all in the journal out of memory (delivered later from the journal, in order), and waits for
the journal's next commit if they are not on disk yet. Only when nothing can leave that way
(the journal failed, or everything held is in a round in flight) does it wait for a round.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_EXHAUSTED

from actors.queueing._pending import format_seconds


def _no_flush() -> None:
    pass


# Called with the budget's lock held: (entities that left memory, whether more will be able
# to once the journal's commit in progress ends: worth waiting for, see Budget.wake).
Spill = Callable[[], tuple[int, bool]]


class Budget:
    """The entities a client holds in memory, against its ``max_queued``."""

    __slots__ = ("_freed", "limit", "lock", "request_flush", "room", "spill", "timeout", "waiting")

    def __init__(self, limit: int, timeout: float) -> None:
        self.lock = threading.Lock()
        self._freed = threading.Condition(self.lock)
        self.limit = limit
        self.room = limit  # entities that still fit: limit minus those held
        self.timeout = timeout
        # Set by the supervisor: asks it (without waiting) to flush the client's runs.
        self.request_flush: Callable[[], None] = _no_flush
        # Set by the session with a write-ahead journal: what is on disk leaves memory.
        self.spill: Spill | None = None
        self.waiting = 0  # calls waiting for room (read without the lock by wake())

    @property
    def held(self) -> int:
        return self.limit - self.room

    def wait_for_room(self, n: int) -> int:
        """Wait until ``n`` more entities fit; called with :attr:`lock` held, returns with it
        and with the room that will be left once the caller appends them.

        Raises ``MlflowException`` (and the caller queues nothing) if ``n`` alone passes the
        bound, or if no round leaves enough room within ``timeout`` seconds.
        """
        if n > self.limit:
            raise MlflowException(
                f"This call logs {n} entities, more than max_queued={self.limit} allows a "
                "client to hold: split it, or raise max_queued.",
                INVALID_PARAMETER_VALUE,
            )
        deadline = time.monotonic() + self.timeout
        while self.room < n:
            commit_due = False
            if self.spill is not None:
                freed, commit_due = self.spill()
                if freed:  # on disk: out of memory, delivered from the journal
                    self.room += freed
                    self.request_flush()
                    continue
            if not commit_due:  # a round must end to make room
                self.request_flush()  # again at each wake-up: a round ended, work may remain
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MlflowException(
                    f"The client holds {self.held} entities and max_queued={self.limit}: no "
                    f"flush made room for {n} more within retry_timeout="
                    f"{format_seconds(self.timeout)} s (is the tracking store reachable?). "
                    "Nothing of this call was queued.",
                    RESOURCE_EXHAUSTED,
                )
            self.waiting += 1
            try:
                self._freed.wait(remaining)
            finally:
                self.waiting -= 1
        return self.room - n

    def wake(self) -> None:
        """The journal made a commit: calls waiting for room look again (see :attr:`spill`)."""
        if self.waiting:
            with self.lock:
                self._freed.notify_all()

    def release(self, n: int) -> None:
        """``n`` entities left memory (their round ended, or they were discarded)."""
        if n:
            with self.lock:
                self.room += n
                self._freed.notify_all()
