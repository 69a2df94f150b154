"""The SQL fast path for metrics: a run's metrics written straight into MLflow's own tables.

MLflow's ``SqlAlchemyStore.log_batch`` builds one ORM object per metric and per latest value;
for a database store that, not the database, bounds how many metrics a second reach it. This
writer stores exactly the same rows with SQLAlchemy Core, through MLflow's own table models
(``SqlMetric``, ``SqlLatestMetric``), in ONE transaction per batch:

* the run is checked as MLflow checks it (same errors: not found, not active);
* after MLflow's own validation (same errors), the metrics are bulk inserted with conflicts
  ignored: a repeat in the batch or a re-sent batch stores nothing twice, as MLflow's dedup
  and duplicate recovery do; values as MLflow stores them (NaN: ``is_nan`` and 0;
  infinities: the largest finite double);
* the latest value of each key is upserted by MLflow's rule: a row replaces the stored one
  only when strictly greater by (step, timestamp, value), written as MLflow's ORM writes it
  (a stored value equal by ``==`` is kept: -0.0 stays).

SQLite rows go in multi-row ``VALUES`` statements; PostgreSQL gets one array per column.
The MLflow names relied on: the table models above, ``LifecycleStage``, the validation
functions ``_validate_run_id``, ``_validate_batch_log_data``, ``_validate_batch_log_limits``
(an upgrade that moves them fails the import of this module: :mod:`actors.delivery._fast_path`
imports it on first use, and turns the fast path off with one warning if it fails), and the
alembic revision.

Guarded: the writer only runs on the MLflow schema revisions it was proven identical on
(``tests/test_sql_fast_path.py``), on SQLite and PostgreSQL; anything else, and any database
error, raises :class:`FastPathUnavailable`, for the caller to send the batch through MLflow's
API instead; so are metrics with a ``model_id``. ``RUNACTORS_SQL_FAST_PATH=0`` turns it off.
When it is used: :mod:`actors.delivery._sql_policy`. A locked or unreachable database is
raised as MLflow's session raises it (TEMPORARILY_UNAVAILABLE): retried, not a fallback.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from typing import Any, Final

import sqlalchemy
from mlflow.entities import LifecycleStage, Metric
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_DOES_NOT_EXIST,
    TEMPORARILY_UNAVAILABLE,
)
from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlRun
from mlflow.utils.validation import (
    _validate_batch_log_data,
    _validate_batch_log_limits,
    _validate_run_id,
)
from sqlalchemy.dialects import postgresql, sqlite

from actors.delivery._fast_path import FastPathUnavailable
from actors.delivery._retry import is_transient
from actors.delivery._sqlite_gate import busy_timeout_ms, database_gate, database_key
from actors.queueing._queues import MetricRow, metric_entity

# The alembic revisions (``alembic_version.version_num``) of MLflow's schema that the
# equivalence tests were run on. A database on any other revision goes through MLflow's API.
PROVEN_REVISIONS = frozenset({"dc11669786a5"})

# The dialects whose conflict clauses the writer speaks (MySQL, MSSQL: MLflow's API).
INSERTS: dict[str, Callable[..., Any]] = {
    "sqlite": sqlite.insert,
    "postgresql": postgresql.insert,
}

# MLflow's replacement of infinities (SqlAlchemyStore.sanitize_metric_value).
_MAX_DOUBLE = 1.7976931348623157e308


def _sanitize(value: float) -> tuple[bool, float]:
    """``(is_nan, value)`` as MLflow stores a metric value (NaN: 0; infinities: +/-max)."""
    if math.isnan(value):
        return True, 0
    if math.isinf(value):
        return False, _MAX_DOUBLE if value > 0 else -_MAX_DOUBLE
    return False, value


# A metrics / latest_metrics row, in the order of the compiled statements' parameters.
_COLUMNS = ("key", "value", "timestamp", "step", "is_nan", "run_uuid")
Row = tuple[str, float, int, int, bool, str]
_KEY: Final = 0
_VALUE: Final = 1
_TIMESTAMP: Final = 2
_STEP: Final = 3
_RUN: Final = 5
_KNOWN_KEYS_MAX = 100_000


def metric_rows(run_id: str, metrics: Sequence[Metric]) -> list[Row]:
    """The ``metrics`` rows MLflow's ``_log_metrics`` would add for ``metrics``, in order.

    MLflow drops a metric equal to an earlier one of the batch; here the database's conflict
    clause drops it (a repeat has the same primary key), as it drops the repeats MLflow's
    in-batch dedup lets through (two NaN objects, +inf and the largest double): the stored
    rows are the same, and a repeat cannot change the latest value (not strictly greater).
    """
    rows: list[Row] = []
    for metric in metrics:
        is_nan, value = _sanitize(_plain_number(metric.value))
        timestamp, step = _plain_int(metric.timestamp), _plain_int(metric.step)
        row = (metric.key, value, timestamp, step, is_nan, run_id)
        if value == 0 and type(metric.value) is not float and type(metric.value) is not int:
            row = WrittenAsIs(row)
        rows.append(row)
    return rows


class WrittenAsIs(tuple):
    """A row whose value MLflow's ORM writes over a stored latest value even when they are
    equal: a NumPy zero. The ORM keeps a stored value the new one equals (``==`` is
    ``True``), but a NumPy comparison answers ``np.True_``, which is not ``True``, so the
    ORM writes it, and on PostgreSQL ``-0.0`` and ``0.0`` differ. Only zeros can be equal
    with other bits, so only zeros are marked."""

    __slots__ = ()


def _plain_number(value: Any) -> float:
    """A NumPy (or other) number as the Python ``int`` or ``float`` the driver binds as a
    number, as SQLAlchemy's ORM does for MLflow: ``sqlite3`` binds a NumPy scalar by its
    buffer, as bytes (``np.float32(0.5)`` was stored as ``b'\\x00\\x00\\x00?'``)."""
    if type(value) is float or type(value) is int:
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _plain_int(value: Any) -> int:
    return value if type(value) is int else int(value)


def latest_rows(rows: Sequence[Row]) -> list[Row]:
    """Per key and run, the row MLflow's latest-metric update would keep from ``rows`` alone:
    the first one strictly greater by (step, timestamp, value) than all before it. Sorted,
    so that concurrent writers lock latest-metric rows in one order."""
    best: dict[tuple[str, str], Row] = {}
    for row in rows:
        held = best.get((row[_KEY], row[_RUN]))
        if held is None or (row[_STEP], row[_TIMESTAMP], row[_VALUE]) > (
            held[_STEP],
            held[_TIMESTAMP],
            held[_VALUE],
        ):
            best[(row[_KEY], row[_RUN])] = row
    return [best[key] for key in sorted(best)]


# One row's parameters in a compiled SQLite statement.
_ROW_GROUP = "(" + ", ".join("?" * len(_COLUMNS)) + ")"


def _sqlite_rows_per_statement() -> int:
    """Rows per multi-row ``VALUES``: 500, or fewer where the linked SQLite binds fewer
    parameters per statement (999 before SQLite 3.32)."""
    limit = 999
    category = getattr(sqlite3, "SQLITE_LIMIT_VARIABLE_NUMBER", None)  # Python 3.11+
    if category is not None:
        conn: Any = sqlite3.connect(":memory:")
        try:
            limit = conn.getlimit(category)
        finally:
            conn.close()
    return max(1, min(500, limit // len(_COLUMNS)))


class _Statement:
    """An insert statement of MLflow's tables compiled once, in ``engine``'s dialect, with
    positional parameters in ``_COLUMNS`` order; it takes its rows as plain tuples.

    SQLite gets up to 500 rows per statement (one multi-row ``VALUES``), not the driver's
    ``executemany``: that steps the statement once per row and lets go of the GIL around
    each step, and while any other thread of the process runs Python (another run's job, the
    training loop), each step waits out a GIL switch interval (5 ms) to take it back:
    measured, 16,000 rows took 93 s next to one busy thread (62 ms alone), multi-row
    statements 0.4 s. PostgreSQL gets each column as one array (``INSERT ... SELECT
    unnest(...)``): ``executemany`` costs a statement per row, a multi-row ``VALUES`` a long
    parse and plan.
    """

    def __init__(self, engine: sqlalchemy.engine.Engine, statement: Any) -> None:
        self.columnar = engine.dialect.name == "postgresql"
        dialect_class: Any = type(engine.dialect)
        paramstyle = "format" if self.columnar else "qmark"
        compiled = statement.compile(dialect=dialect_class(paramstyle=paramstyle))
        if list(compiled.positiontup) != list(_COLUMNS):
            raise FastPathUnavailable(
                f"unexpected columns of MLflow's tables: {compiled.positiontup}"
            )
        self.sql = str(compiled)
        self._texts: dict[int, str] = {}  # the SQLite statement for n rows
        if not self.columnar:
            head, values, tail = self.sql.partition(f"VALUES {_ROW_GROUP}")
            if not values or "?" in tail:  # all parameters are the row's
                raise FastPathUnavailable(f"unexpected statement: {self.sql}")
            self._head, self._tail = f"{head}VALUES ", tail
            self.rows_per_statement = _sqlite_rows_per_statement()

    def _text(self, rows: int) -> str:
        text = self._texts.get(rows)
        if text is None:
            text = self._texts[rows] = self._head + ", ".join([_ROW_GROUP] * rows) + self._tail
        return text

    def execute(self, conn: sqlalchemy.engine.Connection, rows: Sequence[Row]) -> None:
        if self.columnar:
            keys, values, timestamps, steps, is_nans, run_ids = map(list, zip(*rows, strict=True))
            # One array has one element type: ints as the doubles PostgreSQL makes of them.
            values = [float(value) for value in values]
            conn.exec_driver_sql(self.sql, (keys, values, timestamps, steps, is_nans, run_ids))
            return
        # Rows in one statement are inserted in order, each meeting the conflict clause
        # against those before it: what one statement per row stores.
        step = self.rows_per_statement
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            conn.exec_driver_sql(self._text(len(chunk)), tuple(chain.from_iterable(chunk)))


class SqlMetricsWriter:
    """Writes one run's metrics into an MLflow database in one transaction per call."""

    def __init__(self, engine: sqlalchemy.engine.Engine) -> None:
        self.engine = engine
        self.dialect: str = engine.dialect.name
        # Why this database is not (or no longer) served, once known; None while it is.
        self.unavailable: str | None = None
        self._revision_checked = False
        self._runs = SqlRun.__table__
        # One writer at a time per SQLite file in this process (actors.delivery._sqlite_gate).
        self._gate = database_key(engine.url.database) if self.dialect == "sqlite" else None
        self._insert_metrics = _Statement(engine, _insert_metrics(self.dialect))
        self._upsert_latest = _Statement(engine, _upsert_latest(self.dialect))
        self._overwrite_latest = _Statement(engine, _upsert_latest(self.dialect, keep=False))
        # Keys that passed MLflow's name rules: checked once, not once per metric.
        self._known_keys: set[str] = set()

    def __call__(self, run_id: str, metrics: Sequence[Metric]) -> None:
        """Store ``metrics`` into run ``run_id`` as ``log_batch(run_id, metrics)`` would.

        Raises MLflow's own ``MlflowException`` for what MLflow would refuse (invalid input,
        a run not found or not active; a locked or unreachable database as MLflow's session
        words it, TEMPORARILY_UNAVAILABLE), and :class:`FastPathUnavailable` when the batch
        must go through MLflow's API instead (nothing of it stored).
        """
        self.write_batches(run_id, [metrics])

    def write_batches(self, run_id: str, batches: Sequence[Sequence[Metric]]) -> None:
        """Store several batches into run ``run_id`` in ONE transaction, as the same
        ``log_batch`` calls in order would: each batch validated on its own (MLflow's limits
        are per call); all stored or none (any error, as for one batch).

        One transaction instead of one per batch: on SQLite each commit is an fsync, which
        costs as much as writing the 1,000 metrics of a batch. Storing the batches' rows in
        one statement stores what the calls in order store: the metrics are inserted with
        conflicts ignored, and the latest value that wins over them all is the one that
        would win the calls one after another (the rule is a strict maximum).
        """
        rows: list[Row] = []
        for metrics in batches:
            rows.extend(self._checked_rows(run_id, metrics))
        self._store(run_id, rows)

    def write_queued(self, run_id: str, batches: Sequence[Sequence[MetricRow]]) -> None:
        """:meth:`write_batches` for batches as runactors queues them, tuples of (key, value,
        timestamp, step, model_id, dataset_name, dataset_digest): a batch of plain numbers
        under known keys becomes rows directly, as :meth:`_validate` lets it pass; any other
        is made MLflow ``Metric`` entities and checked by MLflow's own validation."""
        rows: list[Row] = []
        for batch in batches:
            plain = self._plain_rows(run_id, batch)
            if plain is None:
                plain = self._checked_rows(run_id, [metric_entity(metric) for metric in batch])
            rows.extend(plain)
        self._store(run_id, rows)

    def _checked_rows(self, run_id: str, metrics: Sequence[Metric]) -> list[Row]:
        if any(metric.model_id is not None for metric in metrics):
            raise FastPathUnavailable("metrics with a model_id go through MLflow's API")
        _validate_run_id(run_id)
        self._validate(metrics)
        return metric_rows(run_id, metrics)

    def _plain_rows(self, run_id: str, batch: Sequence[MetricRow]) -> list[Row] | None:
        """The rows of ``batch`` when each metric passes as in :meth:`_validate`'s first loop
        (known key, a float or int value, int timestamp >= 0 and step, no model_id); None
        when any needs MLflow's checks."""
        known = self._known_keys
        rows: list[Row] = []
        for key, value, timestamp, step, model_id, _, _ in batch:
            if not (
                key in known
                and model_id is None
                and type(value) in (float, int)
                and type(timestamp) is int
                and timestamp >= 0
                and type(step) is int
            ):
                return None
            is_nan, stored = _sanitize(value)
            rows.append((key, stored, timestamp, step, is_nan, run_id))
        _validate_run_id(run_id)
        _validate_batch_log_limits(rows, [], [])
        return rows

    def _store(self, run_id: str, rows: list[Row]) -> None:
        with self.transaction() as conn:  # the run checked, ``rows`` stored
            self._check_run(conn, run_id)
            if rows:
                self.store_rows(conn, rows)

    @contextlib.contextmanager
    def transaction(self, each: bool = False) -> Iterator[sqlalchemy.engine.Connection]:
        """A transaction set up as MLflow's sessions are, on a proven revision (checked once;
        ``each``: every time); errors as :meth:`__call__` raises them."""
        if self.unavailable is not None:
            raise FastPathUnavailable(self.unavailable)
        try:
            with database_gate(self._gate), self.engine.begin() as conn:
                if self.dialect == "sqlite":
                    # As MLflow's sessions: foreign keys checked, a locked database waited
                    # on 20 s (pysqlite's default: 5 s) or RUNACTORS_SQLITE_BUSY_TIMEOUT.
                    conn.exec_driver_sql("PRAGMA foreign_keys = ON")
                    conn.exec_driver_sql(f"PRAGMA busy_timeout = {busy_timeout_ms()}")
                if each or not self._revision_checked:
                    self._check_revision(conn, remember=not each)
                yield conn
        except (MlflowException, FastPathUnavailable):
            raise
        except sqlalchemy.exc.OperationalError as exc:
            if is_transient(exc):
                # "database is locked", a connection refused: what MLflow's session raises
                # for it, so that the caller retries it exactly as it retries log_batch.
                raise MlflowException(str(exc), TEMPORARILY_UNAVAILABLE) from exc
            raise FastPathUnavailable(f"{type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            raise FastPathUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def store_rows(self, conn: sqlalchemy.engine.Connection, rows: list[Row]) -> None:
        self._insert_metrics.execute(conn, rows)  # of one run or several; then latest values
        latest = latest_rows(rows)
        kept = [row for row in latest if type(row) is not WrittenAsIs]
        if kept:
            self._upsert_latest.execute(conn, kept)
        if len(kept) < len(latest):
            written = [row for row in latest if type(row) is WrittenAsIs]
            self._overwrite_latest.execute(conn, written)

    def _validate(self, metrics: Sequence[Metric]) -> None:
        """MLflow's ``log_batch`` validation, with its errors in its order; the costly part
        (a key's name rules) once per key: a batch of plain values under known keys passes
        as MLflow's would, anything else goes through MLflow's own checks."""
        known = self._known_keys
        for metric in metrics:
            timestamp, step = metric.timestamp, metric.step
            if not (
                metric.key in known
                and type(metric.value) in (float, int)
                and type(timestamp) is int
                and timestamp >= 0
                and type(step) is int
            ):
                _validate_batch_log_data(metrics, [], [])
                if len(known) > _KNOWN_KEYS_MAX:
                    known.clear()
                known.update(metric.key for metric in metrics)
                break
        _validate_batch_log_limits(metrics, [], [])

    def _check_revision(self, conn: sqlalchemy.engine.Connection, remember: bool = True) -> None:
        revision = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
        if revision not in PROVEN_REVISIONS:
            self.unavailable = (
                f"MLflow schema revision {revision} is not one the SQL fast path was proven "
                f"on ({', '.join(sorted(PROVEN_REVISIONS))})"
            )
            raise FastPathUnavailable(self.unavailable)
        self._revision_checked = remember or self._revision_checked

    def _check_run(self, conn: sqlalchemy.engine.Connection, run_id: str) -> None:
        """MLflow's ``_get_run`` and ``_check_run_is_active``: the same errors, same words."""
        stage = conn.execute(
            sqlalchemy.select(self._runs.c.lifecycle_stage).where(self._runs.c.run_uuid == run_id)
        ).scalar_one_or_none()
        if stage is None:
            raise MlflowException(f"Run with id={run_id} not found", RESOURCE_DOES_NOT_EXIST)
        if stage != LifecycleStage.ACTIVE:
            raise MlflowException(
                f"The run {run_id} must be in the 'active' state. Current state is {stage}.",
                INVALID_PARAMETER_VALUE,
            )


def _unbounded(column_type: Any) -> Any:
    """A column's type without a length: a cast to VARCHAR(250) would silently cut a long
    key, where the insert must fail as MLflow's does."""
    return sqlalchemy.String() if isinstance(column_type, sqlalchemy.String) else column_type


def _insert(dialect: str, table: Any) -> Any:
    """An insert of whole rows into ``table``: one row of parameters (SQLite), or one array
    per column, unnested in lockstep (PostgreSQL)."""
    if dialect != "postgresql":
        return INSERTS[dialect](table)
    columns = [table.c[name] for name in _COLUMNS]
    arrays = [
        sqlalchemy.func.unnest(
            sqlalchemy.cast(
                sqlalchemy.bindparam(column.name), postgresql.ARRAY(_unbounded(column.type))
            )
        )
        for column in columns
    ]
    return postgresql.insert(table).from_select(columns, sqlalchemy.select(*arrays))


def _insert_metrics(dialect: str) -> Any:
    """Bulk insert into ``metrics``; a row already there (same primary key) is skipped."""
    return _insert(dialect, SqlMetric.__table__).on_conflict_do_nothing()


def _upsert_latest(dialect: str, keep: bool = True) -> Any:
    """Insert into ``latest_metrics``, or replace the stored row of the key when the new one
    is strictly greater by (step, timestamp, value): MLflow's rule, and its way of writing
    the replacement (``keep``: a stored value equal to the new one is kept; without it, the
    new one is written, as for a :class:`WrittenAsIs` row)."""
    latest = SqlLatestMetric.__table__
    insert = _insert(dialect, latest)
    new = insert.excluded
    return insert.on_conflict_do_update(
        index_elements=[latest.c.key, latest.c.run_uuid],
        set_={
            # MLflow's ORM writes only the attributes that changed by ``==``: a stored -0.0
            # replaced by 0.0 (or a NaN's 0) stays -0.0. So does it here.
            "value": sqlalchemy.case((latest.c.value == new.value, latest.c.value), else_=new.value)
            if keep
            else new.value,
            "timestamp": new.timestamp,
            "step": new.step,
            "is_nan": new.is_nan,
        },
        where=sqlalchemy.tuple_(new.step, new.timestamp, new.value)
        > sqlalchemy.tuple_(latest.c.step, latest.c.timestamp, latest.c.value),
    )
