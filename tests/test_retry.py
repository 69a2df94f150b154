"""Transient failures are retried with backoff (keeping order); permanent ones are not."""

from __future__ import annotations

import sqlite3
from unittest import mock

import pytest
import sqlalchemy.exc
from conftest import run_data
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from actors import call_with_retry, is_transient
from client import QueueingClient

ORIGINAL_LOG_BATCH = MlflowClient.log_batch


def locked() -> Exception:
    return sqlalchemy.exc.OperationalError(
        "INSERT", {}, sqlite3.OperationalError("database is locked")
    )


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (locked(), True),
        (MlflowException("(sqlite3.OperationalError) database is locked"), True),
        (ConnectionRefusedError(111, "Connection refused"), True),
        (TimeoutError("read timed out"), True),
        (MlflowException("Run with id=abc not found"), False),
        (ValueError("bad value"), False),
    ],
)
def test_is_transient(exc, transient):
    assert is_transient(exc) is transient


def test_call_with_retry_backs_off_until_success_or_deadline():
    attempts, delays = [], []

    def flaky():
        attempts.append(1)
        if len(attempts) < 4:
            raise locked()
        return "ok"

    assert call_with_retry(flaky, 10, sleep=delays.append) == "ok"
    assert len(attempts) == 4 and len(delays) == 3
    with pytest.raises(ValueError):
        call_with_retry(
            lambda: (_ for _ in ()).throw(ValueError("permanent")), 10, sleep=delays.append
        )
    with pytest.raises(sqlalchemy.exc.OperationalError):
        call_with_retry(lambda: (_ for _ in ()).throw(locked()), 0, sleep=delays.append)


def test_database_is_locked_is_retried_and_lands_once(tracking_uri, store, experiment_id):
    failures = iter([locked(), locked()])
    states = []

    def locked_twice(self, *args, **kwargs):
        error = next(failures, None)
        if error is not None:
            raise error
        return ORIGINAL_LOG_BATCH(self, *args, **kwargs)

    client = QueueingClient(tracking_uri, retry_timeout=30)
    run_id = store.create_run(experiment_id).info.run_id
    for step in range(3):
        client.log_metrics(run_id, {"m": float(step)}, step=step)
    with mock.patch.object(MlflowClient, "log_batch", locked_twice):
        operations = client.flush(synchronous=False)
        while not operations.done():
            states.append(client.status().runs[0].state)
        operations.await_completion()
    assert "retrying" in states or "flushing" in states
    assert sorted(m.step for m in store.get_metric_history(run_id, "m")) == [0, 1, 2]
    assert client.status().runs[0].errors == []
    client.close()


def test_permanent_errors_are_not_retried(tracking_uri, store, experiment_id):
    calls = []

    def rejects(self, *args, **kwargs):
        calls.append(1)
        raise MlflowException("INVALID_PARAMETER_VALUE: nope")

    client = QueueingClient(tracking_uri, retry_timeout=30)
    run_id = store.create_run(experiment_id).info.run_id
    client.log_params(run_id, {"a": 1})
    with mock.patch.object(MlflowClient, "log_batch", rejects), pytest.raises(MlflowException):
        client.flush()
    assert len(calls) == 1
    assert run_data(store, run_id)[0] == {}
    client.close()
