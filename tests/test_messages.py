"""Messages say what happened: a failed creation names the creation, truncation warnings
quote a bounded part of the value, a tracking URI without a scheme that looks like a server
address is warned about."""

from __future__ import annotations

import time

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from client import QueueingClient


def test_a_creation_failing_on_a_server_names_the_creation_not_the_look_up(
    mlflow_server, flaky_proxy, executor
):
    # Every request answered by a gateway's 502 ("" ends every path): the creation fails, and
    # each later attempt first looks up the run (runs/search), which fails as well.
    proxy = flaky_proxy(mlflow_server.uri, "", [502] * 1000)
    experiment_id = MlflowClient(mlflow_server.uri).create_experiment(
        f"create-fails-{time.monotonic_ns()}"
    )
    client = QueueingClient(proxy.uri, executor=executor, retry_timeout=0.5)
    try:
        run = client.create_run(experiment_id, run_name="trial-7")
        client.log_metrics(run, {"m": 1.0})
        with pytest.raises(MlflowException, match="create_run failed: creating run") as raised:
            client.flush()
        errors = client.status().runs[0].errors
    finally:
        _close(client)
    assert "trial-7" in str(raised.value)
    message = errors[0]
    said = f"create_run failed: creating run 'trial-7' in experiment {experiment_id} failed: "
    assert said in message, message
    # The creation's own error comes first; the look-up's, if any, is said to be one.
    cause = message.split(said, 1)[1]
    assert cause.index("runs/create failed with error code 502") < cause.find("runs/search") or (
        "runs/search" not in cause
    ), message
    if "runs/search" in cause:
        assert "looking up whether an earlier attempt made the run also failed" in cause, message
    assert proxy.hits >= 2


def _close(client: QueueingClient) -> None:
    try:
        client.close()
    except MlflowException:
        pass
