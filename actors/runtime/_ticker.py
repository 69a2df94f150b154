"""``Ticker``: the one timer of the process, for every client's ``flush_interval``.

A daemon thread that sleeps until the nearest due time it was given, then tells the
supervisor (``tick``), which flushes the sessions that are due and schedules the next one.
One thread however many clients there are, started by the first ``schedule`` (so a process
whose clients have no ``flush_interval`` never has it), stopped with the actor system, and
rebuilt with it after ``fork`` (threads do not survive a fork).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

_logger = logging.getLogger("runactors.runtime")


class Ticker:
    """Calls ``tick`` at the nearest time passed to :meth:`schedule`, on its own thread."""

    def __init__(self, tick: Callable[[], None]) -> None:
        self._tick = tick
        self._wake = threading.Condition()
        self._due: float | None = None  # time.monotonic() of the next tick; None: none due
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="runactors-ticker", daemon=True)

    def schedule(self, due: float) -> None:
        """Tick at ``due`` (a ``time.monotonic()`` value), or earlier if already due earlier;
        the first call starts the thread."""
        with self._wake:
            if self._stopped:
                return
            if self._thread.ident is None:
                self._thread.start()
            if self._due is None or due < self._due:
                self._due = due
                self._wake.notify()

    def died(self) -> bool:
        """Whether the thread ended while the ticker was not stopped (its supervisor was
        gone): no background flush happens any more in this process."""
        return self._thread.ident is not None and not self._thread.is_alive() and not self._stopped

    def stop(self, timeout: float | None = None) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopped:
                    due = self._due
                    wait = None if due is None else due - time.monotonic()
                    if wait is not None and wait <= 0:
                        break
                    self._wake.wait(wait)
                if self._stopped:
                    return
                self._due = None
            try:
                self._tick()
            except Exception:  # the supervisor is gone: nothing left to time
                _logger.debug("the ticker stops", exc_info=True)
                return
