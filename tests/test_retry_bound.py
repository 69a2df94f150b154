"""``retry_timeout`` is the user's bound: runactors' calls make one HTTP attempt each, bounded
by what is left of the call's ``retry_timeout``, and an outage shows in ``status()`` at once.

MLflow's HTTP settings are its defaults here (7 retries with minutes of backoff, 120 s per
request), as a user has them: runactors must not depend on the environment to be bounded.
"""

from __future__ import annotations

import inspect
import time
import uuid

import pytest
from mlflow.exceptions import MlflowException
from mlflow.store.tracking.rest_store import RestStore
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service.client import TrackingServiceClient
from servers import LoopbackServer

from actors.delivery._store import (
    REQUEST_TIMEOUT_FLOOR,
    BoundedRestStore,
    make_client,
    request_deadline,
    request_timeout,
)
from client import QueueingClient

# Timing margins are generous: the machine running the tests is shared and loaded.
MARGIN = 8.0


# -- the private MLflow names actors.delivery._store relies on ----------------------------------


def test_the_private_mlflow_names_that_the_bounded_store_relies_on_exist():
    params = list(inspect.signature(RestStore._call_endpoint).parameters)
    assert params == ["self", "api", "json_body", "endpoint", "retry_timeout_seconds",
                      "response_proto"]  # fmt: skip
    for name in ("_METHOD_TO_INFO", "_V3_METHOD_TO_INFO", "_V3_APIS",
                 "_validate_workspace_support_if_specified"):  # fmt: skip
        assert hasattr(RestStore, name), name
    assert isinstance(inspect.getattr_static(TrackingServiceClient, "store"), property)
    client = MlflowClient("http://127.0.0.1:1")
    assert isinstance(client._tracking_client, TrackingServiceClient)


def test_only_runactors_clients_on_a_server_get_the_bounded_store(tracking_uri):
    bounded = make_client("http://127.0.0.1:1")
    assert type(bounded._tracking_client.store) is BoundedRestStore
    # The user's own clients, made after ours, keep MLflow's store and settings.
    assert type(MlflowClient("http://127.0.0.1:1")._tracking_client.store) is RestStore
    assert type(make_client(tracking_uri)._tracking_client.store) is not BoundedRestStore


def test_the_bounded_store_talks_to_a_real_server(mlflow_server_default_http):
    """Every kind of request runactors makes goes through the bounded store and works."""
    client = make_client(mlflow_server_default_http.uri)
    experiment_id = client.create_experiment(f"bounded-{uuid.uuid4().hex}")
    run_id = client.create_run(experiment_id, tags={"a": "1"}).info.run_id
    client.log_batch(run_id, params=[], metrics=[], tags=[])
    client.set_terminated(run_id)
    assert [r.info.run_id for r in client.search_runs([experiment_id])] == [run_id]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_one_attempt_per_request_against_a_resetting_server(mlflow_http_defaults):
    """A server that resets every connection: MLflow's default would retry 7 times with
    backoff (minutes); runactors' client gives up after one connection, at once."""
    server = LoopbackServer(reset=True)
    try:
        client = make_client(server.uri)
        started = time.monotonic()
        with pytest.raises(MlflowException):
            client.get_experiment("0")
        assert time.monotonic() - started < MARGIN
        assert server.accepted == 1
    finally:
        server.close()


def test_a_request_waits_at_most_what_is_left_of_its_deadline(mlflow_http_defaults):
    """A server that never answers: the request times out with its call's deadline (MLflow's
    default would wait 120 s, then retry)."""
    assert request_timeout() == 120.0  # no deadline: MLflow's MLFLOW_HTTP_REQUEST_TIMEOUT
    with request_deadline(time.monotonic() + 0.01):
        assert request_timeout() == REQUEST_TIMEOUT_FLOOR
    server = LoopbackServer()
    try:
        client = make_client(server.uri)
        started = time.monotonic()
        with request_deadline(time.monotonic() + 2), pytest.raises(MlflowException):
            client.get_experiment("0")
        assert time.monotonic() - started < 2 + MARGIN
    finally:
        server.close()


