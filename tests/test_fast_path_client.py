"""The SQL fast path through the client, on both executors: a run's metrics land exactly as
MLflow's ``log_batch`` stores them (SQLite and a real PostgreSQL 15), an unproven schema
revision falls back to MLflow's API (everything stored, shown in ``status()`` and logged
once), and a locked SQLite file is retried as MLflow's own call would be."""

from __future__ import annotations

import itertools
import logging
import math
import uuid
from typing import Any

import pytest
import sqlalchemy
from mlflow.tracking import MlflowClient
from stores import SqliteLock

import client._client as client_impl
from actors.delivery._fast_path import FastPathUnavailable
from actors.delivery._sql_metrics import PROVEN_REVISIONS, SqlMetricsWriter
from actors.delivery._sql_policy import ENV_SWITCH
from client import QueueingClient

# Steps out of order, repeats, equal steps with other values, NaN, infinities, -0.0, ints,
# huge and tiny floats; 1,300 steps of 2 metrics: three chunks of MLflow's 1,000 metrics.
_SPECIAL = [math.nan, math.inf, -math.inf, -0.0, 0, 7, 1e308, 5e-324, -2.5]
_STEPS = [*range(1_300), 5, 5, 3, 1_299, 0]


def _values(i: int) -> dict[str, float]:
    return {"loss": _SPECIAL[i % len(_SPECIAL)], "acc": (i % 17) / 3}


def _exact(value: float) -> str:
    return repr(float(value))  # -0.0 apart from 0.0, NaN comparable


def _rows(uri: str, table: str, run_id: str) -> list[tuple[Any, ...]]:
    engine = sqlalchemy.create_engine(uri)
    try:
        with engine.connect() as conn:
            found = conn.execute(
                sqlalchemy.text(
                    f"SELECT key, value, timestamp, step, is_nan FROM {table} WHERE run_uuid = :r"
                ),
                {"r": run_id},
            ).all()
    finally:
        engine.dispose()
    return sorted((k, _exact(v), t, s, bool(n)) for k, v, t, s, n in found)


@pytest.fixture(params=["sqlite", "postgres"])
def db_uri(request: pytest.FixtureRequest) -> str:
    if request.param == "sqlite":
        return str(request.getfixturevalue("tracking_uri"))
    return str(request.getfixturevalue("postgres_uri"))


def _log_run(uri: str, executor: str, experiment_id: str) -> tuple[str, str | None]:
    """One run with the whole stream, flushed and terminated: its ID and its fast path."""
    client = QueueingClient(uri, executor=executor)  # type: ignore[arg-type]
    try:
        run = client.create_run(experiment_id)
        for i, step in enumerate(_STEPS):
            client.log_metrics(run, _values(i), step=step)
        client.flush()
        (status,) = client.status().runs
        assert status.errors == [] and status.logged["metrics"] == 2 * len(_STEPS)
        client.set_terminated(run)
        client.flush()
        return run.resolve(), status.sql_fast_path
    finally:
        client.close()


