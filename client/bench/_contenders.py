"""The contenders: ways to deliver the same workload to a tracking store, each timed.

* :class:`DirectLoop`, the baseline: a plain ``MlflowClient`` loop, per run ``create_run``,
  ``log_batch`` in chunks of MLflow's limit (1,000 metrics), ``set_terminated``;
* :class:`Queueing`: a queueing client (runactors', or MLflow's own
  ``MlflowAutologgingQueueingClient``) that queues the workload and flushes it. Warm, its
  executor and workers are started by an untimed flush first; cold, the timing covers
  making the client, queueing and the flush.

Each measurement gets a fresh experiment (the scenario gives each a fresh store where it can)
and checks that every run landed, so that a fast wrong answer is never a result.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_METRICS_PER_BATCH


@dataclass(frozen=True)
class Workload:
    """``runs`` runs, each ``steps`` steps of ``metrics`` metrics."""

    runs: int
    steps: int
    metrics: int

    @property
    def points(self) -> int:
        return self.runs * self.steps * self.metrics

    def values(self, step: int) -> dict[str, float]:
        return {f"m{i}": (i + 1.0) / (step + 1.0) for i in range(self.metrics)}


# Enough runs that every pool thread (and so every worker process) starts in the warm-up.
WARM_UP = Workload(16, 1, 1)


class Contender(Protocol):
    name: str

    def measure(self, uri: str, workload: Workload) -> float:
        """Seconds to deliver ``workload`` to the store at ``uri`` (checked)."""
        ...


def _check(store: MlflowClient, experiment_id: str, workload: Workload, who: str) -> None:
    runs = store.search_runs([experiment_id], max_results=workload.runs + 1)
    if len(runs) != workload.runs:
        raise RuntimeError(f"{who}: {len(runs)} of {workload.runs} runs were stored")
    run = runs[0]
    if len(run.data.metrics) != workload.metrics or run.info.status != "FINISHED":
        raise RuntimeError(f"{who}: run {run.info.run_id} is incomplete: {run}")


def _start_timer() -> float:
    """The timer's start, after a full garbage collection: what the untimed setup allocated
    (a fresh MLflow store caches some 46,000 objects) is collected here, not in the timed
    part, where a full collection (0.1 s in a process of MLflow's size) would be charged to
    whichever contender's allocations happened to trigger it."""
    gc.collect()
    return time.perf_counter()


_experiments = 0


def _fresh_experiment(store: MlflowClient, who: str) -> str:
    global _experiments
    _experiments += 1
    return str(store.create_experiment(f"bench-{_experiments}-{who}-{time.time_ns()}"))


@dataclass
class DirectLoop:
    """MLflow's own client, run by run: the cost of logging without any queueing client."""

    name: str = "direct loop"

    def measure(self, uri: str, workload: Workload) -> float:
        store = MlflowClient(uri)
        experiment_id = _fresh_experiment(store, "direct")
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)  # the store opened, as the others' warm-up
        start = _start_timer()
        for i in range(workload.runs):
            run_id = client.create_run(experiment_id, run_name=f"bench-{i}").info.run_id
            metrics: list[Metric] = []
            for step in range(workload.steps):
                timestamp = int(time.time() * 1000)
                metrics.extend(
                    Metric(key, value, timestamp, step)
                    for key, value in workload.values(step).items()
                )
            for chunk in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                client.log_batch(run_id, metrics=metrics[chunk : chunk + MAX_METRICS_PER_BATCH])
            client.set_terminated(run_id)
        seconds = time.perf_counter() - start
        _check(store, experiment_id, workload, self.name)
        return seconds


def _queue(client: Any, experiment_id: str, workload: Workload) -> None:
    pending = [
        client.create_run(experiment_id, run_name=f"bench-{i}") for i in range(workload.runs)
    ]
    for step in range(workload.steps):
        values = workload.values(step)
        for run in pending:
            client.log_metrics(run, values, step=step)
    for run in pending:
        client.set_terminated(run)


@dataclass
class Queueing:
    """A queueing client made by ``make(uri)``: queue the workload, then one flush."""

    name: str
    make: Callable[[str], Any]
    cold: bool = False

    def measure(self, uri: str, workload: Workload) -> float:
        store = MlflowClient(uri)
        experiment_id = _fresh_experiment(store, "queueing")
        client: Any = None
        try:
            if not self.cold:
                client = self.make(uri)
                # Starts the executor's threads or worker processes (one per run submitted at
                # once, up to max_workers: as many runs as any pool has), opens the store.
                _queue(client, _fresh_experiment(store, "warm-up"), WARM_UP)
                client.flush()
            start = _start_timer()
            if client is None:
                client = self.make(uri)
            _queue(client, experiment_id, workload)
            client.flush()
            seconds = time.perf_counter() - start
        finally:
            if client is not None and hasattr(client, "close"):
                client.close()
        _check(store, experiment_id, workload, self.name)
        return seconds
