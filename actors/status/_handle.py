"""``RunHandle``: one run of one session; ``RunWait``: its part of one ``flush()``.

A run's handle lives below the runtime (the session makes it, the supervisor schedules it,
the spooler spools it) so that everything that holds one can import it.

A ``RunWait`` is settled once when that run's flush ends.

A flush of 10,000 runs makes 10,000 of them inside the supervisor's answer, so they are
light: a slotted object each, and one condition per ``flush()`` call that all its runs
share (a Pykka future or an ``Event`` per run costs ten times more, and the answer must
come at once). The supervisor makes them and hands them to the run's actor with the flush
request; the actor settles them when the round that took the run's queues has ended (the
supervisor settles those it never handed over, at close).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from mlflow.exceptions import MlflowException

from actors.queueing._pending import PendingRunId
from actors.queueing._queues import RunQueues
from actors.status._record import RunRecord

if TYPE_CHECKING:
    import pykka


class FlushCall:
    """What the runs of one ``flush()`` share: the condition their waiters sleep on."""

    __slots__ = ("cond",)

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())


class RunWait:
    """One run's part of one flush: pending, then done with or without an error."""

    __slots__ = ("_call", "_done", "_error", "handle")

    def __init__(self, handle: RunHandle, call: FlushCall) -> None:
        self.handle = handle
        self._call = call
        self._done = False
        self._error: MlflowException | None = None

    def settle(self, error: MlflowException | None = None) -> None:
        """End this run's part of the flush (``error``: it failed); later calls do nothing."""
        with self._call.cond:
            if self._done:
                return
            self._error, self._done = error, True
            self._call.cond.notify_all()

    def done(self) -> bool:
        return self._done

    def wait(self, deadline: float | None) -> MlflowException | None:
        """Wait until settled (or ``time.monotonic()`` passes ``deadline``: ``TimeoutError``);
        return the error it was settled with, if any."""
        if not self._done:
            cond = self._call.cond
            with cond:
                while not self._done:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError
                    cond.wait(left)
        return self._error


class RunHandle:
    """One run of one session: its queues, its live record and (while alive) its actor.

    Besides ``ref``, the supervisor alone reads and writes the scheduling fields: whether
    the actor has a round (``busy``), whether a round is requested and not yet sent to an
    actor (``requested``, with the ``flush()`` waits it must settle), and whether the run
    waits in the session's ready queue for an actor (``ready``).
    """

    __slots__ = (
        "busy",
        "key",
        "pending",
        "queues",
        "ready",
        "record",
        "ref",
        "requested",
        "waits",
    )

    def __init__(self, key: Any, pending: PendingRunId | None, queues: RunQueues) -> None:
        self.key = key
        self.pending = pending
        self.queues = queues
        self.record = RunRecord(pending=pending, run_id=None if pending else key)
        self.ref: pykka.ActorRef[Any] | None = None
        self.busy = False
        self.requested = False
        self.waits: list[RunWait] = []
        self.ready = False
