"""A run whose creation the store refused for good reads ``failed``: in ``status()``, the
status endpoint's ``runactors_runs`` gauge and ``runactors status``; not ``idle``, which
says its operations wait for a flush, when nothing of the run can ever be delivered.

A real SQLite store refuses a ``create_run`` into a deleted experiment (a permanent error,
not retried), on both executors, sent by a live round and (``spool_dir``) by the spooler's
write-ahead journal. The spool's re-send of a held creation refused later is covered in
``tests/test_spool_outcomes.py``.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prometheus_client.parser import text_string_to_metric_families

from client import QueueingClient
from client._cli import main


def _runs_gauge(url: str) -> dict[str, float]:
    """``runactors_runs`` by its ``state`` label, parsed by Prometheus' own parser."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    return {
        sample.labels["state"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "runactors_runs"
        for sample in family.samples
    }


@pytest.fixture
def refused(tmp_path: Path, store: MlflowClient, experiment_id: str) -> Iterator[dict[str, Any]]:
    """What the test's clients need; each is closed at teardown, whatever it raises."""
    made: list[QueueingClient] = []
    store.delete_experiment(experiment_id)
    yield {"made": made, "spool_dir": tmp_path / "spool"}
    for client in made:
        try:
            client.close(timeout=30)
        except MlflowException:
            pass


@pytest.mark.parametrize("journaled", [False, True], ids=["live", "journal"])
def test_a_run_whose_creation_was_refused_for_good_reads_failed(
    tracking_uri: str,
    experiment_id: str,
    store: MlflowClient,
    executor: str,
    journaled: bool,
    refused: dict[str, Any],
) -> None:
    """``failed`` after the flush that raised the refusal, after later calls (still dropped
    with an error at their flush, as before) and after close; the gauge counts it."""
    spool = {"spool_dir": refused["spool_dir"]} if journaled else {}
    client = QueueingClient(tracking_uri, executor=executor, retry_timeout=0.3, **spool)
    refused["made"].append(client)
    run = client.create_run(experiment_id, run_name="refused")
    client.log_params(run, {"lr": "0.1"})
    with pytest.raises(MlflowException, match="create_run failed"):
        client.flush()
    [status] = client.status().runs
    assert status.state == "failed", status
    assert status.run_id is None and status.queued == dict.fromkeys(status.queued, 0), status
    assert any("create_run failed" in error for error in status.errors), status.errors

    server = client.serve_status()
    try:
        gauge = _runs_gauge(server.url)
        assert gauge["failed"] == 1 and gauge["idle"] == 0, gauge
        shown = CliRunner().invoke(main, ["status", server.url], env={"COLUMNS": "200"})
        assert shown.exit_code == 0, shown.output
        rows = [line for line in shown.output.splitlines() if str(run) in line]
        assert rows and "failed" in rows[0], shown.output
    finally:
        server.close()

    client.log_metrics(run, {"loss": 1.0}, step=0)  # accepted, then dropped at its flush
    with pytest.raises(MlflowException, match="creation failed"):
        client.flush()
    assert client.status().runs[0].state == "failed"
    try:
        client.close()
    except MlflowException:
        pass
    assert client.status().runs[0].state == "failed"
    assert store.search_runs([experiment_id], run_view_type=ViewType.ALL) == []
