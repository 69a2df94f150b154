"""A run's ``errors`` in ``status()`` stay bounded: repeats collapse across flushes, and the
list is capped (the first and the latest kept, the others counted), on both executors."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException

from actors.status._record import ERRORS_FIRST, ERRORS_LATEST, ErrorLog
from client import QueueingClient


@pytest.fixture
def client(tracking_uri, executor):
    client = QueueingClient(tracking_uri, executor=executor, retry_timeout=0)
    yield client
    try:
        client.close()
    except MlflowException:
        pass  # the tests' failing runs fail the last flush too


def test_the_same_failure_in_five_flushes_is_one_entry(client):
    unknown = "0" * 32
    for step in range(5):
        client.log_metrics(unknown, {"a": 1.0}, step=step)
        with pytest.raises(MlflowException, match=unknown):
            client.flush()
    (run,) = client.status().runs
    assert len(run.errors) == 1, run.errors
    assert run.errors[0].endswith("(x5)") and unknown in run.errors[0]
    assert run.errors_dropped == 0


def test_many_distinct_failures_keep_the_first_and_the_latest(client, store, experiment_id):
    # A param's value cannot change in MLflow: each flush fails with its own message, which
    # names the value it tried. The values are first logged by another client, so that this
    # one (which refuses a change of what it logged itself at the call) sends every change.
    run_id = store.create_run(experiment_id).info.run_id
    failures = ERRORS_FIRST + ERRORS_LATEST + 7
    for i in range(1, failures + 1):
        store.log_param(run_id, f"p{i}", "v0")
    for i in range(1, failures + 1):
        client.log_params(run_id, {f"p{i}": f"v{i}"})
        with pytest.raises(MlflowException):
            client.flush()
    (run,) = client.status().runs
    assert len(run.errors) == ERRORS_FIRST + 1 + ERRORS_LATEST
    assert run.errors_dropped == 7
    first, marker, latest = (
        run.errors[:ERRORS_FIRST],
        run.errors[ERRORS_FIRST],
        run.errors[ERRORS_FIRST + 1 :],
    )
    tried = [f"'v{i}'" for i in range(1, failures + 1)]
    assert all(value in error for value, error in zip(tried[:ERRORS_FIRST], first, strict=True))
    assert all(value in error for value, error in zip(tried[-ERRORS_LATEST:], latest, strict=True))
    assert "7 more errors" in marker
    assert run.to_dict()["errors_dropped"] == 7


def test_error_log_collapses_repeats_anywhere_and_counts_what_it_drops():
    log = ErrorLog()
    log.add(["a", "b (x2)"])  # one flush's list, already collapsed within the flush
    log.add(["a", "b"])
    assert log.messages() == ["a (x2)", "b (x3)"]
    log.add(f"e{i}" for i in range(ERRORS_FIRST + ERRORS_LATEST))
    log.add(["b"])  # a kept message recurring
    messages = log.messages()
    assert messages[:2] == ["a (x2)", "b (x4)"]
    assert len(messages) == ERRORS_FIRST + 1 + ERRORS_LATEST
    dropped = ERRORS_FIRST + ERRORS_LATEST - (ERRORS_FIRST - 2) - ERRORS_LATEST
    assert log.dropped == dropped and f"{dropped} more errors" in messages[ERRORS_FIRST]
    assert messages[-1] == f"e{ERRORS_FIRST + ERRORS_LATEST - 1}"
    log.add(["x" * 10_000])
    assert len(log.messages()[-1]) < 5_000  # an echoed request is cut
