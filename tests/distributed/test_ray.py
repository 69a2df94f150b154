"""The client in distributed jobs: Ray tasks and a Ray Tune sweep logging into a real
``mlflow server`` on loopback, and the REST path from threads without Ray.

Every Ray task or Tune trial gets the driver's ``QueueingClient`` pickled (configuration
only), logs one run through its own process's actors, and closes its copy; the driver then
reads the server with MLflow's own client.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Any

import pytest
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from client import QueueingClient

ray = pytest.importorskip("ray")
tune = pytest.importorskip("ray.tune")

pytestmark = pytest.mark.slow

RETRY_TIMEOUT = 30.0


def loss_at(trial: int, step: int) -> float:
    return 1.0 / (trial + 1) / (step + 1)


def new_experiment(server: str, prefix: str) -> str:
    return MlflowClient(server).create_experiment(f"{prefix}-{uuid.uuid4().hex[:8]}")


def runs_by_name(server: str, experiment_id: str) -> dict[str, Any]:
    runs = MlflowClient(server).search_runs([experiment_id], max_results=1000)
    by_name = {run.info.run_name: run for run in runs}
    assert len(by_name) == len(runs), [run.info.run_name for run in runs]
    return by_name


def assert_history(store: MlflowClient, run_id: str, key: str, expected: dict[int, float]) -> None:
    """The run's full history of ``key`` is exactly ``{step: value}``, one point per step."""
    history = store.get_metric_history(run_id, key)
    assert len(history) == len(expected), (key, [(m.step, m.value) for m in history])
    assert {m.step: m.value for m in history} == pytest.approx(expected)


def extra_threads(baseline: set[str], timeout: float = 10.0) -> list[str]:
    """Threads that appeared since ``baseline`` and are still alive after ``timeout`` s
    (the actors stop a moment after ``close()`` returns). The process-wide supervisor,
    started by the first client of the process, stays by design and is not counted."""
    deadline = time.monotonic() + timeout
    while True:
        extra = sorted(
            t.name
            for t in threading.enumerate()
            if t.name not in baseline and not t.name.startswith("Supervisor")
        )
        if not extra or time.monotonic() > deadline:
            return extra
        time.sleep(0.05)


# -- (a) Ray tasks ------------------------------------------------------------------------


def log_trial(client: QueueingClient, experiment_id: str, trial: int, steps: int) -> dict:
    """One Ray task: one trial's run, logged through the client the task received."""
    before = {t.name for t in threading.enumerate()}
    run = client.create_run(experiment_id, tags={"source": "ray-task"}, run_name=f"task-{trial}")
    client.log_params(run, {"trial": trial, "lr": 0.1 * (trial + 1)})
    client.set_tags(run, {"worker_pid": os.getpid()})
    for step in range(steps):
        client.log_metrics(run, {"loss": loss_at(trial, step), "accuracy": step / steps}, step=step)
        if step % 7 == 6:
            client.flush(synchronous=False)
    client.set_terminated(run, "FINISHED")
    client.close()
    return {
        "trial": trial,
        "run_id": run.resolve(timeout=0),
        "pid": os.getpid(),
        "threads_left": extra_threads(before),
    }


def test_ray_tasks_log_runs_through_pickled_client(mlflow_server: str, ray_cluster: Any) -> None:
    trials, steps = 6, 20
    experiment_id = new_experiment(mlflow_server, "ray-tasks")
    client = QueueingClient(mlflow_server, retry_timeout=RETRY_TIMEOUT)
    task = ray_cluster.remote(log_trial)

    results = ray_cluster.get(
        [task.remote(client, experiment_id, trial, steps) for trial in range(trials)],
        timeout=180,
    )
    client.close()  # never used in the driver: nothing to send

    assert sorted(r["trial"] for r in results) == list(range(trials))
    # 6 tasks on 2 CPUs: some worker process ran several tasks, each with a fresh copy.
    assert len({r["pid"] for r in results}) < trials
    for result in results:
        # close() stopped the copy's run actors and executor threads in the worker.
        assert result["threads_left"] == [], result

    store = MlflowClient(mlflow_server)
    runs = runs_by_name(mlflow_server, experiment_id)
    assert set(runs) == {f"task-{trial}" for trial in range(trials)}
    for result in results:
        trial = result["trial"]
        run = runs[f"task-{trial}"]
        assert run.info.run_id == result["run_id"]
        assert run.info.status == RunStatus.to_string(RunStatus.FINISHED)
        assert run.info.end_time is not None
        assert run.data.params == {"trial": str(trial), "lr": str(0.1 * (trial + 1))}
        assert run.data.tags["source"] == "ray-task"
        assert run.data.tags["worker_pid"] == str(result["pid"])
        assert_history(store, run.info.run_id, "loss", {s: loss_at(trial, s) for s in range(steps)})
        assert_history(store, run.info.run_id, "accuracy", {s: s / steps for s in range(steps)})


