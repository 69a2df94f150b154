"""Transient failures are retried with backoff (keeping order); permanent ones are not.

The classification is checked on exceptions of each transient class, both as MLflow words
them and as real failures on the wire (a server that resets, refuses, never answers, or
answers 408/429/5xx); the retries themselves on a real tracking server behind a proxy that
answers error statuses first, on both executors.
"""

from __future__ import annotations

import random
import sqlite3
import time

import pytest
import sqlalchemy.exc
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.tracking import MlflowClient
from servers import LoopbackServer, free_port

from actors.delivery import _retry
from actors.delivery._retry import call_with_retry, is_transient
from client import QueueingClient

LOG_BATCH = "/api/2.0/mlflow/runs/log-batch"


def locked() -> Exception:
    return sqlalchemy.exc.OperationalError(
        "INSERT", {}, sqlite3.OperationalError("database is locked")
    )


def datasets_race() -> Exception:
    # What MLflow's SQL store raises when two runs log the same new dataset at once.
    return MlflowException(
        str(
            sqlalchemy.exc.IntegrityError(
                "INSERT INTO datasets",
                {},
                sqlite3.IntegrityError(
                    "UNIQUE constraint failed: datasets.experiment_id, datasets.name, "
                    "datasets.digest"
                ),
            )
        ),
        INTERNAL_ERROR,
    )


def chained(outer: Exception, inner: BaseException) -> Exception:
    """``outer`` raised while handling ``inner``, as MLflow's REST client raises."""
    try:
        try:
            raise inner
        except BaseException:
            raise outer  # noqa: B904 - the implicit context is the point
    except Exception as exc:
        return exc


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        # SQLite's lock, raw and as MLflow's store wraps it
        (locked(), True),
        (MlflowException("(sqlite3.OperationalError) database is locked"), True),
        # the datasets race
        (datasets_race(), True),
        # connection refused / reset / aborted, timeouts: by type, and as text only
        (ConnectionRefusedError(111, "Connection refused"), True),
        (ConnectionResetError(104, "Connection reset by peer"), True),
        (MlflowException("API request failed: ('Connection aborted.', ...)"), True),
        (TimeoutError("read timed out"), True),
        (chained(MlflowException("API request failed"), ConnectionResetError(104, "x")), True),
        # a server's 429/5xx answer, as MLflow's REST client raises it
        (RestException({"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "slow"}), True),
        (RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "down"}), True),
        (RestException({"error_code": "DEADLINE_EXCEEDED", "message": "late"}), True),
        (RestException({"error_code": "INTERNAL_ERROR", "message": "server fault"}), True),
        (MlflowException("API request to endpoint x failed with error code 408 != 200"), True),
        (MlflowException("API request to endpoint x failed with error code 502 != 200"), True),
        # MLflow's own HTTP retries gave up
        (MlflowException("Max retries exceeded with url: /api/2.0/mlflow/runs/create"), True),
        (MlflowException("(Caused by ResponseError('too many 503 error responses'))"), True),
        # permanent: bad input, missing runs, a local error mapped to 500
        (MlflowException("Run with id=abc not found"), False),
        (RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad"}), False),
        (RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "gone"}), False),
        (MlflowException("API request to endpoint x failed with error code 404 != 200"), False),
        (MlflowException("local fault", INTERNAL_ERROR), False),
        (MlflowException("bad value", INVALID_PARAMETER_VALUE), False),
        (ValueError("bad value"), False),
    ],
    ids=repr,
)
def test_is_transient(exc, transient):
    assert is_transient(exc) is transient


def test_a_local_internal_error_is_permanent_although_it_maps_to_500():
    # A local MlflowException maps every unknown error to INTERNAL_ERROR, i.e. HTTP 500:
    # that says nothing about retrying, unlike a 500 that a server answered.
    local = MlflowException("something broke in this process", INTERNAL_ERROR)
    assert local.get_http_status_code() == 500
    assert not is_transient(local)
    calls = []

    def fails() -> None:
        calls.append(1)
        raise local

    with pytest.raises(MlflowException, match="something broke"):
        call_with_retry(fails, 30, sleep=lambda _: None)
    assert len(calls) == 1


def _real_http_failure(uri: str) -> Exception:
    try:
        MlflowClient(uri).create_run("0")
    except Exception as exc:
        return exc
    raise AssertionError(f"{uri} answered")


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["refused", "reset", "no answer"])
def test_real_connection_failures_are_transient(fault, fail_fast_http):
    """MLflow's REST client against a closed port, a reset and a server that never answers."""
    if fault == "refused":
        exc = _real_http_failure(f"http://127.0.0.1:{free_port()}")
    else:
        server = LoopbackServer(reset=fault == "reset")
        try:
            exc = _real_http_failure(server.uri)
        finally:
            server.close()
    assert is_transient(exc), repr(exc)


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_real_http_error_statuses_from_a_server_are_transient(status, flaky_proxy, fail_fast_http):
    proxy = flaky_proxy(f"http://127.0.0.1:{free_port()}", "/runs/create", [status])
    exc = _real_http_failure(proxy.uri)
    assert str(status) in str(exc)
    assert is_transient(exc), repr(exc)


