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


def _said(raised: Any) -> str:
    """A flush's message: its failed operations are a list's repr, which escapes quotes."""
    return str(raised.value.message).replace("\\'", "'")


def _creation_refused(uri: str, experiment_id: str) -> str:
    """What the store itself says to a creation in the (deleted) experiment."""
    with pytest.raises(MlflowException) as raised:
        MlflowClient(uri).create_run(experiment_id)
    return raised.value.message


def test_a_held_creation_then_refused_for_good_is_named_alike_by_resend_and_replay(
    mlflow_server: Any, flaky_proxy: Any, executor: str, tmp_path: Path, capsys: Any
) -> None:
    """A creation the store refuses transiently is held in the spool, and says so (not that
    it failed); refused for good at its re-send (its experiment deleted meanwhile), it reads
    as a live round's failed creation does: ``create_run failed: creating run 'NAME' in
    experiment ID failed: <the store's error>``, in the flush's error, the PendingRunId's and
    ``runactors replay``'s, which adds that the run stays in the journal."""
    uri = mlflow_server.uri
    proxy = flaky_proxy(uri, "/runs/create", DOWN)
    spooled = f"calls spooled to {tmp_path}"
    # Re-sent by the live client's spooler.
    experiment_id = _experiment(uri, f"gone-{executor}")
    client = QueueingClient(
        proxy.uri, executor=executor, retry_timeout=0.3, spool_dir=tmp_path / "live"
    )
    try:
        run = client.create_run(experiment_id, run_name="trial")
        client.log_params(run, {"lr": "0.1"})
        with pytest.raises(MlflowException) as held:
            client.flush()
        named = f"creating run 'trial' in experiment {experiment_id} failed: "
        assert f"create_run not delivered yet: {named}" in _said(held), _said(held)
        assert spooled in _said(held) and "create_run failed" not in _said(held)
        with pytest.raises(MlflowException) as again:  # re-sent, refused transiently again
            client.flush()
        assert "they stay spooled" in _said(again), _said(again)
        assert f"create_run not delivered yet: {named}" in _said(again)
        MlflowClient(uri).delete_experiment(experiment_id)
        reason = _creation_refused(uri, experiment_id)
        proxy.actions.clear()
        with pytest.raises(MlflowException) as refused:
            client.flush()
        failed = f"create_run failed: {named}"
        assert failed in _said(refused) and reason in _said(refused)
        assert "1 spooled call of run pending-" in _said(refused), _said(refused)
        assert client.status().runs[0].state == "failed"  # nothing of it can ever be sent
        with pytest.raises(MlflowException) as resolved:
            run.resolve(timeout=5)
        assert f"Run {run} was not created: {failed}" in _said(resolved)
        assert reason in _said(resolved), _said(resolved)
    finally:
        client.close()
    # Left at close, then refused for good by runactors replay: the same words.
    experiment_id = _experiment(uri, f"gone-replayed-{executor}")
    proxy.actions[:] = DOWN
    client = QueueingClient(
        proxy.uri, executor=executor, retry_timeout=0.3, spool_dir=tmp_path / "left"
    )
    try:
        run = client.create_run(experiment_id, run_name="trial")
        client.log_params(run, {"lr": "0.1"})
    finally:
        client.close()  # spooled: nothing raised
    MlflowClient(uri).delete_experiment(experiment_id)
    reason = _creation_refused(uri, experiment_id)
    proxy.actions.clear()
    capsys.readouterr()
    (report,) = replay_folder(tmp_path / "left", uri, 1.0)
    assert report.status == "left" and report.calls_left == 2
    said = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    named = f"creating run 'trial' in experiment {experiment_id} failed: "
    assert f"run {run}: create_run failed: {named}" in said, said
    assert reason in said and "its creation and 1 more call stay in the journal" in said, said
