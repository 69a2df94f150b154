"""Real faults on both executors: a locked database, a hung server, a server that restarts.

Nothing here patches MLflow in the test process (a patch never reaches a worker process):
the faults are real and reach whichever process makes the tracking calls.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from client import QueueingClient, RunOperations

# MLflow's SQL store waits this long for SQLite's lock before "database is locked".
SQLITE_BUSY_TIMEOUT = 20.0
# Timing margins are generous: the machine running the tests is shared and loaded.
MARGIN = 8.0


def watch(client: QueueingClient, operations: RunOperations, timeout: float) -> Counter[str]:
    """Poll ``client.status()`` until ``operations`` is done; count the states seen."""
    seen: Counter[str] = Counter()
    deadline = time.monotonic() + timeout
    while not operations.done():
        assert time.monotonic() < deadline, f"the flush did not end within {timeout} s: {seen}"
        for run in client.status().runs:
            seen[run.state] += 1
        time.sleep(0.01)
    return seen


def steps(store: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in store.get_metric_history(run_id, key))


@pytest.mark.slow
def test_a_locked_database_is_retried_within_retry_timeout_and_fails_past_it(
    tracking_uri, store, experiment_id, lock_store, executor
):
    """A second connection holds ``BEGIN EXCLUSIVE`` past MLflow's own 20 s wait: each call
    made meanwhile fails with a real "database is locked", in a worker process too."""
    patient_run = store.create_run(experiment_id).info.run_id
    hasty_run = store.create_run(experiment_id).info.run_id
    # One worker each, so that the warm one takes every job: a pool grows on demand, and a
    # new worker would open the store under the lock (that case: the next test).
    patient = QueueingClient(tracking_uri, executor=executor, max_workers=1, retry_timeout=120)
    hasty = QueueingClient(tracking_uri, executor=executor, max_workers=1, retry_timeout=1)
    try:
        # Warm: each executor's worker has its store open, as in a service that has logged
        # before.
        patient.set_tags(patient_run, {"warm": "1"})
        hasty.set_tags(hasty_run, {"warm": "1"})
        patient.flush()
        hasty.flush()
        for step in range(10):
            patient.log_metrics(patient_run, {"m": float(step)}, step=step)
            hasty.log_metrics(hasty_run, {"m": float(step)}, step=step)
        patient.log_params(patient_run, {"p": "1"})
        with lock_store(SQLITE_BUSY_TIMEOUT + 5) as lock:
            patient_ops = patient.flush(synchronous=False)
            hasty_ops = hasty.flush(synchronous=False)
            # Past its retry_timeout: the hasty client's flush fails, naming its run.
            with pytest.raises(MlflowException) as raised:
                hasty_ops.await_completion(timeout=SQLITE_BUSY_TIMEOUT + 60)
            message = str(raised.value)
            assert (
                f"Failed to perform one or more operations on the run with ID {hasty_run}"
                in message
            )
            assert "database is locked" in message and patient_run not in message
            # Within its retry_timeout: the patient client retries, and shows it.
            seen = watch(patient, patient_ops, timeout=SQLITE_BUSY_TIMEOUT + 60)
            # It could only finish once the lock was gone.
            assert lock.released.is_set(), patient.status().runs[0]
        patient_ops.await_completion()
        assert seen["retrying"] > 0, seen
        (status,) = patient.status().runs
        assert status.errors == [] and status.logged["metrics"] == 10
        # Every point exactly once, although its batch was sent more than once.
        assert steps(store, patient_run, "m") == list(range(10))
        assert store.get_run(patient_run).data.params == {"p": "1"}

        # Nothing else is affected: the failed run's client goes on working.
        assert steps(store, hasty_run, "m") == []
        hasty.log_metrics(hasty_run, {"after": 1.0})
        hasty.flush()
        assert store.get_run(hasty_run).data.metrics == {"after": 1.0}
    finally:
        patient.close()
        hasty.close()


@pytest.mark.slow
def test_a_store_opened_while_the_database_is_locked_is_retried(
    tracking_uri, store, experiment_id, lock_store, executor, sqlite_busy_timeout
):
    """A worker that opens the store for the first time while the database is locked (a
    fresh worker process; in this process the store is already open, so the thread executor
    only shows what is expected of both)."""
    run_id = store.create_run(experiment_id).info.run_id
    client = QueueingClient(tracking_uri, executor=executor, retry_timeout=120)
    # Opening the store in a worker process waits MLflow's own 20 s: the lock outlasts it.
    # The thread executor's open store meets the lock in the fast path, whose wait is short.
    hold = SQLITE_BUSY_TIMEOUT + 5 if executor == "process" else sqlite_busy_timeout + 3
    try:
        for step in range(10):
            client.log_metrics(run_id, {"m": float(step)}, step=step)
        with lock_store(hold) as lock:
            operations = client.flush(synchronous=False)
            watch(client, operations, timeout=SQLITE_BUSY_TIMEOUT + 60)
            assert lock.released.is_set()
        operations.await_completion()
        assert client.status().runs[0].errors == []
        assert steps(store, run_id, "m") == list(range(10))
    finally:
        client.close()


def test_close_with_a_hung_server_returns_within_its_timeout_and_reports_failure(
    hung_server, executor
):
    client = QueueingClient(hung_server, executor=executor, retry_timeout=15)
    client.log_params("0" * 32, {"p": "1"})  # a run ID string: nothing is sent before flush
    operations = client.flush(synchronous=False)
    deadline = time.monotonic() + 60
    while client.status().runs[0].state != "flushing":  # the call is on its way (a worker's)
        assert time.monotonic() < deadline, client.status()
        time.sleep(0.01)
    start = time.monotonic()
    with pytest.raises(MlflowException, match="closing before the last flush completed"):
        client.close(timeout=2)
    elapsed = time.monotonic() - start
    assert elapsed < 2 + MARGIN, f"close(timeout=2) took {elapsed:.1f} s"
    # The flush in flight is settled as failed, naming its run; nothing waits on it forever.
    with pytest.raises(MlflowException, match="0" * 32):
        operations.await_completion(timeout=MARGIN)


def test_a_server_stopped_during_a_flush_and_started_again_loses_and_duplicates_nothing(
    mlflow_server, executor
):
    server = MlflowClient(mlflow_server.uri)
    experiment_id = server.create_experiment(f"restart-{executor}-{time.monotonic_ns()}")
    # The runs exist before the flush: a create_run whose answer the crash cut off may have
    # landed, and resending it would make a second run (a later release looks it up first).
    run_ids = [server.create_run(experiment_id).info.run_id for _ in range(4)]
    points = 3000
    client = QueueingClient(mlflow_server.uri, executor=executor, max_workers=2, retry_timeout=300)
    try:
        for run_id in run_ids:
            client.log_params(run_id, {"p": run_id[:8]})
            for step in range(points):
                client.log_metrics(run_id, {"a": float(step), "b": -float(step)}, step=step)
            client.set_terminated(run_id)
        operations = client.flush(synchronous=False)
        deadline = time.monotonic() + 120
        while not any(run.state == "flushing" for run in client.status().runs):
            assert time.monotonic() < deadline, client.status()
            time.sleep(0.01)
        mlflow_server.stop()  # SIGKILL: requests in flight are cut off
        seen: Counter[str] = Counter()
        deadline = time.monotonic() + 120
        while not seen["retrying"]:  # a call failed on the dead server and is being retried
            assert not operations.done(), "the flush ended before the server went down"
            assert time.monotonic() < deadline, seen
            for run in client.status().runs:
                seen[run.state] += 1
            time.sleep(0.01)
        time.sleep(1)
        mlflow_server.start()
        watch(client, operations, timeout=300)
        operations.await_completion()
        assert all(run.errors == [] for run in client.status().runs)
    finally:
        client.close()
    for run_id in run_ids:
        run = server.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params == {"p": run_id[:8]}
        for key in ("a", "b"):
            assert steps(server, run_id, key) == list(range(points)), (run_id, key)
