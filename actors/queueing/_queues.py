"""The queued operations of one run, and the buffer that holds them until a flush.

Callers append to a run's :class:`RunQueues` directly (one short lock, no actor round
trip per ``log_*`` call); the run's actor takes from it, a whole snapshot at a time, and is
the only taker that sends. (The one other taker is ``__exit__`` after an exception, which
discards the queues under the same lock.) So the order in which a run's operations reach the
store is the order in which they were appended.

A run's queues also remember every param this client queued for the run, flushed or not
(:attr:`RunQueues.param_values`): MLflow refuses a batch with a param key twice, and a param
whose value changes, so a repeat of the same value is dropped at the append (never sent twice,
never counted against ``max_queued``) and a changed value raises there, naming the key, with
nothing of that call queued.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, INVALID_STATE
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

from actors.queueing._budget import Budget

# key, value, timestamp (ms), step, model_id, dataset_name, dataset_digest.
# Plain tuples: building mlflow.entities.Metric objects is deferred to the executor.
MetricRow = tuple[str, Any, int, int, "str | None", "str | None", "str | None"]
# key, value (already a str).
Pair = tuple[str, str]


def metric_entity(row: MetricRow) -> Metric:
    """The MLflow ``Metric`` of one queued metric row (built by the executor, not at log time)."""
    key, value, timestamp, step, model_id, dataset_name, dataset_digest = row
    return Metric(
        key,
        value,
        timestamp,
        step,
        model_id=model_id,
        dataset_name=dataset_name,
        dataset_digest=dataset_digest,
    )


def closed_error() -> MlflowException:
    """What every call on a closed client raises."""
    return MlflowException("This QueueingClient is closed.", INVALID_STATE)


def _quoted(value: str, limit: int = 100) -> str:
    return repr(value) if len(value) <= limit else repr(value[:limit]) + "..."


def param_changed(key: str, old: str, new: str) -> MlflowException:
    """What logging ``key`` again with another value raises."""
    return MlflowException(
        f"Invalid param {key!r}: this client already queued or logged the value {_quoted(old)} "
        f"for this run, and MLflow does not allow changing a param's value (got "
        f"{_quoted(new)}). Nothing of this call was queued.",
        INVALID_PARAMETER_VALUE,
    )


class CreateRunCall(NamedTuple):
    """A ``create_run``: queued by the client, then planned with the run's first tags."""

    experiment_id: str
    start_time: int | None
    tags: list[Pair]
    run_name: str | None
    # A uuid4 fixed when the creation is queued: how a creation of unknown outcome is found
    # on a tracking server before it is sent again (actors.delivery._create_key); sent as a
    # tag only to a tracking server.
    create_key: str | None = None


class Terminate(NamedTuple):
    """A queued ``set_terminated``."""

    status: str | None
    end_time: int | None


class Snapshot(NamedTuple):
    """Everything a run had queued at the moment its actor took it."""

    create: CreateRunCall | None
    params: list[Pair]
    tags: list[Pair]
    metrics: list[MetricRow]
    datasets: list[Any]
    terminate: Terminate | None

    def is_empty(self) -> bool:
        return not (
            self.create
            or self.params
            or self.tags
            or self.metrics
            or self.datasets
            or self.terminate
        )

    def counts(self) -> dict[str, int]:
        return entity_counts(self.create, self.params, self.tags, self.metrics, self.datasets)

    def held(self) -> int:
        """The entities ``max_queued`` counted for this snapshot (not the creation's tags)."""
        return len(self.params) + len(self.tags) + len(self.metrics) + len(self.datasets)


def entity_counts(
    create: CreateRunCall | None,
    params: list[Pair],
    tags: list[Pair],
    metrics: list[MetricRow],
    datasets: list[Any],
) -> dict[str, int]:
    """Entities per kind; tags riding on ``create_run`` count as tags."""
    return {
        "metrics": len(metrics),
        "params": len(params),
        "tags": len(tags) + (len(create.tags) if create else 0),
        "datasets": len(datasets),
    }


