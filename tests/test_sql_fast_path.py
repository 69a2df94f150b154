"""The SQL fast path for metrics (``actors.delivery._sql_metrics``) stores exactly what MLflow's
``SqlAlchemyStore.log_batch`` stores: the same random metric streams go through MLflow into
one run and through the writer into another, then every row of ``metrics`` and
``latest_metrics`` is compared, and so are ``get_metric_history`` and ``get_run``. On SQLite
and on a real PostgreSQL server. And the guard: another schema revision, a database error, a
``model_id`` metric mean "use MLflow's API"; a deleted run gets MLflow's own error.
"""

from __future__ import annotations

import math
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from mlflow.entities import Metric, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_METRICS_PER_BATCH
from scripts import REPO, script_env
from stores import SqliteLock

from actors.delivery._fast_path import FastPathUnavailable
from actors.delivery._sql_metrics import PROVEN_REVISIONS, SqlMetricsWriter
from actors.delivery._sql_policy import ENV_SWITCH, fast_metrics_writer


@pytest.fixture(params=["sqlite", "postgresql"])
def sql_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlAlchemyStore]:
    """MLflow's own SQL store on a fresh SQLite file, or on the session's PostgreSQL server."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("template_db")
        db = tmp_path / "mlflow.db"
        db.write_bytes(template.read_bytes())
        uri = f"sqlite:///{db}"
    else:
        uri = request.getfixturevalue("postgres_uri")
    yield SqlAlchemyStore(uri, str(tmp_path / "artifacts"))


@pytest.fixture
def writer(sql_store: SqlAlchemyStore, monkeypatch: pytest.MonkeyPatch) -> SqlMetricsWriter:
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    made = fast_metrics_writer(sql_store)
    assert made is not None
    return made


def _new_run(store: SqlAlchemyStore, experiment_id: str, name: str) -> str:
    return str(store.create_run(experiment_id, "user", 0, [], name).info.run_id)


def _experiment(store: SqlAlchemyStore) -> str:
    """A new experiment (the PostgreSQL database lives for the whole session)."""
    return str(store.create_experiment(f"fast-path-{uuid.uuid4().hex}"))


def _exact(value: float) -> tuple[float, float]:
    """A stored value with its sign, so that -0.0 and 0.0 are told apart."""
    return (value, math.copysign(1.0, value))


def _rows(store: SqlAlchemyStore, table: str, run_id: str) -> list[tuple[Any, ...]]:
    """Every row of ``table`` for ``run_id``, run_uuid aside, sorted."""
    with store.engine.connect() as conn:
        found = conn.execute(
            sqlalchemy.text(
                f"SELECT key, value, timestamp, step, is_nan FROM {table} WHERE run_uuid = :r"
            ),
            {"r": run_id},
        ).all()
    return sorted(
        (key, _exact(value), timestamp, step, bool(is_nan))
        for key, value, timestamp, step, is_nan in found
    )


def _entities(metrics: list[Metric]) -> list[tuple[Any, ...]]:
    return [
        (m.key, "nan" if math.isnan(m.value) else _exact(m.value), m.timestamp, m.step)
        for m in metrics
    ]


def _assert_same(store: SqlAlchemyStore, mlflow_run: str, fast_run: str) -> None:
    for table in ("metrics", "latest_metrics"):
        assert _rows(store, table, fast_run) == _rows(store, table, mlflow_run), table
    by_mlflow = store.get_run(mlflow_run).data
    by_fast = store.get_run(fast_run).data
    assert sorted(by_fast.metrics) == sorted(by_mlflow.metrics)
    for key in by_mlflow.metrics:
        history_fast = _entities(store.get_metric_history(fast_run, key))
        history_mlflow = _entities(store.get_metric_history(mlflow_run, key))
        # MLflow orders the history by (timestamp, step, value): that order is the same;
        # among rows equal in all three (NaN is stored as 0, -0.0 equals 0.0) the database
        # picks one, which may differ between any two runs, MLflow's own included.
        assert [m[2:] for m in history_fast] == [m[2:] for m in history_mlflow], key
        assert sorted(history_fast, key=repr) == sorted(history_mlflow, key=repr), key
        latest_mlflow = by_mlflow.metrics[key]
        latest_fast = by_fast.metrics[key]
        if math.isnan(latest_mlflow):
            assert math.isnan(latest_fast)
        else:
            assert _exact(latest_fast) == _exact(latest_mlflow)


# -- the random streams ---------------------------------------------------------------

_KEY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_-./ "
_keys = st.one_of(
    st.sampled_from(["loss", "acc", "a" * MAX_ENTITY_KEY_LENGTH, "eval/loss-1.0 x"]),
    st.text(_KEY_CHARS, min_size=1, max_size=MAX_ENTITY_KEY_LENGTH).filter(
        lambda key: key.strip() == key and not key.startswith("/") and ".." not in key
    ),
)
_values = st.one_of(
    st.sampled_from(
        [
            math.nan,
            math.inf,
            -math.inf,
            0.0,
            -0.0,
            1.0,
            5e-324,
            -5e-324,
            2.2250738585072014e-308,
            1.7976931348623157e308,
            -1.7976931348623157e308,
        ]
    ),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**53), 2**53),
    st.just(0),
    # What NumPy training loops log: bound as the Python numbers they are, never as bytes.
    st.floats(width=32).map(np.float32),
    st.floats().map(np.float64),
    st.integers(-(2**53), 2**53).map(np.int64),
)
_timestamps = st.one_of(st.integers(0, 4), st.integers(0, 2**62))
# No NumPy steps: MLflow's ORM binds one by its buffer on SQLite and stores 8 bytes; runactors
# makes steps Python ints at the call (actors.queueing._inputs.check_step), so no path sees one.
_steps = st.one_of(st.integers(-2, 4), st.integers(-(2**63), 2**63 - 1))


@st.composite
def _streams(draw: st.DrawFn) -> list[list[Metric]]:
    """Batches of metrics: few keys, many repeats, equal steps with other timestamps,
    out-of-order steps; sometimes more than 1,000 metrics, cut into batches of at most 1,000
    as runactors cuts them; sometimes a batch sent twice."""
    keys = draw(st.lists(_keys, min_size=1, max_size=6, unique=True))
    one = st.builds(
        Metric, key=st.sampled_from(keys), value=_values, timestamp=_timestamps, step=_steps
    )
    pool = draw(st.lists(one, min_size=1, max_size=12))
    # Same key, step and timestamp, another value that MLflow's rule must order (NaN is
    # stored as 0, +inf as the largest double, -0.0 equals 0.0).
    twin = st.builds(
        lambda base, value: Metric(base.key, value, base.timestamp, base.step),
        st.sampled_from(pool),
        st.sampled_from([math.nan, 0.0, -0.0, 0, math.inf, 1.7976931348623157e308, 1]),
    )
    stream = draw(st.lists(st.one_of(st.sampled_from(pool), one, twin), max_size=60))
    bulk = draw(st.sampled_from([0, 0, 0, 1, 2]))
    if bulk:
        rnd = draw(st.randoms(use_true_random=False))
        for _ in range(bulk * 700):
            base = rnd.choice(pool)
            stream.append(
                Metric(
                    base.key,
                    rnd.choice([base.value, rnd.random()]),
                    base.timestamp,
                    rnd.randint(-2, 500),
                )
            )
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=4)))
    batches: list[list[Metric]] = []
    start = 0
    for end in [*cuts, len(stream)]:
        if end > start:
            piece = stream[start:end]
            batches += [
                piece[i : i + MAX_METRICS_PER_BATCH]
                for i in range(0, len(piece), MAX_METRICS_PER_BATCH)
            ]
            start = end
    if batches and draw(st.booleans()):
        batches.append(batches[draw(st.integers(0, len(batches) - 1))])
    return batches


def _outcome(call: Any, run_id: str, batch: list[Metric]) -> BaseException | None:
    try:
        call(run_id, batch)
    except (MlflowException, FastPathUnavailable) as exc:
        return exc
    return None


def _mlflow_log_batch(store: SqlAlchemyStore) -> Any:
    return lambda run_id, batch: store.log_batch(run_id, batch, [], [])


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batches=_streams())
# Found by this test: MLflow's ORM keeps a stored latest -0.0 when a greater row's value is
# 0 (here a NaN's), since -0.0 == 0; and of a tie in one batch, the first row wins.
@example(batches=[[Metric("loss", -0.0, 0, 0)], [Metric("loss", math.nan, 0, 1)]])
@example(batches=[[Metric("loss", math.nan, 0, 0), Metric("loss", 0.0, 0, 0)]])
@example(batches=[[Metric("loss", 0.0, 0, 0), Metric("loss", math.nan, 0, 0)]])
# Found by it in CI, on PostgreSQL: a NumPy zero is written over an equal stored value (the
# ORM's ``==`` answers np.True_, not True), so a NaN's 0 became -0.0 there and 0.0 here.
@example(batches=[[Metric("acc", math.nan, 0, 0)], [Metric("acc", np.float32(-0.0), 0, 1)]])
@example(batches=[[Metric("acc", -0.0, 0, 0)], [Metric("acc", np.float64(0.0), 0, 1)]])
def test_fast_path_stores_what_mlflow_stores(
    sql_store: SqlAlchemyStore, writer: SqlMetricsWriter, batches: list[list[Metric]]
) -> None:
    experiment_id = _experiment(sql_store)
    mlflow_run = _new_run(sql_store, experiment_id, "mlflow")
    fast_run = _new_run(sql_store, experiment_id, "fast")
    queued_run = _new_run(sql_store, experiment_id, "queued")  # as runactors' jobs send them

    def queued(run_id: str, batch: list[Metric]) -> None:
        rows = [(m.key, m.value, m.timestamp, m.step, None, None, None) for m in batch]
        writer.write_queued(run_id, [rows])

    for batch in batches:
        by_mlflow = _outcome(_mlflow_log_batch(sql_store), mlflow_run, batch)
        by_fast = _outcome(writer, fast_run, batch)
        by_queued = _outcome(queued, queued_run, batch)
        # Whatever MLflow refuses, the fast path does not store (it raises; a
        # FastPathUnavailable sends the batch to MLflow, which refuses it again).
        assert (by_mlflow is None) == (by_fast is None), (by_mlflow, by_fast)
        assert (by_mlflow is None) == (by_queued is None), (by_mlflow, by_queued)
    _assert_same(sql_store, mlflow_run, fast_run)
    _assert_same(sql_store, mlflow_run, queued_run)


# -- the guard ------------------------------------------------------------------------


def test_a_resent_batch_stores_nothing_twice(
    sql_store: SqlAlchemyStore, writer: SqlMetricsWriter
) -> None:
    run_id = _new_run(sql_store, _experiment(sql_store), "resent")
    batch = [Metric("loss", 1 / (step + 1), 1000 + step, step) for step in range(500)]
    batch.append(Metric("loss", math.nan, 5, 3))
    for _ in range(3):
        writer(run_id, batch)
    assert len(_rows(sql_store, "metrics", run_id)) == 501
    assert len(sql_store.get_metric_history(run_id, "loss")) == 501
    assert _rows(sql_store, "latest_metrics", run_id) == [
        ("loss", _exact(1 / 500), 1499, 499, False)
    ]


def test_statements_cut_anywhere_store_what_mlflow_stores(
    sql_store: SqlAlchemyStore, writer: SqlMetricsWriter
) -> None:
    """SQLite rows go in multi-row statements: cut at 7 rows, with repeats on both sides of
    the cuts and in one statement, the rows are MLflow's."""
    if writer.dialect != "sqlite":
        pytest.skip("PostgreSQL takes a batch as one statement of arrays")
    for statement in (writer._insert_metrics, writer._upsert_latest):
        statement.rows_per_statement = 7
    experiment_id = _experiment(sql_store)
    mlflow_run = _new_run(sql_store, experiment_id, "mlflow")
    fast_run = _new_run(sql_store, experiment_id, "fast")
    keys = [f"k{i}" for i in range(9)]  # more keys than a statement's rows: 2 upserts
    batch = [Metric(keys[i % 9], float(i % 5), 10 + i % 3, i % 4) for i in range(200)]
    batch += batch[:13]  # repeats of rows from earlier statements
    batch.insert(3, batch[2])  # a repeat within one statement
    for part in (batch[:100], batch[100:], batch[50:150]):
        sql_store.log_batch(mlflow_run, part, [], [])
        writer(fast_run, part)
    _assert_same(sql_store, mlflow_run, fast_run)


