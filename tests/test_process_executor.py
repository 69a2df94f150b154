"""The process executor: same store contents as the thread executor, dead workers, clean stop."""

from __future__ import annotations

import os
import re
import signal
import time

import mlflow
import numpy as np
import pytest
from mlflow.entities import DatasetInput, InputTag

from client import QueueingClient


def workload(client: QueueingClient, experiment_id: str) -> list:
    """A bit of everything: names, tags on creation, params, tags, metric histories on
    several steps, a dataset on inputs and metrics, statuses and end times."""
    dataset = mlflow.data.from_numpy(np.arange(12).reshape(6, 2), name="digits-mini")
    entity = DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", "train")])
    runs = []
    for i in range(5):
        run = client.create_run(
            experiment_id, start_time=1000 + i, tags={"trial": i}, run_name=f"t{i}"
        )
        client.log_params(run, {"alpha": 0.1 * i, "layers": i + 1, "name": f"model-{i}"})
        client.set_tags(run, {"phase": "train"})
        client.log_inputs(run, [entity])
        for step in range(30):
            client.log_metrics(run, {"loss": 1.0 / (step + 1 + i), "acc": step / 30}, step=step)
        client.log_metrics(run, {"val": 0.5 + i}, step=30, dataset=dataset)
        client.set_tags(run, {"phase": "done"})
        client.set_terminated(run, status="FAILED" if i == 3 else "FINISHED", end_time=5000 + i)
        runs.append(run)
    return runs


def stored(store, experiment_id: str) -> dict:
    out = {}
    for run in store.search_runs([experiment_id]):
        info, data = run.info, run.data
        histories = {
            key: [
                (m.step, m.value, m.timestamp) for m in store.get_metric_history(info.run_id, key)
            ]
            for key in data.metrics
        }
        out[info.run_name] = {
            "status": info.status,
            "start": info.start_time,
            "end": info.end_time,
            "params": data.params,
            "tags": {k: v for k, v in data.tags.items() if not k.startswith("mlflow.")},
            "histories": {k: sorted(v) for k, v in histories.items()},
            "datasets": [(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs],
        }
    return out


def test_process_executor_stores_exactly_what_the_thread_executor_stores(tracking_uri, store):
    results = {}
    for executor in ("thread", "process"):
        experiment_id = store.create_experiment(f"same-{executor}")
        client = QueueingClient(tracking_uri, executor=executor, max_workers=2)
        runs = workload(client, experiment_id)
        client.close()
        assert all(r.done() for r in runs)
        results[executor] = stored(store, experiment_id)
    # Timestamps come from the caller's clock; compare everything else exactly.
    for name in results["thread"]:
        for key in results["thread"][name]["histories"]:
            for executor in results:
                results[executor][name]["histories"][key] = [
                    (step, value) for step, value, _ in results[executor][name]["histories"][key]
                ]
    assert results["process"] == results["thread"]
    assert len(results["thread"]) == 5
    assert results["thread"]["t3"]["status"] == "FAILED"
    assert len(results["thread"]["t0"]["histories"]["loss"]) == 30


def worker_pid(worker: str) -> int:
    match = re.search(r"pid (\d+)", worker)
    assert match, worker
    return int(match.group(1))


def test_a_worker_killed_mid_flush_costs_nothing(tracking_uri, store, experiment_id):
    client = QueueingClient(tracking_uri, executor="process", max_workers=2)
    big, small = client.create_run(experiment_id), client.create_run(experiment_id)
    client.flush()  # both runs exist; the workers are up
    for step in range(20_000):
        client.log_metrics(big, {"m": float(step)}, step=step)
    client.log_metrics(small, {"m": 1.0})
    operations = client.flush(synchronous=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = {r.pending_id: r for r in client.status().runs}
        if status[big].state == "flushing" and status[big].worker:
            break
        time.sleep(0.002)
    victim = worker_pid(status[big].worker)
    os.kill(victim, signal.SIGKILL)
    operations.await_completion()  # the job resumed on a fresh worker

    history = store.get_metric_history(big.resolve(), "m")
    assert sorted(m.step for m in history) == list(range(20_000))  # nothing lost or doubled
    assert store.get_run(small.resolve()).data.metrics == {"m": 1.0}
    executor = client._session._executor
    assert victim not in executor.worker_pids()
    # The pool recovered for the next flush.
    client.log_metrics(small, {"m": 2.0}, step=1)
    client.flush()
    assert len(store.get_metric_history(small.resolve(), "m")) == 2
    client.close()


def test_workers_are_stopped_by_close(tracking_uri, experiment_id):
    client = QueueingClient(tracking_uri, executor="process", max_workers=2)
    for i in range(4):
        client.log_metrics(client.create_run(experiment_id), {"m": float(i)})
    client.flush()
    pids = client._session._executor.worker_pids()
    assert 1 <= len(pids) <= 2
    client.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_status_shows_which_worker_runs_which_run(tracking_uri, experiment_id):
    client = QueueingClient(tracking_uri, executor="process", max_workers=1)
    run = client.create_run(experiment_id)
    client.flush()
    for step in range(5_000):
        client.log_metrics(run, {"m": float(step)}, step=step)
    operations = client.flush(synchronous=False)
    seen = set()
    while not operations.done():
        seen.add(client.status().runs[0].worker)
        time.sleep(0.001)
    operations.await_completion()
    workers = {w for w in seen if w}
    assert workers and all("worker-0[pid " in w for w in workers)
    assert client.status().runs[0].worker is None  # idle again
    client.close()
