"""The queued operations of one run, and the buffer that holds them until a flush.

Callers append to a run's :class:`RunQueues` directly (one short lock, no actor round
trip per ``log_*`` call); the run's actor takes from it, a whole snapshot at a time, and is
the only taker that sends. (The one other taker is ``__exit__`` after an exception, which
discards the queues under the same lock.) So the order in which a run's operations reach the
store is the order in which they were appended.

A run's queues also remember every param this client queued for the run, flushed or not
(:attr:`RunQueues.params_memory`, one for both names of a run): MLflow refuses a batch with a
param key twice, and a param whose value changes, so a repeat of the same value is dropped at
the append (never sent twice, never counted against ``max_queued``) and a changed value raises
there, naming the key, with nothing of that call queued.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, NamedTuple

from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_STATE

from actors.queueing._param_memory import ParamMemory

# key, value, timestamp (ms), step, model_id, dataset_name, dataset_digest.
# Plain tuples: building mlflow.entities.Metric objects is deferred to the executor.
MetricRow = tuple[str, Any, int, int, "str | None", "str | None", "str | None"]
# key, value (already a str).
Pair = tuple[str, str]

# The kinds of the appends a write-ahead journal's sink receives (actors.spool._journal).
J_CREATE, J_PARAMS, J_TAGS, J_METRICS, J_DATASETS, J_TERMINATE = range(6)
_J_KIND = {"params": J_PARAMS, "tags": J_TAGS, "datasets": J_DATASETS}


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
        "appended",
        "create",
        "datasets",
        "journal_run",
        "metrics",
        "params",
        "params_memory",
        "sealed",
        "sink",
        "tags",
        "taken",
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
        # Every param queued for this run, flushed or not, under any of its names.
        self.params_memory = ParamMemory()
        # With a write-ahead journal (spool_dir): each append also goes, in order and under
        # the same lock, to ``sink`` as ``(journal_run, kind, payload)``; ``appended`` counts
        # them and ``taken`` is that count at the last take (what a round acknowledges).
        self.sink: deque[Any] | None = None
        self.journal_run: Any = None
        self.appended = 0
        self.taken = 0

    def _journal(self, kind: int, payload: Any) -> int:
        """Under the lock: hand one append to the journal's sink; its position."""
        self.appended += 1
        self.sink.append((self.journal_run, kind, payload))  # type: ignore[union-attr]
        return self.appended

    def _wait_journal(self, position: int) -> None:
        """After the lock: with ``journal_interval=0``, wait until the append is on disk."""
        if self.journal_run.sync:
            self.journal_run.wait(position)

    def seal(self) -> None:
        """Refuse every later append (the client is closing); what is queued stays."""
        with self._lock:
            self.sealed = True

    def add_metrics(self, rows: list[MetricRow]) -> None:
        with self._lock:
            if self.sealed:
                raise closed_error()
            self.metrics += rows
            position = 0 if self.sink is None else self._journal(J_METRICS, rows)
        if position:
            self._wait_journal(position)

    def _new_params(self, pairs: list[Pair]) -> list[Pair]:
        """Under the lock: the pairs whose key this run has no value for yet, remembered;
        raises ``param_changed`` (and nothing changes) if one has another value already."""
        return self.params_memory.admit(pairs)

    def use_params(self, memory: ParamMemory) -> None:
        """From now on, check params against ``memory`` (the run's other name's), which
        takes what this one remembers."""
        with self._lock:
            self.params_memory.join(memory)
            self.params_memory = memory

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
            getattr(self, kind).extend(new)
            full = self._filled(kind)
            position = 0 if self.sink is None or not new else self._journal(_J_KIND[kind], new)
        if position:
            self._wait_journal(position)
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
            position = 0 if self.sink is None else self._journal(J_TERMINATE, terminate)
        if position:
            self._wait_journal(position)
        return True

    def take(self) -> Snapshot:
        """Remove and return everything queued, atomically with respect to producers."""
        with self._lock:
            return self._take_locked()

    def _take_locked(self) -> Snapshot:
        self.taken = self.appended
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

    def spill_locked(self) -> Snapshot:
        """Under the lock: remove everything queued, which the write-ahead journal holds and
        will deliver (``max_queued`` with ``spool_dir``). No round takes it, so ``taken``, the
        position the round in flight acknowledges, stays."""
        taken = self.taken
        snapshot = self._take_locked()
        self.taken = taken
        return snapshot

    def drop_delivered(self, position: int) -> Snapshot | None:
        """With the journal: remove what is queued if all of it is at or below ``position``,
        which a delivery from the journal sent (so it is not sent twice); None otherwise."""
        with self._lock:
            if self.appended > position or self.create or self.terminate or not self.has_work():
                return None
            return self._take_locked()

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
            self.params_memory.forget(key for key, _ in snapshot.params)
            if snapshot.terminate is not None:  # never sent: the run was not terminated
                self.terminate_queued = False
        if self.journal_run is not None:  # never to be sent: it leaves the journal too
            self.journal_run.ack(self.taken)
            if snapshot.create is not None:
                self.journal_run.abandon()
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
