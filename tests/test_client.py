"""The QueueingClient's public behaviour (docs/api.md), line by line, on a real SQLite store."""

from __future__ import annotations

import json
import threading
import time
from unittest import mock

import mlflow
import numpy as np
import pytest
from liveness import wait_for_no_run_actors, wait_for_threads
from mlflow.entities import RunStatus as MlflowRunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from stores import run_data

import client as client_module
from client import (
    ClientStatus,
    MlflowAutologgingQueueingClient,
    PendingRunId,
    QueueingClient,
    RunOperations,
)


@pytest.fixture
def client(tracking_uri, executor):
    client = QueueingClient(tracking_uri, executor=executor)
    yield client
    client.close()


@pytest.fixture
def thread_client(tracking_uri):
    """For tests that inject a delay into MlflowClient, which only reaches threads."""
    client = QueueingClient(tracking_uri)
    yield client
    client.close()


def test_alias_and_exports():
    assert MlflowAutologgingQueueingClient is QueueingClient
    assert set(client_module.__all__) >= {
        "QueueingClient",
        "MlflowAutologgingQueueingClient",
        "PendingRunId",
        "RunOperations",
        "ClientStatus",
        "RunStatus",
    }


def test_default_tracking_uri_follows_mlflow(tracking_uri):
    assert QueueingClient().tracking_uri == tracking_uri == mlflow.get_tracking_uri()


def test_run_name_is_honoured(client, store, experiment_id):
    pending = client.create_run(experiment_id, run_name="trial-7")
    client.flush()
    assert store.get_run(pending.resolve()).info.run_name == "trial-7"


def test_second_termination_before_flush_raises_and_keeps_the_first(client, store, experiment_id):
    pending = client.create_run(experiment_id)
    client.set_terminated(pending, status="KILLED", end_time=10)
    with pytest.raises(MlflowException, match="termination") as exc:
        client.set_terminated(pending, status="FINISHED")
    assert exc.value.error_code == "INVALID_STATE"
    client.flush()
    info = store.get_run(pending.resolve()).info
    assert (info.status, info.end_time) == ("KILLED", 10)
    # Once flushed, the run may be terminated again (as MLflow allows).
    client.set_terminated(pending, status="FINISHED", end_time=20)
    client.flush()
    assert store.get_run(pending.resolve()).info.status == "FINISHED"


def test_pending_ids_of_other_clients_or_made_by_hand_are_rejected(tracking_uri, experiment_id):
    one, other = QueueingClient(tracking_uri), QueueingClient(tracking_uri)
    try:
        theirs = other.create_run(experiment_id)
        for foreign in (theirs, PendingRunId()):
            for call in (
                lambda run: one.log_metrics(run, {"a": 1.0}),
                lambda run: one.log_params(run, {"a": 1}),
                lambda run: one.set_tags(run, {"a": 1}),
                lambda run: one.set_terminated(run),
                lambda run: one.log_inputs(run, [mock.Mock()]),
            ):
                with pytest.raises(MlflowException, match="not created by this client"):
                    call(foreign)
        assert one.status().runs == []
        other.flush()
        assert theirs.done()
    finally:
        one.close()
        other.close()


def test_unknown_run_id_fails_alone_at_flush(client, store, experiment_id):
    good = store.create_run(experiment_id).info.run_id
    client.log_metrics("0" * 32, {"a": 1.0})  # not looked up at the call
    client.log_metrics(good, {"a": 1.0})
    with pytest.raises(MlflowException) as exc:
        client.flush()
    assert f"Failed to perform one or more operations on the run with ID {'0' * 32}" in str(
        exc.value
    )
    assert good not in str(exc.value)
    assert run_data(store, good)[1] == {"a": 1.0}
    failed = next(r for r in client.status().runs if r.run_id == "0" * 32)
    assert failed.errors and failed.logged["metrics"] == 0


