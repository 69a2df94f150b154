"""Bad input raises MlflowException at the call, names the key, and queues nothing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH
from stores import run_data

from actors import metric_rows
from client import QueueingClient


@pytest.fixture
def client(tracking_uri):
    client = QueueingClient(tracking_uri)
    yield client
    client.close()


@pytest.fixture
def run_id(store, experiment_id):
    return store.create_run(experiment_id).info.run_id


@pytest.mark.parametrize(
    ("metrics", "named"),
    [
        ({"loss": "0.1"}, "loss"),
        ({"loss": None}, "loss"),
        ({"flag": True}, "flag"),
        ({"z": complex(1, 2)}, "z"),
        ({"bad!key": 1.0}, "bad!key"),
        ({"../up": 1.0}, "../up"),
        ({1: 1.0}, "1"),
    ],
)
def test_bad_metric_raises_naming_it_and_queues_nothing(client, store, run_id, metrics, named):
    client.log_metrics(run_id, {"ok": 1.0}, step=0)
    with pytest.raises(MlflowException, match="Invalid") as exc:
        client.log_metrics(run_id, {"good": 2.0, **metrics}, step=1)
    assert named in str(exc.value)
    assert exc.value.error_code == "INVALID_PARAMETER_VALUE"
    assert client.status().runs[0].queued["metrics"] == 1  # the earlier call only
    client.flush()
    assert run_data(store, run_id)[1] == {"ok": 1.0}


def test_nan_and_infinities_and_numpy_numbers_are_valid(client, store, run_id):
    client.log_metrics(
        run_id,
        {
            "nan": math.nan,
            "inf": math.inf,
            "ninf": -math.inf,
            "f32": np.float32(0.5),
            "i64": np.int64(3),
        },
    )
    client.flush()
    metrics = run_data(store, run_id)[1]
    assert math.isnan(metrics["nan"])
    # MLflow's SQL store keeps infinities as the largest finite doubles.
    assert metrics["inf"] >= 1.7e308 and metrics["ninf"] <= -1.7e308
    assert metrics["f32"] == 0.5 and metrics["i64"] == 3


@pytest.mark.parametrize("method", ["log_params", "set_tags"])
def test_bad_param_or_tag_key_raises_and_queues_nothing(client, store, run_id, method):
    getattr(client, method)(run_id, {"fine": "1"})
    with pytest.raises(MlflowException, match="bad:key\\?"):
        getattr(client, method)(run_id, {"other": "2", "bad:key?": "3"})
    client.flush()
    params, _, tags = run_data(store, run_id)
    assert (params if method == "log_params" else tags) == {"fine": "1"}


def test_bad_step_status_run_id_and_datasets_raise(client, run_id):
    with pytest.raises(MlflowException, match="step"):
        client.log_metrics(run_id, {"a": 1.0}, step="3")
    with pytest.raises(MlflowException, match="status"):
        client.set_terminated(run_id, status="DONE")
    with pytest.raises(MlflowException, match="run_id"):
        client.log_metrics(["not", "an", "id"], {"a": 1.0})
    with pytest.raises(MlflowException, match="run_id"):
        client.log_params(None, {"a": 1})
    with pytest.raises(MlflowException, match="DatasetInput"):
        client.log_inputs(run_id, ["not a dataset"])
    with pytest.raises(MlflowException, match="dict"):
        client.log_params(run_id, [("a", 1)])
    assert all(not any(r.queued.values()) for r in client.status().runs)


def test_long_keys_are_truncated_and_collisions_keep_the_last_value():
    long_a = "k" * (MAX_ENTITY_KEY_LENGTH + 1)
    long_b = "k" * (MAX_ENTITY_KEY_LENGTH + 2)
    rows = metric_rows({long_a: 1.0, long_b: 2.0}, 0, 0, None, None, None)
    assert len(rows) == 1
    assert rows[0][0] == "k" * (MAX_ENTITY_KEY_LENGTH - 3) + "..."
    assert rows[0][1] == 2.0


def test_validated_keys_are_cached_but_values_are_always_checked(client, run_id):
    client.log_metrics(run_id, {"cached": 1.0})
    with pytest.raises(MlflowException, match="cached"):
        client.log_metrics(run_id, {"cached": "not a number"})