# -- a real server stopped -----------------------------------------------------------------


def _new_experiment(uri: str) -> str:
    return MlflowClient(uri).create_experiment(f"bound-{uuid.uuid4().hex}")


def test_a_stopped_server_fails_the_flush_within_retry_timeout(
    mlflow_server_default_http, executor
):
    server = mlflow_server_default_http
    experiment_id = _new_experiment(server.uri)
    client = QueueingClient(server.uri, executor=executor, retry_timeout=1)
    try:
        run = client.create_run(experiment_id)
        client.log_metrics(run, {"m": 1.0}, step=0)
        server.stop()
        started = time.monotonic()
        with pytest.raises(MlflowException, match=str(run)) as raised:
            client.flush()
        took = time.monotonic() - started
        # retry_timeout plus one request's floor, plus a worker process's start on a loaded
        # machine: seconds, not MLflow's minutes.
        assert took < 1 + MARGIN, f"the flush took {took:.1f} s"
        assert "create_run failed" in str(raised.value)
        status = client.status().runs[0]
        assert status.retries >= 1 and status.last_retry_error
    finally:
        client.close(timeout=10)
        server.start()


def test_an_outage_shows_in_status_and_everything_lands_once_after_it(
    mlflow_server_default_http, executor
):
    server = mlflow_server_default_http
    store = MlflowClient(server.uri)
    experiment_id = _new_experiment(server.uri)
    with QueueingClient(server.uri, executor=executor, retry_timeout=30) as client:
        run = client.create_run(experiment_id, run_name="outage")
        client.log_params(run, {"lr": "0.1"})
        for step in range(20):
            client.log_metrics(run, {"m": float(step)}, step=step)
        server.stop()
        operations = client.flush(synchronous=False)
        # The clock starts once a worker has the run: a process executor's first worker
        # comes from a fresh template that imports MLflow, more than MARGIN on a loaded
        # machine (seen at a load average of 8), and its start is not what is shown here.
        deadline = time.monotonic() + 60
        while (now := client.status().runs[0]).worker is None and now.state != "retrying":
            assert time.monotonic() < deadline, "no worker took the run"
            time.sleep(0.05)
        started = time.monotonic()
        while True:
            status = client.status().runs[0]
            if status.state == "retrying" and status.retries >= 1 and status.last_retry_error:
                break
            assert time.monotonic() - started < MARGIN, f"no retrying status: {status}"
            time.sleep(0.05)
        seen = time.monotonic() - started
        print(f"retrying shown after {seen:.2f} s: {status.to_dict()}")
        assert status.to_dict()["retries"] >= 1
        assert "last_retry_error" in status.to_dict()
        server.start()
        operations.await_completion()
        final = client.status().runs[0]
        assert final.errors == [] and final.retries >= status.retries
    runs = store.search_runs([experiment_id])
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    assert runs[0].data.params == {"lr": "0.1"}
    assert sorted(m.step for m in store.get_metric_history(run_id, "m")) == list(range(20))


def test_retry_timeout_bounds_the_round_not_each_of_its_calls(mlflow_server_default_http, executor):
    """A run whose round holds many batches: once one call has failed past retry_timeout,
    the others are reported unsent instead of each waiting out the same outage again (20
    batches used to take 20 x retry_timeout)."""
    server = mlflow_server_default_http
    run_id = MlflowClient(server.uri).create_run(_new_experiment(server.uri)).info.run_id
    client = QueueingClient(server.uri, executor=executor, retry_timeout=1)
    try:
        for step in range(20 * 1000):  # 20 log_batch calls of 1,000 metrics
            client.log_metrics(run_id, {"m": float(step)}, step=step)
        client.set_terminated(run_id)
        server.stop()
        started = time.monotonic()
        with pytest.raises(MlflowException, match=run_id) as raised:
            client.flush()
        took = time.monotonic() - started
        assert took < 1 + MARGIN, f"the flush took {took:.1f} s"
        message = str(raised.value)
        assert "LogBatch not sent: the store was unavailable past retry_timeout" in message
        assert "SetTerminated not sent" in message
    finally:
        client.close(timeout=10)
        server.start()