def test_log_inputs_none_or_empty_is_a_no_op_and_datasets_are_logged(client, store, experiment_id):
    client.log_inputs("whatever", None)
    client.log_inputs("whatever", [])
    assert client.status().runs == []

    dataset = mlflow.data.from_numpy(np.arange(6).reshape(3, 2), name="tiny")
    entity = dataset._to_mlflow_entity()
    from mlflow.entities import DatasetInput, InputTag

    pending = client.create_run(experiment_id)
    client.log_inputs(
        pending, [DatasetInput(entity, tags=[InputTag("mlflow.data.context", "train")])]
    )
    client.flush()
    model = store.create_logged_model(experiment_id, source_run_id=pending.resolve())
    client.log_metrics(pending, {"acc": 0.5}, step=3, dataset=dataset, model_id=model.model_id)
    client.flush()
    run = store.get_run(pending.resolve())
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["tiny"]
    (metric,) = store.get_logged_model(model.model_id).metrics
    assert (metric.key, metric.step, metric.dataset_name, metric.dataset_digest) == (
        "acc",
        3,
        "tiny",
        dataset.digest,
    )


def test_timestamps_are_taken_at_the_call_and_step_defaults_to_zero(client, store, experiment_id):
    pending = client.create_run(experiment_id)
    before = int(time.time() * 1000)
    client.log_metrics(pending, {"a": 1.0})
    after = int(time.time() * 1000)
    time.sleep(0.3)
    client.flush()
    (metric,) = store.get_metric_history(pending.resolve(), "a")
    assert before <= metric.timestamp <= after
    assert metric.step == 0


def test_context_manager_exception_drops_everything_and_reraises_unchanged(
    tracking_uri, store, experiment_id
):
    error = KeyError("boom")
    with pytest.raises(KeyError) as raised, QueueingClient(tracking_uri) as client:
        pending = client.create_run(experiment_id)
        client.log_metrics(pending, {"a": 1.0})
        raise error
    assert raised.value is error
    assert store.search_runs([experiment_id]) == []
    with pytest.raises(MlflowException, match="dropped"):
        pending.resolve(timeout=5)
    # The client is still usable, and what it drops stays dropped.
    client.flush()
    assert store.search_runs([experiment_id]) == []
    client.close()


def test_status_reports_every_run_with_the_documented_fields(client, experiment_id):
    pending = client.create_run(experiment_id, tags={"t": 1})
    client.log_params(pending, {"p": 1, "q": 2})
    client.log_metrics(pending, {"a": 1.0, "b": 2.0})
    status = client.status()
    assert isinstance(status, ClientStatus)
    (run,) = status.runs
    assert run.pending_id is pending and run.run_id is None and run.state == "idle"
    assert run.queued == {"metrics": 2, "params": 2, "tags": 1, "datasets": 0}
    assert run.logged == {"metrics": 0, "params": 0, "tags": 0, "datasets": 0}
    assert run.errors == []

    client.set_terminated(pending)
    client.flush()
    (run,) = client.status().runs  # still listed after it finished
    assert run.run_id == pending.resolve()
    assert run.queued == {"metrics": 0, "params": 0, "tags": 0, "datasets": 0}
    assert run.logged == {"metrics": 2, "params": 2, "tags": 1, "datasets": 0}
    as_dict = json.loads(json.dumps(client.status().to_dict()))
    assert as_dict["runs"][0]["pending_id"] == str(pending)
    assert as_dict["runs"][0]["run_id"] == pending.resolve()


def test_terminated_and_flushed_run_actor_stops_but_stays_in_status(client, experiment_id):
    runs = [client.create_run(experiment_id) for _ in range(12)]
    for run in runs:
        client.log_metrics(run, {"m": 1.0})
        client.set_terminated(run)
    client.flush()
    # As flush() returns, not a moment later (the supervisor hears of the round after).
    assert [r.state for r in client.status().runs] == ["stopped"] * len(runs)
    pending = runs[0]
    # Logging to the finished run still works: a new actor takes over.
    client.log_metrics(pending, {"late": 1.0})
    assert client.status().runs[0].state == "idle"  # something to send again
    client.set_terminated(pending)
    client.flush()
    assert client.status().runs[0].logged["metrics"] == 2
    assert client.status().runs[0].state == "stopped"
    assert wait_for_no_run_actors() == []