def test_the_client_stores_through_the_fast_path_what_mlflow_stores(
    db_uri: str, executor: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = itertools.count(1_700_000_000_000, 7)
    monkeypatch.setattr(client_impl, "get_current_time_millis", lambda: next(clock))
    experiment_id = MlflowClient(db_uri).create_experiment(f"fast-{uuid.uuid4().hex}")
    monkeypatch.setenv(ENV_SWITCH, "0")
    mlflow_run, off = _log_run(db_uri, executor, experiment_id)
    clock = itertools.count(1_700_000_000_000, 7)  # the same timestamps again
    monkeypatch.setenv(ENV_SWITCH, "1")
    fast_run, on = _log_run(db_uri, executor, experiment_id)
    assert (off, on) == ("off", "on")
    for table in ("metrics", "latest_metrics"):
        expected = _rows(db_uri, table, mlflow_run)
        assert expected and _rows(db_uri, table, fast_run) == expected
    store = MlflowClient(db_uri)
    assert store.get_run(fast_run).data.metrics == store.get_run(mlflow_run).data.metrics


def test_an_unproven_schema_revision_falls_back_stores_everything_and_says_so(
    tracking_uri: str,
    experiment_id: str,
    executor: str,
    store: MlflowClient,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    # One worker: MLflow checks the revision when a store is opened, so the one that opened
    # the store before the revision changed must do the rest.
    client = QueueingClient(tracking_uri, executor=executor, max_workers=1)  # type: ignore[arg-type]
    try:
        run = client.create_run(experiment_id)
        client.flush()  # the executor's store is open: MLflow checks the revision only then
        engine = sqlalchemy.create_engine(tracking_uri)
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'f00dfeedbeef'")
        engine.dispose()
        with caplog.at_level(logging.WARNING, logger="runactors.delivery"):
            for round_ in range(3):
                for step in range(600):
                    client.log_metrics(run, {"loss": step / 7, "acc": round_}, step=step)
                client.flush()
        (status,) = client.status().runs
    finally:
        client.close()
    assert status.errors == [] and status.logged["metrics"] == 3 * 1_200
    assert status.sql_fast_path is not None
    assert status.sql_fast_path.startswith("fallback: MLflow schema revision f00dfeedbeef")
    history = store.get_metric_history(run.resolve(), "loss")
    assert sorted(m.step for m in history) == sorted(list(range(600)) * 3)
    assert store.get_run(run.resolve()).data.metrics == {"loss": 599 / 7, "acc": 2.0}
    assert PROVEN_REVISIONS  # the fallback was the revision's, not a missing proof
    logged = caplog.text + capfd.readouterr().err  # a worker process logs to its stderr
    assert logged.count("SQL fast path unavailable") == 1


@pytest.mark.slow
def test_a_locked_sqlite_file_is_retried_through_the_fast_path(
    tracking_uri: str,
    experiment_id: str,
    executor: str,
    store: MlflowClient,
    sqlite_busy_timeout: float,
) -> None:
    """A lock held past the writer's busy timeout (MLflow's 20 s by default; 1 s here)
    fails the writer's attempt as it fails MLflow's log_batch, transiently: the run retries
    it and the batch lands through the fast path once the lock is gone (not through a
    fallback)."""
    # One worker, whose store is open before the lock: the lock meets the fast path's
    # write, not the opening of another worker's store (which is retried anyway).
    client = QueueingClient(tracking_uri, executor=executor, max_workers=1, retry_timeout=90)
    try:
        run = client.create_run(experiment_id)
        client.log_metrics(run, {"loss": 0.5}, step=0)
        client.flush()
        hold = sqlite_busy_timeout + 3  # past the busy timeout: attempts fail while it lasts
        with SqliteLock(tracking_uri.removeprefix("sqlite:///"), hold=hold) as lock:
            for step in range(1, 1_500):
                client.log_metrics(run, {"loss": step / 3}, step=step)
            client.flush()
            assert lock.released.is_set()
        (status,) = client.status().runs
    finally:
        client.close()
    assert status.errors == [] and status.logged["metrics"] == 1_500
    assert status.retries >= 1 and "database is locked" in (status.last_retry_error or "")
    assert status.sql_fast_path == "on"
    assert len(store.get_metric_history(run.resolve(), "loss")) == 1_500


def test_a_wrapped_log_batch_still_sees_every_batch(
    tracking_uri: str, experiment_id: str, store: MlflowClient
) -> None:
    """Code that wraps ``MlflowClient.log_batch`` (instrumentation, MLflow's own tests of the
    queueing client) expects it to run for every batch: the fast path stands aside."""
    seen: list[int] = []
    original = MlflowClient.log_batch

    def wrapped(self: MlflowClient, *args: Any, **kwargs: Any) -> None:
        seen.append(len(kwargs.get("metrics", ())))
        original(self, *args, **kwargs)

    client = QueueingClient(tracking_uri)
    try:
        run = client.create_run(experiment_id)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(MlflowClient, "log_batch", wrapped)
            for step in range(1_200):
                client.log_metrics(run, {"loss": step / 3}, step=step)
            client.flush()
    finally:
        client.close()
    assert seen == [1_000, 200]
    assert len(store.get_metric_history(run.resolve(), "loss")) == 1_200


@pytest.mark.parametrize("refuse_groups", [False, True])
def test_a_rounds_batches_of_a_run_share_one_transaction(
    tracking_uri: str,
    experiment_id: str,
    store: MlflowClient,
    monkeypatch: pytest.MonkeyPatch,
    refuse_groups: bool,
) -> None:
    """A round's 3 metric batches of one run go in ONE transaction (one commit, one run
    check); a group the writer cannot take goes batch by batch, all stored. (The writer is
    watched in this process: the thread executor.) The metrics path alone: the whole-run
    path, which would take this round first, is tested in test_sql_fast_runs.py."""
    monkeypatch.setattr("actors.delivery._perform.write_whole_run", lambda *args: False)
    real = SqlMetricsWriter.write_queued
    seen: list[int] = []

    def watched(self: SqlMetricsWriter, run_id: str, batches: Any) -> None:
        seen.append(len(batches))
        if refuse_groups and len(batches) > 1:
            raise FastPathUnavailable("this group, say, cannot be taken")
        real(self, run_id, batches)

    monkeypatch.setattr(SqlMetricsWriter, "write_queued", watched)
    with QueueingClient(tracking_uri, executor="thread") as client:
        run = client.create_run(experiment_id)
        for step in range(1_250):
            client.log_metrics(run, {"loss": step / 3, "acc": -step}, step=step)
        client.set_terminated(run)
        client.flush()
        (status,) = client.status().runs
    assert status.errors == [] and status.logged["metrics"] == 2_500
    assert seen == ([3, 1, 1, 1] if refuse_groups else [3])
    history = store.get_metric_history(run.resolve(), "acc")
    assert sorted(m.step for m in history) == list(range(1_250))
    assert store.get_run(run.resolve()).info.status == "FINISHED"