def _mlflow_error(call: Any) -> tuple[str, str]:
    with pytest.raises(MlflowException) as caught:
        call()
    return caught.value.message, caught.value.error_code


@pytest.mark.parametrize("terminate", [False, True])
def test_a_deleted_run_gets_mlflows_error(
    sql_store: SqlAlchemyStore, writer: SqlMetricsWriter, terminate: bool
) -> None:
    run_id = _new_run(sql_store, _experiment(sql_store), "deleted")
    if terminate:
        sql_store.update_run_info(run_id, RunStatus.FINISHED, 1, None)
    sql_store.delete_run(run_id)
    batch = [Metric("loss", 1.0, 1, 0)]
    expected = _mlflow_error(lambda: sql_store.log_batch(run_id, batch, [], []))
    assert _mlflow_error(lambda: writer(run_id, batch)) == expected
    assert expected[1] == "INVALID_PARAMETER_VALUE"
    assert _rows(sql_store, "metrics", run_id) == []


def test_a_missing_run_gets_mlflows_error(
    sql_store: SqlAlchemyStore, writer: SqlMetricsWriter
) -> None:
    run_id = "0" * 32
    batch = [Metric("loss", 1.0, 1, 0)]
    expected = _mlflow_error(lambda: sql_store.log_batch(run_id, batch, [], []))
    assert _mlflow_error(lambda: writer(run_id, batch)) == expected
    assert expected[1] == "RESOURCE_DOES_NOT_EXIST"


