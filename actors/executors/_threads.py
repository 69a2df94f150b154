"""``DaemonThreads``: a queue of work served by up to ``limit`` daemon threads, started on
demand; what the executors' pool and the spool's re-sending share.

Daemon threads, not ``concurrent.futures.ThreadPoolExecutor``: its workers are joined before
``atexit`` handlers run (an interpreter whose pool waits on a hung store would never exit,
and the actor system's exit handler could no longer flush through it). So :meth:`stop`
is the only join, and it is bounded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

_logger = logging.getLogger("runactors.executors")

W = TypeVar("W")  # an item of work
S = TypeVar("S")  # what one thread holds while it lives (a worker process, say)

IDLE_TIMEOUT = 30.0  # seconds a thread waits for work before it ends


class ThreadsStopped(RuntimeError):
    """Work submitted after :meth:`DaemonThreads.stop`."""


class DaemonThreads(Generic[W, S]):
    """Up to ``limit`` daemon threads named ``<name>-<n>``, taking items from one FIFO queue.

    :meth:`submit` queues an item and starts one more thread if fewer than ``limit`` serve;
    each thread calls ``handle(state, item)`` for the items it takes, in the order they were
    submitted, with the ``state`` that ``open_state(n)`` made when it started
    (``close_state(state)`` when it ends). Whatever ``handle`` raises is logged (``what``
    says what failed) and the thread goes on. A thread with no work for ``idle_timeout``
    seconds ends (``None``: it lives until :meth:`stop`); the next submit starts another.
    ``handle`` may take more queued items at once with :meth:`take_more` (a group).
    """

    def __init__(
        self,
        name: str,
        limit: int,
        handle: Callable[[S, W], None],
        open_state: Callable[[int], S],
        close_state: Callable[[S], None] | None = None,
        *,
        idle_timeout: float | None = IDLE_TIMEOUT,
        what: str = "work",
    ) -> None:
        self.name = name
        self.limit = max(limit, 1)
        self.idle_timeout = idle_timeout
        self._handle = handle
        self._open = open_state
        self._close = close_state
        self._what = what
        self._queue: deque[W | None] = deque()  # None: a stop
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)  # an item was queued
        self._serving: dict[int, threading.Thread] = {}  # taking work, by their number
        self._all: list[threading.Thread] = []  # not yet ended: what stop() joins
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def threads(self) -> list[threading.Thread]:
        """The threads taking work now."""
        with self._lock:
            return [t for t in self._serving.values() if t.is_alive()]

    def died(self) -> list[threading.Thread]:
        """Threads that ended without leaving: killed by something other than their work."""
        with self._lock:
            return [t for t in self._serving.values() if t.ident is not None and not t.is_alive()]

    def submit(self, item: W) -> None:
        """Queue ``item``; raises :class:`ThreadsStopped` after :meth:`stop`."""
        with self._lock:
            if self._stopped:
                raise ThreadsStopped(f"{self.name}: stopped")
            self._queue.append(item)
            self._ready.notify()
            self._grow(1)

    def put_back(self, items: list[W]) -> bool:
        """Queue ``items`` first, in their order, for other threads to take (what a thread
        took with :meth:`take_more` and will not serve itself), starting threads for them
        as :meth:`submit` does. False once stopped: nothing queued, the caller serves them."""
        with self._lock:
            if self._stopped:
                return False
            self._queue.extendleft(reversed(items))
            self._ready.notify(len(items))
            self._grow(len(items))
            return True

    def _grow(self, wanted: int) -> None:
        # Under self._lock: up to ``wanted`` more threads, within ``limit``. Only live
        # threads count: a thread lost to a fault must not shrink the pool.
        self._serving = {n: t for n, t in self._serving.items() if t.is_alive()}
        for _ in range(wanted):
            if len(self._serving) >= self.limit:
                return
            self._all = [t for t in self._all if t.is_alive()]
            index = min(set(range(self.limit)) - self._serving.keys())
            thread = threading.Thread(
                target=self._serve, args=(index,), name=f"{self.name}-{index}", daemon=True
            )
            self._serving[index] = thread
            self._all.append(thread)
            thread.start()

    def _serve(self, index: int) -> None:
        try:
            state = self._open(index)
        except BaseException:
            _logger.exception("%s: starting a thread failed", self.name)
            with self._lock:
                self._leave(index)
            return
        try:
            while (item := self._next(index)) is not None:
                try:
                    self._handle(state, item)
                except BaseException:  # never lose the thread to one item's fault
                    _logger.exception("%s failed", self._what)
        finally:
            if self._close is not None:
                self._close(state)

    def _next(self, index: int) -> W | None:
        """The next item, or ``None`` when this thread is to end (stopped, or idle)."""
        with self._lock:  # submit() sees this thread gone, or this thread sees the item
            while not self._queue:
                if not self._ready.wait(self.idle_timeout) and not self._queue:
                    self._leave(index)
                    return None
            return self._queue.popleft()

    def take_more(self, wanted: Callable[[W], bool], n: int) -> list[W]:
        """Up to ``n`` queued items for which ``wanted`` is true, taken now without waiting
        (for ``handle`` to serve a group of items at once). Only the first ``2 * n`` queued
        items are looked at, so that a long queue of other work is not scanned under the
        lock; the items left keep their order, at the front of the queue."""
        taken: list[W] = []
        with self._lock:
            looked: list[W | None] = []
            try:
                while self._queue and len(taken) < n and len(looked) < 2 * n:
                    item = self._queue.popleft()
                    looked.append(item)
                    if item is not None and wanted(item):
                        looked.pop()
                        taken.append(item)
            finally:  # also if ``wanted`` raised: nothing is lost
                self._queue.extendleft(reversed(looked))
        return taken

    def _leave(self, index: int) -> None:
        # Under self._lock: this thread takes no more work.
        if self._serving.get(index) is threading.current_thread():
            del self._serving[index]

    def stop(self, timeout: float | None = None) -> bool:
        """Let the threads finish what is queued, then end; wait up to ``timeout`` seconds
        for them (not for the calling thread, if it is one). Returns whether none is left."""
        with self._lock:
            if not self._stopped:
                self._stopped = True
                self._queue.extend(None for _ in self._serving)
                self._ready.notify_all()
            threads = list(self._all)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(None if deadline is None else max(deadline - time.monotonic(), 0))
        return not any(t.is_alive() for t in threads if t is not threading.current_thread())
