"""No duplicate runs, no duplicate points: a request whose answer is lost is never repeated
blindly.

A loopback proxy in front of a real ``mlflow server`` forwards a request, lets the server
handle it, and closes the connection instead of answering: the request landed, the client
cannot know. MLflow's HTTP settings are its defaults (7 retries), as a user has them.
"""

from __future__ import annotations

import uuid

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from actors.delivery._create_key import CREATE_KEY_TAG
from actors.delivery._dispatch import invoke as _invoke
from actors.queueing._plan import LogBatchCall
from client import QueueingClient

STEPS = 30


def _log_run(client: QueueingClient, experiment_id: str) -> None:
    run = client.create_run(experiment_id, run_name="once", tags={"team": "vision"})
    client.log_params(run, {"lr": "0.1"})
    for step in range(STEPS):
        client.log_metrics(run, {"loss": 1.0 / (step + 1)}, step=step)
    client.set_terminated(run)


def test_a_lost_create_run_response_makes_exactly_one_run(
    mlflow_server_default_http, dropping_proxy, executor
):
    """The server creates the run, the answer is lost: the retry finds the run by its create
    key instead of creating a second one, and everything lands on it once."""
    server = mlflow_server_default_http
    store = MlflowClient(server.uri)
    experiment_id = store.create_experiment(f"lost-create-{uuid.uuid4().hex}")
    proxy = dropping_proxy(server.uri, "/runs/create", drops=1)
    with QueueingClient(proxy.uri, executor=executor, retry_timeout=60) as client:
        _log_run(client, experiment_id)
        client.flush()
    runs = store.search_runs([experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    assert proxy.hits == 1  # the retry looked the run up; it did not send the creation again
    run = runs[0]
    assert run.info.run_name == "once"
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.1"}
    assert run.data.tags["team"] == "vision"
    assert run.data.tags[CREATE_KEY_TAG]  # a tracking server's runs carry the key
    history = store.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(STEPS))


def test_a_lost_log_batch_response_stores_each_point_once(
    mlflow_server_default_http, dropping_proxy, executor
):
    """A batch lands, its answer is lost, runactors sends it again: no point is stored twice."""
    server = mlflow_server_default_http
    store = MlflowClient(server.uri)
    experiment_id = store.create_experiment(f"lost-batch-{uuid.uuid4().hex}")
    run_id = store.create_run(experiment_id).info.run_id
    proxy = dropping_proxy(server.uri, "/runs/log-batch", drops=1)
    with QueueingClient(proxy.uri, executor=executor, retry_timeout=60) as client:
        client.log_params(run_id, {"lr": "0.1"})
        for step in range(STEPS):
            client.log_metrics(run_id, {"loss": float(step)}, step=step)
        client.flush()
    assert proxy.hits >= 2  # the batch really was sent again
    history = store.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(STEPS))
    assert store.get_run(run_id).data.params == {"lr": "0.1"}


def test_a_batch_sent_twice_to_sqlite_stores_each_point_once(store, experiment_id):
    """What a retry of a batch that landed does in a local database (where a commit whose
    answer is lost cannot be staged from outside): the same ``log_batch`` twice stores each
    point, param and tag once."""
    run_id = store.create_run(experiment_id).info.run_id
    call = LogBatchCall(
        [("loss", float(step), 1_000 + step, step, None, None, None) for step in range(STEPS)],
        [("lr", "0.1")],
        [("team", "vision")],
    )
    _invoke(store, run_id, call, None)
    _invoke(store, run_id, call, None)
    history: list[Metric] = store.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(STEPS))
    data = store.get_run(run_id).data
    assert data.params == {"lr": "0.1"}
    assert data.tags["team"] == "vision"


def test_runs_in_a_local_database_carry_no_create_key(store, tracking_uri, experiment_id):
    with QueueingClient(tracking_uri) as client:
        run = client.create_run(experiment_id, tags={"team": "vision"})
        client.flush()
        run_id = run.resolve()
    assert CREATE_KEY_TAG not in store.get_run(run_id).data.tags