def test_a_finished_run_still_takes_metrics(
    sql_store: SqlAlchemyStore, writer: SqlMetricsWriter
) -> None:
    """MLflow logs into a terminated (still active) run: so does the fast path."""
    experiment_id = _experiment(sql_store)
    mlflow_run = _new_run(sql_store, experiment_id, "mlflow")
    fast_run = _new_run(sql_store, experiment_id, "fast")
    batch = [Metric("loss", 0.5, 1, 0), Metric("loss", math.inf, 2, 0)]
    for run_id in (mlflow_run, fast_run):
        sql_store.update_run_info(run_id, RunStatus.FINISHED, 1, None)
    sql_store.log_batch(mlflow_run, batch, [], [])
    writer(fast_run, batch)
    _assert_same(sql_store, mlflow_run, fast_run)


def test_invalid_input_gets_mlflows_error(
    sql_store: SqlAlchemyStore, writer: SqlMetricsWriter
) -> None:
    run_id = _new_run(sql_store, _experiment(sql_store), "invalid")
    for batch in (
        [Metric("loss", 1.0, -1, 0)],
        [Metric("x" * (MAX_ENTITY_KEY_LENGTH + 1), 1.0, 1, 0)],
        [Metric("loss", 1.0, 1, step) for step in range(MAX_METRICS_PER_BATCH + 1)],
    ):
        expected = _mlflow_error(lambda: sql_store.log_batch(run_id, batch, [], []))  # noqa: B023
        assert _mlflow_error(lambda: writer(run_id, batch)) == expected  # noqa: B023
    assert _rows(sql_store, "metrics", run_id) == []


