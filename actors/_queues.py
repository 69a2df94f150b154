"""The queued operations of one run, and the buffer that holds them until a flush.

Callers append to a run's :class:`RunQueues` directly (one short lock, no actor round
trip per ``log_*`` call); the run's actor takes from it, a whole snapshot at a time, and is
the only taker that sends. (The one other taker is ``__exit__`` after an exception, which
discards the queues under the same lock.) So the order in which a run's operations reach the
store is the order in which they were appended.
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_STATE

# key, value, timestamp (ms), step, model_id, dataset_name, dataset_digest.
# Plain tuples: building mlflow.entities.Metric objects is deferred to the executor.
MetricRow = tuple[str, Any, int, int, "str | None", "str | None", "str | None"]
# key, value (already a str).
Pair = tuple[str, str]


def closed_error() -> MlflowException:
    """What every call on a closed client raises."""
    return MlflowException("This QueueingClient is closed.", INVALID_STATE)


class CreateRun(NamedTuple):
    """A queued ``create_run``."""

    experiment_id: str
    start_time: int | None
    tags: list[Pair]
    run_name: str | None
    # A uuid4 fixed when the creation is queued: how a creation of unknown outcome is found
    # on a tracking server before it is sent again (actors._create_key).
    create_key: str | None = None


class Terminate(NamedTuple):
    """A queued ``set_terminated``."""

    status: str | None
    end_time: int | None


class Snapshot(NamedTuple):
    """Everything a run had queued at the moment its actor took it."""

    create: CreateRun | None
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


def entity_counts(
    create: CreateRun | None,
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
        "params",
        "sealed",
        "tags",
        "terminate",
    )

    def __init__(self, create: CreateRun | None = None) -> None:
        self._lock = threading.Lock()
        self.create: CreateRun | None = create
        self.terminate: Terminate | None = None
        self.params: list[Pair] = []
        self.tags: list[Pair] = []
        self.metrics: list[MetricRow] = []
        self.datasets: list[Any] = []
        self.sealed = False

    def seal(self) -> None:
        """Refuse every later append (the client is closing); what is queued stays."""
        with self._lock:
            self.sealed = True

    def add_metrics(self, rows: list[MetricRow]) -> None:
        with self._lock:
            if self.sealed:
                raise closed_error()
            self.metrics += rows

    def add_params(self, pairs: list[Pair]) -> None:
        with self._lock:
            if self.sealed:
                raise closed_error()
            self.params += pairs

    def add_tags(self, pairs: list[Pair]) -> None:
        with self._lock:
            if self.sealed:
                raise closed_error()
            self.tags += pairs

    def add_datasets(self, datasets: list[Any]) -> None:
        with self._lock:
            if self.sealed:
                raise closed_error()
            self.datasets += datasets

    def set_terminate(self, terminate: Terminate) -> bool:
        """Queue a termination; ``False`` if one is already queued (nothing changes)."""
        with self._lock:
            if self.sealed:
                raise closed_error()
            if self.terminate is not None:
                return False
            self.terminate = terminate
            return True

    def take(self) -> Snapshot:
        """Remove and return everything queued, atomically with respect to producers."""
        with self._lock:
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
