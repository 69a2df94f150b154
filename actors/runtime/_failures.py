"""``FailureLog``: what the rounds of one client lost and no ``flush()`` has raised yet.

A background flush has nobody waiting on it, and a ``flush(synchronous=False)`` may never be
awaited; what their rounds lost (calls that failed permanently, or could be neither
delivered nor spooled) is kept here until a caller raises it (``await_completion()`` marks
each failure it raises) and ``close()`` raises whatever is left. A round whose undelivered
calls are safe in the spool lost nothing: its waiter still hears of it, the log keeps
nothing of it. Bounded: past ``KEPT`` failures the oldest are dropped and counted, so a
service failing for days does not grow in memory.
"""

from __future__ import annotations

import itertools
import threading

from mlflow.exceptions import MlflowException

KEPT = 50


class RoundFailure(MlflowException):
    """A failed round, as raised to a flush's waiter; knows its entry in the log.

    ``lost`` is the part of ``message`` that names what the round lost (None: everything
    it could not deliver is in the spool), as the log keeps it and ``close()`` raises it.
    """

    def __init__(
        self, message: str, log: FailureLog, token: int | None, lost: str | None = None
    ) -> None:
        super().__init__(message)
        self._log = log
        self._token = token
        self.lost = lost

    def mark_raised(self) -> None:
        if self._token is not None:
            self._log.raised(self._token)


def round_failure(log: FailureLog, message: str, lost: str | None) -> RoundFailure:
    """The failure a round's waiters are settled with; what it ``lost`` (if anything) is
    kept in ``log`` until a ``flush()`` or ``close()`` raises it."""
    token = None if lost is None else log.add(lost)
    return RoundFailure(message, log, token, lost)


class FailureLog:
    """Failure messages not raised yet, oldest first, at most ``KEPT`` of them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens = itertools.count()
        self._unraised: dict[int, str] = {}
        self.dropped = 0

    def add(self, message: str) -> int:
        """Keep a failure until it is raised; return its token."""
        token = next(self._tokens)
        with self._lock:
            self._unraised[token] = message
            if len(self._unraised) > KEPT:
                del self._unraised[next(iter(self._unraised))]
                self.dropped += 1
        return token

    def raised(self, token: int) -> None:
        with self._lock:
            self._unraised.pop(token, None)

    def take_unraised(self) -> list[str]:
        """Every failure not raised yet (the dropped ones counted), and forget them."""
        with self._lock:
            messages = list(self._unraised.values())
            dropped, self.dropped = self.dropped, 0
            self._unraised.clear()
        if dropped:
            messages.insert(0, f"... {dropped} earlier failures not kept (the latest are) ...")
        return messages