def test_another_schema_revision_falls_back(
    sql_store: SqlAlchemyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a schema revision it was not proven on, the writer stores nothing and says so, on
    every call; the batch then goes through MLflow's API."""
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    run_id = _new_run(sql_store, _experiment(sql_store), "revision")
    with sql_store.engine.begin() as conn:
        (revision,) = conn.exec_driver_sql("SELECT version_num FROM alembic_version").one()
        assert revision in PROVEN_REVISIONS
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'f00dfeedbeef'")
    try:
        writer = fast_metrics_writer(sql_store)
        assert writer is not None
        for _ in range(2):
            with pytest.raises(FastPathUnavailable, match="f00dfeedbeef"):
                writer(run_id, [Metric("loss", 1.0, 1, 0)])
        assert writer.unavailable is not None
        assert _rows(sql_store, "metrics", run_id) == []
    finally:
        with sql_store.engine.begin() as conn:
            conn.execute(
                sqlalchemy.text("UPDATE alembic_version SET version_num = :r"), {"r": revision}
            )


def test_a_database_error_falls_back_and_stores_nothing(
    sql_store: SqlAlchemyStore, writer: SqlMetricsWriter
) -> None:
    """A real error of the database or its driver mid-batch (here a value the column cannot
    take) rolls the whole batch back and raises FastPathUnavailable; MLflow's API, which the
    caller then uses, refuses the batch too."""
    run_id = _new_run(sql_store, _experiment(sql_store), "error")
    batch = [Metric("loss", 1.0, 1, 0), Metric("loss", 2.0, 2, 1), Metric("loss", 1.0, 2, 2**64)]
    with pytest.raises(FastPathUnavailable):
        writer(run_id, batch)
    assert _rows(sql_store, "metrics", run_id) == []
    assert _rows(sql_store, "latest_metrics", run_id) == []
    with pytest.raises(MlflowException):
        sql_store.log_batch(run_id, batch, [], [])
    assert _rows(sql_store, "metrics", run_id) == []


def test_model_metrics_go_through_mlflow(
    sql_store: SqlAlchemyStore, writer: SqlMetricsWriter
) -> None:
    run_id = _new_run(sql_store, _experiment(sql_store), "model")
    with pytest.raises(FastPathUnavailable, match="model_id"):
        writer(run_id, [Metric("loss", 1.0, 1, 0, model_id="m-123")])
    assert _rows(sql_store, "metrics", run_id) == []


def test_the_switch_and_unsupported_stores(
    sql_store: SqlAlchemyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_SWITCH, "0")
    assert fast_metrics_writer(sql_store) is None
    monkeypatch.setenv(ENV_SWITCH, "1")
    assert fast_metrics_writer(sql_store) is not None
    assert fast_metrics_writer(object()) is None


_WRITER_PROCESS = """
import sys
from mlflow.entities import Metric
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from actors.delivery._fast_path import FastPathUnavailable
from actors.delivery._sql_policy import fast_metrics_writer

uri, *run_ids = sys.argv[1:]
store = SqlAlchemyStore(uri, "unused-artifacts")
writer = fast_metrics_writer(store)
fallbacks = 0
for start in range(0, 1000, 100):
    for run_id in run_ids:
        batch = [
            Metric(key, step / 7, 1_000 + step, step)
            for step in range(start, start + 100)
            for key in ("loss", "acc")
        ]
        try:
            writer(run_id, batch)
        except FastPathUnavailable:
            fallbacks += 1
            store.log_batch(run_id, batch, [], [])
print("fallbacks", fallbacks)
"""


@pytest.mark.slow
def test_many_writer_processes_lose_nothing(sql_store: SqlAlchemyStore) -> None:
    """4 processes x 5 runs on one database, written at once: every row stored, once."""
    experiment_id = _experiment(sql_store)
    runs = [_new_run(sql_store, experiment_id, f"p{i}") for i in range(20)]
    uri = sql_store.engine.url.render_as_string(hide_password=False)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER_PROCESS, uri, *runs[i * 5 : i * 5 + 5]],
            env=script_env(),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    try:
        outputs = [process.communicate(timeout=300) for process in processes]
    finally:
        for process in processes:
            process.kill()
            process.wait()
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
        assert "fallbacks" in out
    for run_id in runs:
        assert len(_rows(sql_store, "metrics", run_id)) == 2000
        assert _rows(sql_store, "latest_metrics", run_id) == [
            ("acc", _exact(999 / 7), 1999, 999, False),
            ("loss", _exact(999 / 7), 1999, 999, False),
        ]


@pytest.mark.slow
def test_a_locked_sqlite_file_is_waited_on_as_mlflow_waits(
    tracking_uri: str, experiment_id: str, store: Any
) -> None:
    """MLflow waits up to 20 s for a locked SQLite file; so does the writer, also on a
    connection no MLflow session has set up (pysqlite alone gives up after 5 s)."""
    run_id = store.create_run(experiment_id).info.run_id
    writer = SqlMetricsWriter(sqlalchemy.create_engine(tracking_uri))
    with SqliteLock(tracking_uri.removeprefix("sqlite:///"), hold=8) as lock:
        writer(run_id, [Metric("loss", 1.0, 1, 0)])
        assert lock.released.is_set()
    assert [m.value for m in store.get_metric_history(run_id, "loss")] == [1.0]
    writer.engine.dispose()
