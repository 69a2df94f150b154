"""MLflow's own tests of its queueing client (tests/autologging/test_autologging_client.py),
ported to runactors' client on a real SQLite store."""

from __future__ import annotations

import time
from unittest import mock

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils import _truncate_dict
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)
from stores import run_data

from client import MlflowAutologgingQueueingClient

ORIGINAL_LOG_BATCH = MlflowClient.log_batch


def test_client_truncates_param_keys_and_values(store, executor):
    client = MlflowAutologgingQueueingClient(executor=executor)
    params_to_log = {
        "a" * (MAX_ENTITY_KEY_LENGTH + 5): "b" * (MAX_PARAM_VAL_LENGTH + 5),
        "a" * (MAX_ENTITY_KEY_LENGTH + 50): "b" * (MAX_PARAM_VAL_LENGTH + 50),
    }
    with mlflow.start_run() as run:
        client.log_params(run_id=run.info.run_id, params=params_to_log)
        client.flush()

    assert run_data(store, run.info.run_id)[0] == _truncate_dict(
        params_to_log, max_key_length=MAX_ENTITY_KEY_LENGTH, max_value_length=MAX_PARAM_VAL_LENGTH
    )


def test_client_truncates_tag_keys_and_values(store, executor):
    client = MlflowAutologgingQueueingClient(executor=executor)
    tags_to_log = {
        "a" * (MAX_ENTITY_KEY_LENGTH + 5): "b" * (MAX_PARAM_VAL_LENGTH + 5),
        "c" * (MAX_ENTITY_KEY_LENGTH + 50): "d" * (MAX_PARAM_VAL_LENGTH + 50),
    }
    with mlflow.start_run() as run:
        client.set_tags(run_id=run.info.run_id, tags=tags_to_log)
        client.flush()

    assert run_data(store, run.info.run_id)[2] == _truncate_dict(
        tags_to_log, max_key_length=MAX_ENTITY_KEY_LENGTH, max_value_length=MAX_TAG_VAL_LENGTH
    )


def test_client_truncates_metric_keys(store, executor):
    client = MlflowAutologgingQueueingClient(executor=executor)
    metrics_to_log = {
        "a" * (MAX_ENTITY_KEY_LENGTH + 5): 1,
        "b" * (MAX_ENTITY_KEY_LENGTH + 50): 2,
    }
    with mlflow.start_run() as run:
        client.log_metrics(run_id=run.info.run_id, metrics=metrics_to_log)
        client.flush()

    assert run_data(store, run.info.run_id)[1] == _truncate_dict(
        metrics_to_log, max_key_length=MAX_ENTITY_KEY_LENGTH
    )


def test_client_logs_expected_run_data(store, executor):
    client = MlflowAutologgingQueueingClient(executor=executor)
    params_to_log = {
        f"param_key_{i}": f"param_val_{i}" for i in range(2 * MAX_PARAMS_TAGS_PER_BATCH + 1)
    }
    tags_to_log = {f"tag_key_{i}": f"tag_val_{i}" for i in range(2 * MAX_PARAMS_TAGS_PER_BATCH + 1)}
    metrics_to_log = {f"metric_key_{i}": i for i in range(4 * MAX_METRICS_PER_BATCH + 1)}

    with mlflow.start_run() as run:
        client.log_params(run_id=run.info.run_id, params=params_to_log)
        client.set_tags(run_id=run.info.run_id, tags=tags_to_log)
        client.log_metrics(run_id=run.info.run_id, metrics=metrics_to_log)
        client.flush()

    run_params, run_metrics, run_tags = run_data(store, run.info.run_id)
    assert run_params == params_to_log
    assert run_metrics == metrics_to_log
    assert run_tags == tags_to_log


def test_client_logs_metric_steps_correctly(store, executor):
    client = MlflowAutologgingQueueingClient(executor=executor)
    with mlflow.start_run() as run:
        for step in range(3):
            client.log_metrics(run_id=run.info.run_id, metrics={"a": 1}, step=step)
        client.flush()

    history = store.get_metric_history(run_id=run.info.run_id, key="a")
    assert len(history) == 3
    assert [metric.step for metric in history] == list(range(3))