class RunQueues:
    """The lock-guarded buffer of one run's not-yet-flushed operations.

    Producers (any thread) call the ``add_*`` methods; the run's actor calls :meth:`take`.
    Closing the client seals the queues (:meth:`seal`) before its last flush: from then on every
    ``add_*`` raises ``closed_error()``, checked under the lock the append takes anyway, so
    an append either lands before the seal (and that flush sends it) or raises.
    """

    __slots__ = (
        "_lock",
        "create",
        "datasets",
        "metrics",
        "param_values",
        "params",
        "sealed",
        "tags",
        "terminate",
        "terminate_queued",
    )

    def __init__(self, create: CreateRunCall | None = None) -> None:
        self._lock = threading.Lock()
        self.create: CreateRunCall | None = create
        self.terminate: Terminate | None = None
        self.params: list[Pair] = []
        self.tags: list[Pair] = []
        self.metrics: list[MetricRow] = []
        self.datasets: list[Any] = []
        self.sealed = False
        # Whether the client ever queued a termination (kept after it is sent): a process
        # that dies ends the runs its client created and did not terminate (``end_runs``).
        self.terminate_queued = False
        # Every param queued for this run, flushed or not: key -> value (as MLflow stores it).
        self.param_values: dict[str, str] = {}

    def seal(self) -> None:
        """Refuse every later append (the client is closing); what is queued stays."""
        with self._lock:
            self.sealed = True

    def add_metrics(self, rows: list[MetricRow]) -> None:
        with self._lock:
            if self.sealed:
                raise closed_error()
            self.metrics += rows

    def _new_params(self, pairs: list[Pair]) -> list[Pair]:
        """Under the lock: the pairs whose key this run has no value for yet; raises
        ``param_changed`` (and nothing changes) if one has another value already."""
        known = self.param_values
        new: list[Pair] = []
        for key, value in pairs:
            old = known.get(key)
            if old is None:
                new.append((key, value))
            elif old != value:
                raise param_changed(key, old, value)
        return new

    def add_params(self, pairs: list[Pair]) -> None:
        self._add("params", pairs)

    def add_tags(self, pairs: list[Pair]) -> None:
        self._add("tags", pairs)

    def add_datasets(self, datasets: list[Any]) -> None:
        self._add("datasets", datasets)

    def _add(self, kind: str, items: list[Any]) -> None:
        """Append to the ``kind`` queue (``params``, ``tags`` or ``datasets``) what this
        class admits of ``items``: one body for every class, which differ only in the hooks
        :meth:`_admit`, :meth:`_filled` and :meth:`_on_full`. (``add_metrics``, the hot path
        of a training loop, is written out in each class instead.)"""
        with self._lock:
            new = self._admit(kind, items)
            if kind == "params":
                self.param_values.update(new)
            getattr(self, kind).extend(new)
            full = self._filled(kind)
        if full:
            self._on_full()

    def _admit(self, kind: str, items: list[Any]) -> list[Any]:
        """Under the lock: what of ``items`` to append (for params, the new ones); raises,
        with nothing appended, if the queues are sealed or a param changes."""
        if self.sealed:
            raise closed_error()
        return self._new_params(items) if kind == "params" else items

    def _filled(self, kind: str) -> bool:
        """Under the lock, after an append to ``kind``: whether :meth:`_on_full` is due."""
        return False

    def _on_full(self) -> None:
        """Outside the lock, after an append that made :meth:`_filled` true."""

    def set_terminate(self, terminate: Terminate) -> bool:
        """Queue a termination; ``False`` if one is already queued (nothing changes)."""
        with self._lock:
            if self.sealed:
                raise closed_error()
            if self.terminate is not None:
                return False
            self.terminate = terminate
            self.terminate_queued = True
            return True

    def take(self) -> Snapshot:
        """Remove and return everything queued, atomically with respect to producers."""
        with self._lock:
            return self._take_locked()

    def _take_locked(self) -> Snapshot:
        snap = Snapshot(
            self.create, self.params, self.tags, self.metrics, self.datasets, self.terminate
        )
        self.create = None
        self.terminate = None
        self.params = []
        self.tags = []
        self.metrics = []
        self.datasets = []
        return snap

    def discard(self) -> Snapshot:
        """Remove and return everything queued, which will never be sent from memory."""
        snapshot = self.take()
        self.release(snapshot)
        return snapshot

    def drop(self) -> Snapshot:
        """:meth:`discard` what will never be sent at all (``__exit__`` after an exception):
        its params were never logged, so they are forgotten, free to be logged again."""
        with self._lock:
            snapshot = self._take_locked()
            for key, _ in snapshot.params:
                self.param_values.pop(key, None)
            if snapshot.terminate is not None:  # never sent: the run was not terminated
                self.terminate_queued = False
        self.release(snapshot)
        return snapshot

    def release(self, snapshot: Snapshot) -> None:
        """A taken snapshot has left memory (spooled or dropped): nothing to count here."""

    def put_back(self, snapshot: Snapshot) -> None:
        """Return a taken snapshot to the front of the queues (its flush never started)."""
        with self._lock:
            if snapshot.create is not None:
                self.create = snapshot.create
            if snapshot.terminate is not None and self.terminate is None:
                self.terminate = snapshot.terminate
            self.params = snapshot.params + self.params
            self.tags = snapshot.tags + self.tags
            self.metrics = snapshot.metrics + self.metrics
            self.datasets = snapshot.datasets + self.datasets

    def counts(self) -> dict[str, int]:
        """Queued entities per kind; a lock-free estimate, exact when producers are idle."""
        return entity_counts(self.create, self.params, self.tags, self.metrics, self.datasets)

    def has_work(self) -> bool:
        return bool(
            self.create
            or self.terminate
            or self.metrics
            or self.params
            or self.tags
            or self.datasets
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

    def _admit_params(self, pairs: list[Pair]) -> list[Pair]:
        """Under self._lock: :meth:`_new_params`, counted. Waiting for room releases the
        lock, and another call may log the same keys meanwhile: then look again."""
        budget = self._budget
        while True:
            if self.sealed:
                raise closed_error()
            new = self._new_params(pairs)
            if budget.room >= len(new):
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
