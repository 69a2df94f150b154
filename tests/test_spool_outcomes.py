"""What a run's status and messages say once the spooler has re-sent its calls: a run
terminated through a re-send reads ``stopped``, and a creation held in the spool, then
refused for good at its re-send or by ``runactors replay``, is named the same way the live
path names it (the run, its experiment, the store's reason) and says what became of it.

The store down is a real HTTP 503 on the wire (a proxy in front of the session's real
``mlflow server``), on one endpoint only, for as long as the test says: no server restart.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from client import QueueingClient
from client._replay import replay_folder

DOWN = [503] * 100_000  # every request to the endpoint fails until the test clears it


def _experiment(uri: str, name: str) -> str:
    return MlflowClient(uri).create_experiment(f"{name}-{time.monotonic_ns()}")


def test_a_run_terminated_by_a_spool_resend_reads_stopped(
    mlflow_server: Any, flaky_proxy: Any, executor: str, tmp_path: Path
) -> None:
    """set_terminated spooled while the store refuses it, delivered by the next flush's
    re-send: status() says ``stopped``, as for a termination delivered by a live round."""
    experiment_id = _experiment(mlflow_server.uri, f"ended-{executor}")
    proxy = flaky_proxy(mlflow_server.uri, "/runs/update", [])
    client = QueueingClient(
        proxy.uri, executor=executor, retry_timeout=0.3, spool_dir=tmp_path / "spool"
    )
    try:
        run = client.create_run(experiment_id, run_name="ended")
        client.log_metrics(run, {"loss": 1.0}, step=0)
        client.flush()
        proxy.actions[:] = DOWN
        client.set_terminated(run, "FINISHED")
        with pytest.raises(MlflowException, match="spooled to"):
            client.flush()
        assert client.status().runs[0].state == "spooled"
        proxy.actions.clear()
        client.flush()  # re-sent from the spool
        status = client.status().runs[0]
        assert status.spooled == dict.fromkeys(status.spooled, 0), status
        assert status.state == "stopped", status
    finally:
        client.close()
    stored = MlflowClient(mlflow_server.uri).get_run(run.resolve())
    assert stored.info.status == "FINISHED"