def test_client_run_creation_and_termination_are_successful(experiment_id, executor):
    client = MlflowAutologgingQueueingClient(executor=executor)
    pending_run_id = client.create_run(experiment_id=experiment_id, start_time=5, tags={"a": "b"})
    client.set_terminated(run_id=pending_run_id, status="FINISHED", end_time=6)
    client.flush()

    runs = mlflow.search_runs(experiment_ids=[experiment_id], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.start_time == 5
    assert run.info.end_time == 6
    assert run.info.status == "FINISHED"
    assert {"a": "b"}.items() <= run.data.tags.items()


def _slow_log_batch(self, *args, **kwargs):
    time.sleep(1)  # a long-running logging operation
    return ORIGINAL_LOG_BATCH(self, *args, **kwargs)


def test_client_asynchronous_flush_operates_correctly(store):
    with mock.patch.object(MlflowClient, "log_batch", _slow_log_batch):
        with mlflow.start_run() as run:
            client = MlflowAutologgingQueueingClient()
            client.log_params(run_id=run.info.run_id, params={"a": "b"})
            run_operations = client.flush(synchronous=False)

            # Still in flight: nothing stored yet.
            assert not run_data(store, run.info.run_id)[0]
            assert not run_operations.done()

            run_operations.await_completion()
            assert run_operations.done()
            assert run_data(store, run.info.run_id)[0] == {"a": "b"}


def test_client_synchronous_flush_operates_correctly(store):
    with mock.patch.object(MlflowClient, "log_batch", _slow_log_batch):
        with mlflow.start_run() as run:
            client = MlflowAutologgingQueueingClient()
            client.log_params(run_id=run.info.run_id, params={"a": "b"})
            client.flush(synchronous=True)
            assert run_data(store, run.info.run_id)[0] == {"a": "b"}


def test_flush_clears_pending_operations(experiment_id):
    calls = []

    def counting(name):
        original = getattr(MlflowClient, name)

        def wrapper(self, *args, **kwargs):
            calls.append(name)
            return original(self, *args, **kwargs)

        return wrapper

    with (
        mock.patch.object(MlflowClient, "create_run", counting("create_run")),
        mock.patch.object(MlflowClient, "log_batch", counting("log_batch")),
        mock.patch.object(MlflowClient, "set_terminated", counting("set_terminated")),
    ):
        client = MlflowAutologgingQueueingClient()
        pending_run_id = client.create_run(experiment_id=experiment_id)
        client.log_params(run_id=pending_run_id, params={"a": "b"})
        client.log_metrics(run_id=pending_run_id, metrics={"c": 1})
        client.set_terminated(run_id=pending_run_id, status="FINISHED")
        client.flush()

        count_1 = len(calls)
        assert count_1 >= 3  # create_run, log_batch and set_terminated at least
        client.flush()
        assert len(calls) == count_1  # nothing new was queued, so nothing new was sent


def test_client_correctly_operates_as_context_manager_for_synchronous_flush(store, executor):
    params_to_log = {"a": "b"}
    metrics_to_log = {"c": 1}
    tags_to_log = {"d": "e"}

    with mlflow.start_run(), MlflowAutologgingQueueingClient(executor=executor) as client:
        run_id_1 = mlflow.active_run().info.run_id
        client.log_params(run_id_1, params_to_log)
        client.log_metrics(run_id_1, metrics_to_log)
        client.set_tags(run_id_1, tags_to_log)

    assert run_data(store, run_id_1) == (params_to_log, metrics_to_log, tags_to_log)

    exc_to_raise = Exception("test exception")
    with pytest.raises(Exception) as raised_exc_info:
        with mlflow.start_run(), MlflowAutologgingQueueingClient(executor=executor) as client:
            run_id_2 = mlflow.active_run().info.run_id
            client.log_params(run_id_2, params_to_log)
            client.log_metrics(run_id_2, metrics_to_log)
            client.set_tags(run_id_2, tags_to_log)
            raise exc_to_raise

    assert raised_exc_info.value is exc_to_raise
    assert run_data(store, run_id_2) == ({}, {}, {})


def test_logging_failures_are_handled_as_expected(experiment_id):
    with mock.patch.object(
        MlflowClient, "log_batch", side_effect=Exception("Batch logging failed!")
    ):
        client = MlflowAutologgingQueueingClient()
        pending_run_id = client.create_run(experiment_id=experiment_id)
        client.log_metrics(run_id=pending_run_id, metrics={"a": 1})
        client.set_terminated(run_id=pending_run_id, status="KILLED")

        with pytest.raises(MlflowException) as exc:
            client.flush()

    runs = mlflow.search_runs(experiment_ids=[experiment_id], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert not run.data.metrics  # the batch failed
    assert run.info.status == "KILLED"  # the termination after it still happened
    assert f"Failed to perform one or more operations on the run with ID {run.info.run_id}" in str(
        exc.value
    )
    assert "Batch logging failed!" in str(exc.value)