def test_pending_run_id_resolve_done_and_failed_creation(client, store, experiment_id):
    pending = client.create_run(experiment_id)
    assert not pending.done()
    with pytest.raises(TimeoutError):
        pending.resolve(timeout=0.05)
    client.flush()
    assert pending.done() and store.get_run(pending.resolve()).info.experiment_id == experiment_id
    assert hash(pending) == hash(pending) and {pending: 1}[pending] == 1

    doomed = client.create_run("123456789")  # no such experiment
    client.log_metrics(doomed, {"a": 1.0})
    with pytest.raises(MlflowException, match="create_run failed"):
        client.flush()
    assert doomed.done()
    with pytest.raises(MlflowException, match="was not created"):
        doomed.resolve()
    # Later operations on it fail at flush, and say why.
    client.log_metrics(doomed, {"b": 1.0})
    with pytest.raises(MlflowException, match="creation failed"):
        client.flush()


def test_run_operations_of_an_asynchronous_flush(thread_client, store, experiment_id):
    client = thread_client
    gate = threading.Event()
    original = MlflowClient.log_batch

    def gated(self, *args, **kwargs):
        gate.wait(30)
        return original(self, *args, **kwargs)

    pending = client.create_run(experiment_id)
    client.log_metrics(pending, {"a": 1.0})
    with mock.patch.object(MlflowClient, "log_batch", gated):
        operations = client.flush(synchronous=False)
        assert isinstance(operations, RunOperations)
        assert not operations.done()
        with pytest.raises(TimeoutError):
            operations.await_completion(timeout=0.1)
        gate.set()
        operations.await_completion(timeout=30)
    assert operations.done()
    assert run_data(store, pending.resolve())[1] == {"a": 1.0}


def test_close_flushes_stops_threads_and_later_calls_raise(tracking_uri, store, experiment_id):
    baseline = threading.active_count()
    client = QueueingClient(tracking_uri)
    pending = client.create_run(experiment_id)
    client.log_metrics(pending, {"a": 1.0})
    client.close()
    assert run_data(store, pending.resolve())[1] == {"a": 1.0}
    assert wait_for_threads(baseline + 1) <= baseline + 1  # the process-wide supervisor may start
    for call in (
        lambda: client.create_run(experiment_id),
        lambda: client.log_metrics(pending, {"a": 1.0}),
        lambda: client.log_params("x" * 32, {"a": 1}),
        lambda: client.set_terminated(pending),
        lambda: client.flush(),
    ):
        with pytest.raises(MlflowException, match="closed"):
            call()
    assert client.status().closed  # status() keeps answering (tests/test_close.py)
    client.close()  # a second close does nothing


def test_close_reports_what_it_could_not_send(tracking_uri):
    client = QueueingClient(tracking_uri)
    client.log_metrics("f" * 32, {"a": 1.0})
    with pytest.raises(MlflowException, match="f" * 32):
        client.close()


def test_invalid_constructor_arguments(tracking_uri):
    for kwargs in (
        {"executor": "gpu"},
        {"max_workers": 0},
        {"max_workers": "2"},
        {"max_workers": 1.5},
        {"retry_timeout": -1},
        {"retry_timeout": "1"},
    ):
        with pytest.raises(MlflowException, match="Invalid"):
            QueueingClient(tracking_uri, **kwargs)
    with pytest.raises(MlflowException, match="tracking_uri"):
        QueueingClient(42)


def test_terminal_status_defaults_like_mlflow(client, store, experiment_id):
    pending = client.create_run(experiment_id)
    client.set_terminated(pending)
    client.flush()
    assert store.get_run(pending.resolve()).info.status == MlflowRunStatus.to_string(
        MlflowRunStatus.FINISHED
    )


def test_a_client_dropped_without_close_sends_what_it_queued(tracking_uri, store, experiment_id):
    import gc

    client = QueueingClient(tracking_uri)
    pending = client.create_run(experiment_id, run_name="dropped")
    client.log_metrics(pending, {"a": 1.0})
    del client
    gc.collect()
    assert pending.resolve(timeout=30)  # the finalizer flushed it
    assert run_data(store, pending.resolve())[1] == {"a": 1.0}
    assert wait_for_no_run_actors() == []
