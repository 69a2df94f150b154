"""The queues of a client with ``max_queued`` or ``flush_interval``: every append counted
against the client's :class:`~actors.queueing._budget.Budget`, and, with ``flush_interval``,
watched for a full batch. (Kept apart from :mod:`actors.queueing._queues`, whose plain
:class:`~actors.queueing._queues.RunQueues` clients with neither option get.)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

from actors.queueing._budget import Budget
from actors.queueing._queues import (
    J_METRICS,
    CreateRunCall,
    MetricRow,
    Pair,
    RunQueues,
    Snapshot,
    closed_error,
)

_NEVER = sys.maxsize


def _no_trigger() -> None:
    pass


class BoundedRunQueues(RunQueues):
    """The queues of a client with ``max_queued``: every append is counted.

    The count is the client's :class:`~actors.queueing._budget.Budget`, under its lock, which is the
    lock of all the client's queues; an append that does not fit waits for room there (the
    lock released meanwhile) or raises, appending nothing.
    """

    __slots__ = ("_budget",)

    def __init__(self, create: CreateRunCall | None, budget: Budget) -> None:
        super().__init__(create)
        self._lock = budget.lock
        self._budget = budget

    def _take_room(self, n: int) -> None:
        # Under self._lock, before appending n entities.
        if self.sealed:
            raise closed_error()
        budget = self._budget
        room = budget.room - n
        if room < 0:
            room = budget.wait_for_room(n)  # releases the lock while it waits
            if self.sealed:
                raise closed_error()
        budget.room = room

    def add_metrics(self, rows: list[MetricRow]) -> None:
        # The hot path of a training loop: _take_room inlined, a subtraction and a comparison.
        n = len(rows)
        with self._lock:
            if self.sealed:
                raise closed_error()
            budget = self._budget
            room = budget.room - n
            if room < 0:
                room = budget.wait_for_room(n)  # releases the lock while it waits
                if self.sealed:
                    raise closed_error()
            budget.room = room
            self.metrics += rows
            position = 0 if self.sink is None else self._journal(J_METRICS, rows)
        if position:
            self._wait_journal(position)

    def _admit_params(self, pairs: list[Pair]) -> list[Pair]:
        """Under self._lock: :meth:`_new_params`, counted. Waiting for room releases the
        lock, and another call may log the same keys meanwhile: then look again."""
        budget = self._budget
        while True:
            if self.sealed:
                raise closed_error()
            new = self.params_memory.new_params(pairs)
            if budget.room >= len(new):
                new = self._new_params(pairs)  # remembered (the run's other name may log too)
                budget.room -= len(new)
                return new
            budget.wait_for_room(len(new))

    def _admit(self, kind: str, items: list[Any]) -> list[Any]:
        if kind == "params":
            return self._admit_params(items)
        self._take_room(len(items))
        return items

    def release(self, snapshot: Snapshot) -> None:
        self._budget.release(snapshot.held())


class WatchedRunQueues(BoundedRunQueues):
    """The queues of a client with ``flush_interval`` (and perhaps ``max_queued``).

    Besides counting, the queue calls ``on_full`` once when it comes to hold a full batch
    (``MAX_METRICS_PER_BATCH`` metrics, or ``MAX_PARAMS_TAGS_PER_BATCH`` params and tags),
    and again only after the next :meth:`take`: a comparison per append, a message per
    batch. (Without ``max_queued`` its budget is unbounded.) Clients with neither option
    get plain :class:`RunQueues`, whose appends pay for none of this.
    """

    __slots__ = ("_metrics_mark", "_pairs_mark", "on_full")

    def __init__(self, create: CreateRunCall | None, budget: Budget) -> None:
        super().__init__(create, budget)
        self._metrics_mark = MAX_METRICS_PER_BATCH
        self._pairs_mark = MAX_PARAMS_TAGS_PER_BATCH
        self.on_full: Callable[[], None] = _no_trigger  # set by the supervisor

    def add_metrics(self, rows: list[MetricRow]) -> None:
        with self._lock:
            self._take_room(len(rows))
            self.metrics += rows
            full = len(self.metrics) >= self._metrics_mark
            if full:
                self._metrics_mark = _NEVER
            position = 0 if self.sink is None else self._journal(J_METRICS, rows)
        if position:
            self._wait_journal(position)
        if full:
            self.on_full()

    def _filled(self, kind: str) -> bool:
        # Under self._lock, after an append: params and tags share one batch limit.
        if kind == "datasets":
            return False
        full = len(self.params) + len(self.tags) >= self._pairs_mark
        if full:
            self._pairs_mark = _NEVER
        return full

    def _on_full(self) -> None:
        self.on_full()

    def _take_locked(self) -> Snapshot:
        snapshot = super()._take_locked()
        self._metrics_mark = MAX_METRICS_PER_BATCH
        self._pairs_mark = MAX_PARAMS_TAGS_PER_BATCH
        return snapshot