def test_backoff_doubles_to_the_cap_with_full_jitter(monkeypatch):
    failures = 12
    attempts, slept, heard = [], [], []

    def flaky():
        attempts.append(1)
        if len(attempts) <= failures:
            raise locked()
        return "ok"

    seed = 20240601
    random.seed(seed)
    result = call_with_retry(
        flaky, 3600, on_retry=lambda exc, delay: heard.append(delay), sleep=slept.append
    )
    assert result == "ok" and len(attempts) == failures + 1
    assert slept == heard  # the hook hears each delay before it is slept

    caps = [min(_retry.BACKOFF_START * 2**i, _retry.BACKOFF_MAX) for i in range(failures)]
    assert caps[:6] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6]
    assert caps[6:] == [_retry.BACKOFF_MAX] * (failures - 6)
    for delay, cap in zip(slept, caps, strict=True):
        assert 0 <= delay <= cap
    # Full jitter: each delay uniform in [0, cap], drawn from ``random``.
    rng = random.Random(seed)
    assert slept == pytest.approx([rng.uniform(0, cap) for cap in caps])
    ratios = [delay / cap for delay, cap in zip(slept, caps, strict=True)]
    assert len({round(r, 6) for r in ratios}) == failures  # jitter varies every delay

    # Another seed, other delays: jitter spreads clients that fail together.
    random.seed(seed + 1)
    attempts.clear()
    other: list[float] = []
    call_with_retry(flaky, 3600, sleep=other.append)
    assert other != slept


def test_no_delay_passes_the_deadline_and_the_last_error_is_raised():
    slept: list[float] = []

    def always_locked():
        raise locked()

    start = time.monotonic()
    with pytest.raises(sqlalchemy.exc.OperationalError, match="database is locked"):
        call_with_retry(always_locked, 0.5, sleep=lambda d: (slept.append(d), time.sleep(d)))
    assert time.monotonic() - start < 0.5 + _retry.BACKOFF_MAX
    assert slept and sum(slept) <= 0.5 + 1e-6
    with pytest.raises(sqlalchemy.exc.OperationalError):
        call_with_retry(always_locked, 0, sleep=slept.append)


def test_permanent_errors_are_raised_at_once():
    calls = []

    def permanent():
        calls.append(1)
        raise ValueError("permanent")

    with pytest.raises(ValueError):
        call_with_retry(permanent, 30, sleep=lambda _: None)
    assert len(calls) == 1


# -- on a real tracking server, on both executors ----------------------------------------


def _experiment(uri: str, name: str) -> str:
    return MlflowClient(uri).create_experiment(f"{name}-{time.monotonic_ns()}")


def test_http_error_statuses_are_retried_retrying_is_seen_and_data_lands_once(
    mlflow_server, flaky_proxy, executor
):
    # Every transient status, twice over, on the run's metric batch; then the real server.
    statuses = [408, 429, 500, 502, 503, 504] * 2
    proxy = flaky_proxy(mlflow_server.uri, LOG_BATCH, statuses)
    server = MlflowClient(mlflow_server.uri)
    experiment_id = _experiment(mlflow_server.uri, "statuses")
    run_id = server.create_run(experiment_id).info.run_id
    client = QueueingClient(proxy.uri, executor=executor, retry_timeout=120)
    try:
        for step in range(5):
            client.log_metrics(run_id, {"m": float(step)}, step=step)
        client.log_params(run_id, {"p": "1"})
        operations = client.flush(synchronous=False)
        states = set()
        while not operations.done():
            states.add(client.status().runs[0].state)
            time.sleep(0.005)
        operations.await_completion()
        assert "retrying" in states, states
        status = client.status().runs[0]
        assert status.errors == []
        assert status.logged["metrics"] == 5 and status.logged["params"] == 1
    finally:
        client.close()
    # Each status was one attempt (MLflow's own retries are off), then one success.
    assert proxy.hits == len(statuses) + 1
    history = server.get_metric_history(run_id, "m")
    assert sorted(m.step for m in history) == [0, 1, 2, 3, 4]
    assert server.get_run(run_id).data.params == {"p": "1"}


def test_a_permanent_error_from_the_server_is_sent_once_and_fails_that_run_only(
    mlflow_server, flaky_proxy, executor
):
    proxy = flaky_proxy(mlflow_server.uri, LOG_BATCH, [])
    server = MlflowClient(mlflow_server.uri)
    experiment_id = _experiment(mlflow_server.uri, "permanent")
    bad = server.create_run(experiment_id).info.run_id
    good = server.create_run(experiment_id).info.run_id
    server.log_param(bad, "p", "1")  # changing a logged param is rejected (HTTP 400)
    client = QueueingClient(proxy.uri, executor=executor, retry_timeout=120)
    try:
        client.log_params(bad, {"p": "2"})
        client.log_metrics(good, {"m": 1.0})
        with pytest.raises(MlflowException) as raised:
            client.flush()
        message = str(raised.value)
        assert f"Failed to perform one or more operations on the run with ID {bad}" in message
        assert good not in message
        by_id = {run.run_id: run for run in client.status().runs}
        assert by_id[bad].errors and by_id[good].errors == []
    finally:
        client.close()
    assert proxy.hits == 2  # one attempt per run: the 400 was not retried
    assert server.get_run(bad).data.params == {"p": "1"}
    assert server.get_run(good).data.metrics == {"m": 1.0}