# -- (b) a Ray Tune sweep -----------------------------------------------------------------


def trainable(config: dict, client: QueueingClient, experiment_id: str, steps: int) -> None:
    """A Tune function trainable: its run, one metric point per reported step."""
    trial = config["trial"]
    run = client.create_run(experiment_id, run_name=f"tune-{trial}")
    client.log_params(run, config)
    for step in range(steps):
        loss = loss_at(trial, step)
        client.log_metrics(run, {"loss": loss}, step=step)
        client.flush(synchronous=False)
        tune.report({"loss": loss, "step": step})
    client.set_terminated(run, "FINISHED")
    client.close()


def test_ray_tune_sweep_logs_every_trial(
    mlflow_server: str, ray_cluster: Any, tmp_path: Any
) -> None:
    trials, steps = 4, 5
    experiment_id = new_experiment(mlflow_server, "ray-tune")
    client = QueueingClient(mlflow_server, retry_timeout=RETRY_TIMEOUT)

    tuner = tune.Tuner(
        tune.with_parameters(trainable, client=client, experiment_id=experiment_id, steps=steps),
        param_space={"trial": tune.grid_search(list(range(trials))), "lr": 0.01},
        tune_config=tune.TuneConfig(metric="loss", mode="min"),
        run_config=tune.RunConfig(name="sweep", storage_path=str(tmp_path / "tune"), verbose=0),
    )
    results = tuner.fit()
    client.close()

    assert results.num_errors == 0, [str(error) for error in results.errors]
    assert len(results) == trials
    reported = {r.config["trial"]: r.metrics for r in results}
    assert set(reported) == set(range(trials))
    for trial, metrics in reported.items():
        assert metrics["step"] == steps - 1
        assert metrics["loss"] == pytest.approx(loss_at(trial, steps - 1))

    store = MlflowClient(mlflow_server)
    runs = runs_by_name(mlflow_server, experiment_id)
    assert set(runs) == {f"tune-{trial}" for trial in range(trials)}
    for trial in range(trials):
        run = runs[f"tune-{trial}"]
        assert run.info.status == RunStatus.to_string(RunStatus.FINISHED)
        assert run.data.params == {"trial": str(trial), "lr": "0.01"}
        assert_history(store, run.info.run_id, "loss", {s: loss_at(trial, s) for s in range(steps)})


# -- (c) the REST path, without Ray -------------------------------------------------------


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_rest_client_from_test_process_and_two_threads(
    mlflow_server: str, monkeypatch: pytest.MonkeyPatch, executor: str
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    steps = 50
    experiment_id = new_experiment(mlflow_server, f"rest-{executor}")
    client = QueueingClient(mlflow_server, executor=executor, retry_timeout=RETRY_TIMEOUT)

    first = client.create_run(experiment_id, run_name="single")
    client.log_params(run_id=first, params={"mode": "single"})
    for step in range(steps):
        client.log_metrics(first, {"loss": loss_at(0, step)}, step=step)
    client.set_terminated(first, "FINISHED")
    client.flush()

    shared = client.create_run(experiment_id, run_name="threads")
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def worker(index: int) -> None:
        try:
            start.wait(timeout=10)
            client.log_params(shared, {f"worker_{index}": index})
            client.set_tags(shared, {f"tag_{index}": f"value-{index}"})
            for step in range(steps):
                client.log_metrics(shared, {f"loss_{index}": loss_at(index, step)}, step=step)
                if step % 10 == 9:
                    client.flush(synchronous=False)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    client.set_terminated(shared, "FINISHED")
    client.close()

    store = MlflowClient(mlflow_server)
    runs = runs_by_name(mlflow_server, experiment_id)
    assert set(runs) == {"single", "threads"}
    single, both = runs["single"], runs["threads"]
    assert single.info.run_id == first.resolve(timeout=0)
    assert both.info.run_id == shared.resolve(timeout=0)
    for run in (single, both):
        assert run.info.status == RunStatus.to_string(RunStatus.FINISHED)
    assert single.data.params == {"mode": "single"}
    assert_history(store, single.info.run_id, "loss", {s: loss_at(0, s) for s in range(steps)})
    assert both.data.params == {"worker_0": "0", "worker_1": "1"}
    assert {k: v for k, v in both.data.tags.items() if k.startswith("tag_")} == {
        "tag_0": "value-0",
        "tag_1": "value-1",
    }
    for index in range(2):
        assert_history(
            store,
            both.info.run_id,
            f"loss_{index}",
            {s: loss_at(index, s) for s in range(steps)},
        )
