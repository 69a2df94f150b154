"""runactors' ``log_batch`` on a tracking server builds its JSON body directly, not through
protobuf and ``message_to_json`` (most of the client's time per batch): the body must be
the very dict MLflow's own ``RestStore.log_batch`` sends, and the server must store the same."""

from __future__ import annotations

import json
import math

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.protos.service_pb2 import LogBatch
from mlflow.tracking import MlflowClient
from mlflow.utils.proto_json_utils import message_to_json

from actors.delivery._store import log_batch_body
from client import QueueingClient

RUN_ID = "a" * 32

METRICS = [
    Metric("loss", 0.25, 1_700_000_000_123, 0),
    Metric("int-valued", 3, 1, 2**40),  # an int value: a double on the wire
    Metric("negative-step", -1.5e-300, 0, -7),
    Metric("nan", math.nan, 5, 1),
    Metric("inf", math.inf, 5, 1),
    Metric("-inf", -math.inf, 5, 1),
    Metric("big", 1.7976931348623157e308, 2**62, 3),
    Metric("ds", 1.0, 9, 4, model_id="m-1", dataset_name="train", dataset_digest="abc"),
    Metric("ünïcode/ключ", 0.1 + 0.2, 9, 5),
]
PARAMS = [Param("lr", "0.01"), Param("empty", ""), Param("quote", 'a "b" \\ c')]
TAGS = [RunTag("team", "ml"), RunTag("blank", "")]


def mlflow_body(metrics, params, tags) -> dict:
    message = LogBatch(
        metrics=[m.to_proto() for m in metrics],
        params=[p.to_proto() for p in params],
        tags=[t.to_proto() for t in tags],
        run_id=RUN_ID,
    )
    return json.loads(message_to_json(message))


@pytest.mark.parametrize(
    ("metrics", "params", "tags"),
    [
        (METRICS, PARAMS, TAGS),
        (METRICS, [], []),
        ([], PARAMS, []),
        ([], [], TAGS),
        ([], [], []),
    ],
)
def test_body_is_the_dict_mlflow_sends(metrics, params, tags):
    assert log_batch_body(RUN_ID, metrics, params, tags) == mlflow_body(metrics, params, tags)


@pytest.mark.slow
def test_server_stores_what_mlflow_own_client_stores(mlflow_server):
    """The same batch through runactors and through MLflow's own client: the same run data."""
    uri = mlflow_server.uri
    store = MlflowClient(uri)
    experiment_id = store.create_experiment("rest-body")
    metrics = {m.key: m.value for m in METRICS}
    theirs = store.create_run(experiment_id).info.run_id
    store.log_batch(
        theirs,
        metrics=[Metric(k, v, 7, 3) for k, v in metrics.items()],
        params=PARAMS,
        tags=TAGS,
    )
    with QueueingClient(uri) as client:
        ours = client.create_run(experiment_id)
        client.log_metrics(ours, metrics, step=3)
        client.log_params(ours, {p.key: p.value for p in PARAMS})
        client.set_tags(ours, {t.key: t.value for t in TAGS})
    ours_id = ours.resolve()
    ours_data, theirs_data = store.get_run(ours_id).data, store.get_run(theirs).data

    def same(a: float, b: float) -> bool:
        return a == b or (math.isnan(a) and math.isnan(b))

    assert ours_data.metrics.keys() == theirs_data.metrics.keys()
    assert all(same(ours_data.metrics[k], theirs_data.metrics[k]) for k in metrics)
    assert ours_data.params == theirs_data.params
    for key in ("team", "blank"):
        assert ours_data.tags[key] == theirs_data.tags[key]
    for key in metrics:
        (ours_point,) = store.get_metric_history(ours_id, key)
        (their_point,) = store.get_metric_history(theirs, key)
        assert ours_point.step == their_point.step == 3
        assert same(ours_point.value, their_point.value)
