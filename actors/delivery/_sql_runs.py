"""The SQL fast path for whole runs: a round's ``create_run``, ``log_batch`` and
``set_terminated`` calls of many runs stored in one transaction (group commit).

MLflow's client makes each run three transactions or more, each a commit (an ``fsync`` on
SQLite) and each through its ORM; for sweeps of short runs that, not the rows, bounds how many
runs a second reach the store. This writer stores the rows MLflow's
``SqlAlchemyStore.create_run`` / ``log_batch`` / ``update_run_info`` store, through MLflow's
own table models (``SqlRun``, ``SqlTag``, ``SqlParam``, ``SqlMetric``, ``SqlLatestMetric``,
``SqlExperiment``) and validation functions, for every run of a group at once:

* a run is taken whole or not at all. What MLflow would refuse or store otherwise (an
  experiment missing or not active, a run missing or not active, a param whose value changes,
  any input MLflow's validation refuses, a ``mlflow.runName`` tag in a batch, a batch MLflow's
  client would cut in two) is not taken: the caller sends that run's calls through MLflow's
  API, which fails it exactly as MLflow fails it, the other runs of the group unaffected;
* a created run's ID is its creation's create key (a uuid4, as MLflow's own IDs): an attempt
  after one of unknown outcome finds the run and stores nothing again, so that a creation
  retried never makes two runs (:func:`actors.delivery._create_key.find_created_run` looks
  the same ID up for the spool);
* any database error rolls the whole group back and raises :class:`FastPathUnavailable`
  (each run then goes through MLflow's API), a locked or unreachable database MLflow's
  TEMPORARILY_UNAVAILABLE (retried).

Guarded as the metrics path (:mod:`actors.delivery._sql_metrics`, whose transaction, revision
check and metric statements it uses) and proven identical by ``tests/test_sql_fast_runs.py``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy
from mlflow.entities import LifecycleStage, Param, RunStatus, RunTag, SourceType
from mlflow.exceptions import MlflowException
from mlflow.store.tracking.dbmodels.models import SqlExperiment, SqlParam, SqlRun, SqlTag
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME, MLFLOW_USER, _get_run_name_from_tags
from mlflow.utils.name_utils import _generate_random_name
from mlflow.utils.time import get_current_time_millis
from mlflow.utils.uri import append_to_uri_path
from mlflow.utils.validation import (
    _validate_batch_log_data,
    _validate_batch_log_limits,
    _validate_param_keys_unique,
    _validate_run_id,
)

from actors.delivery._run_work import RunWork
from actors.delivery._sql_metrics import INSERTS, Row, SqlMetricsWriter, metric_rows
from actors.queueing._plan import LogBatchCall
from actors.queueing._queues import CreateRunCall, metric_entity

_ROWS_PER_INSERT = 50  # rows of runs, tags or params per multi-row INSERT


class NotTaken(Exception):
    """This run goes through MLflow's API (which stores it, or fails it as MLflow does)."""


@dataclass
class _Prepared:
    """A run's rows, made and validated before the transaction."""

    work: RunWork
    tags: dict[str, str] = field(default_factory=dict)  # final values, by key
    params: dict[str, str] = field(default_factory=dict)  # in order
    metrics: list[list[Row]] = field(default_factory=list)  # per batch, in order
    run: dict[str, Any] | None = None  # the runs row of a creation (artifact_uri to come)
    status: tuple[str, int] | None = None  # (status, end_time) of a termination


def _prepare(work: RunWork, metrics_writer: SqlMetricsWriter) -> _Prepared:
    """The rows MLflow's calls would store for ``work``, validated by MLflow's functions, or
    :class:`NotTaken` for anything MLflow would refuse or store otherwise."""
    assert work.run_id is not None
    prepared = _Prepared(work)
    try:
        if work.create is not None:
            prepared.run = _creation(work.create, work.run_id, prepared.tags)
        for call in work.batches:
            _batch(call, work.run_id, prepared, metrics_writer)
        if work.terminate is not None:
            # MlflowClient.set_terminated's defaults, then RunStatus.from_string's check.
            status = work.terminate.status or RunStatus.to_string(RunStatus.FINISHED)
            status = RunStatus.to_string(RunStatus.from_string(status))
            prepared.status = (status, work.terminate.end_time or get_current_time_millis())
    except MlflowException as exc:
        raise NotTaken(str(exc)) from exc
    return prepared


def _creation(create: CreateRunCall, run_id: str, tags: dict[str, str]) -> dict[str, Any]:
    """The runs row (without artifact_uri) and tags of MlflowClient.create_run."""
    given = dict(create.tags)  # as runactors calls it: tags=dict(call.tags)
    run_name_tag = _get_run_name_from_tags([RunTag(k, v) for k, v in given.items()])
    if MLFLOW_RUN_NAME in given and not run_name_tag:
        raise NotTaken("an empty mlflow.runName tag")  # MLflow would add a second one
    if create.run_name and run_name_tag and create.run_name != run_name_tag:
        raise NotTaken("run_name and the mlflow.runName tag differ")
    run_name = create.run_name or run_name_tag or _generate_random_name()
    tags.update(given)
    tags.setdefault(MLFLOW_RUN_NAME, run_name)
    return {
        "name": run_name,
        "run_uuid": run_id,
        "experiment_id": int(create.experiment_id),
        "source_type": SourceType.to_string(SourceType.UNKNOWN),
        "source_name": "",
        "entry_point_name": "",
        "user_id": given.get(MLFLOW_USER, "unknown"),
        "status": RunStatus.to_string(RunStatus.RUNNING),
        "start_time": create.start_time or get_current_time_millis(),
        "end_time": None,
        "deleted_time": None,
        "source_version": "",
        "lifecycle_stage": LifecycleStage.ACTIVE,
    }


def _batch(
    call: LogBatchCall, run_id: str, prepared: _Prepared, metrics_writer: SqlMetricsWriter
) -> None:
    """One ``log_batch``'s rows, validated as SqlAlchemyStore.log_batch validates them."""
    if not call.params and not call.tags:  # metric-only: as the metrics path checks it
        rows = metrics_writer._plain_rows(run_id, call.metrics)
        if rows is None:
            entities = [metric_entity(metric) for metric in call.metrics]
            rows = metrics_writer._checked_rows(run_id, entities)
    else:
        metrics = [metric_entity(metric) for metric in call.metrics]
        params = [Param(key, value) for key, value in call.params]
        tags = [RunTag(key, value) for key, value in call.tags]
        _validate_run_id(run_id)
        metrics, params, tags = _validate_batch_log_data(metrics, params, tags)
        _validate_batch_log_limits(metrics, params, tags)
        _validate_param_keys_unique(params)
        rows = metric_rows(run_id, metrics)
        for param in params:
            held = prepared.params.setdefault(param.key, param.value)
            if held != param.value:
                raise NotTaken(f"param {param.key!r} changes its value")
        prepared.tags.update((tag.key, tag.value) for tag in tags)
    prepared.metrics.append(rows)


class SqlRunsWriter:
    """Stores whole runs (:class:`RunWork`) in one transaction per group, group-committing
    what the threads of this process submit at once (:meth:`submit`)."""

    def __init__(self, metrics_writer: SqlMetricsWriter) -> None:
        self.metrics = metrics_writer
        dialect = metrics_writer.dialect
        self._upsert = INSERTS[dialect]
        self._runs = SqlRun.__table__
        self._tags = SqlTag.__table__
        self._params = SqlParam.__table__
        self._experiments = SqlExperiment.__table__
        self._cond = threading.Condition()
        self._queue: list[_Entry] = []
        self._leading = False

    @property
    def unavailable(self) -> str | None:
        return self.metrics.unavailable

    def submit(self, work: RunWork) -> bool:
        """Store ``work`` with whatever other threads submit meanwhile, in one transaction:
        True once stored, False when it must go through MLflow's API (nothing of it stored);
        raises as :meth:`write` raises, for the whole group."""
        if not work.small:
            return self.write([work])[0]
        entry = _Entry(work)
        with self._cond:
            self._queue.append(entry)
            while not entry.done and self._leading:
                self._cond.wait()
            group = None
            if not entry.done:
                self._leading = True
                group, self._queue = self._queue, []
        if group is not None:
            try:
                outcomes: list[bool | BaseException] = list(self.write([e.work for e in group]))
            except BaseException as exc:
                outcomes = [exc] * len(group)
            with self._cond:
                for each, outcome in zip(group, outcomes, strict=True):
                    each.outcome, each.done = outcome, True
                self._leading = False
                self._cond.notify_all()
        if isinstance(entry.outcome, BaseException):
            raise entry.outcome
        return bool(entry.outcome)

    def write(self, works: Sequence[RunWork]) -> list[bool]:
        """Store every run of ``works`` that the writer takes, in ONE transaction; per run,
        True (stored, or found stored by an earlier attempt) or False (not taken)."""
        prepared: list[_Prepared | None] = []
        for work in works:
            try:
                prepared.append(_prepare(work, self.metrics))
            except NotTaken:
                prepared.append(None)
        taken = [p for p in prepared if p is not None]
        if not taken:
            return [False] * len(works)
        # The revision at each group: a store migrated under a running client is met at its
        # next group (and by the metrics path at its own first transaction).
        with self.metrics.transaction(each=True) as conn:
            written = self._check(conn, taken)
            self._store(conn, [p for p in taken if written.get(id(p)) is None])
        return [p is not None and written.get(id(p)) is not False for p in prepared]

    def _check(self, conn: sqlalchemy.engine.Connection, taken: list[_Prepared]) -> dict[int, bool]:
        """Per prepared run that is not stored now: True (an earlier attempt stored it) or
        False (MLflow's calls would fail or differ: not taken). Sets creations'
        artifact_uri."""
        runs, experiments, params = self._runs.c, self._experiments.c, self._params.c
        ids = [p.work.run_id for p in taken]
        stages: dict[str, str] = dict(
            conn.execute(
                sqlalchemy.select(runs.run_uuid, runs.lifecycle_stage).where(runs.run_uuid.in_(ids))
            ).all()
        )
        wanted = {p.run["experiment_id"] for p in taken if p.run is not None}
        found = {
            row[0]: row[1:]
            for row in conn.execute(
                sqlalchemy.select(
                    experiments.experiment_id,
                    experiments.lifecycle_stage,
                    experiments.artifact_location,
                ).where(experiments.experiment_id.in_(wanted))
            ).all()
        }
        known = [p.work.run_id for p in taken if p.run is None and p.params]
        stored: dict[str, dict[str, str]] = {}
        if known:
            query = sqlalchemy.select(params.run_uuid, params.key, params.value)
            for run_id, key, value in conn.execute(query.where(params.run_uuid.in_(known))):
                stored.setdefault(run_id, {})[key] = value
        outcome: dict[int, bool] = {}
        for p in taken:
            run_id = p.work.run_id
            assert run_id is not None
            if p.run is not None:
                if run_id in stages:  # this creation's earlier attempt committed
                    outcome[id(p)] = True
                    continue
                experiment = found.get(p.run["experiment_id"])
                if experiment is None or experiment[0] != LifecycleStage.ACTIVE:
                    outcome[id(p)] = False
                    continue
                p.run["artifact_uri"] = append_to_uri_path(experiment[1], run_id, "artifacts")
            elif stages.get(run_id) != LifecycleStage.ACTIVE:
                outcome[id(p)] = False
            else:
                held = stored.get(run_id, {})
                if any(held.get(key, value) != value for key, value in p.params.items()):
                    outcome[id(p)] = False
                else:
                    p.params = {k: v for k, v in p.params.items() if k not in held}
        return outcome

    def _store(self, conn: sqlalchemy.engine.Connection, runs: list[_Prepared]) -> None:
        """Insert the runs, their tags, params and metrics; terminate the existing runs."""
        new = []
        for p in runs:
            if p.run is not None:
                row = dict(p.run)
                if p.status is not None:  # set_terminated right after: its final row
                    row["status"], row["end_time"] = p.status
                new.append(row)
        self._insert(conn, sqlalchemy.insert(self._runs), new)
        tags = [
            {"key": key, "value": value, "run_uuid": p.work.run_id}
            for p in runs
            for key, value in p.tags.items()
        ]
        upsert = self._upsert(self._tags)
        upsert = upsert.on_conflict_do_update(
            index_elements=[self._tags.c.key, self._tags.c.run_uuid],
            set_={"value": upsert.excluded.value},
        )
        self._insert(conn, upsert, tags)
        params = [
            {"key": key, "value": value, "run_uuid": p.work.run_id}
            for p in runs
            for key, value in p.params.items()
        ]
        self._insert(conn, sqlalchemy.insert(self._params), params)
        # The n-th batches of all runs at once, in order: a run's latest values go through
        # each batch's as MLflow's calls write them (a stored -0.0 an equal 0.0 leaves as is).
        for depth in range(max((len(p.metrics) for p in runs), default=0)):
            metrics = [row for p in runs if depth < len(p.metrics) for row in p.metrics[depth]]
            if metrics:
                self.metrics.store_rows(conn, metrics)
        for p in runs:
            if p.run is None and p.status is not None:
                status, end_time = p.status
                conn.execute(
                    sqlalchemy.update(self._runs)
                    .where(self._runs.c.run_uuid == p.work.run_id)
                    .values(status=status, end_time=end_time)
                )

    def _insert(
        self,
        conn: sqlalchemy.engine.Connection,
        statement: Any,
        rows: list[dict[str, Any]],
    ) -> None:
        """``rows`` in multi-row INSERTs (one statement per chunk, not one per row)."""
        for start in range(0, len(rows), _ROWS_PER_INSERT):
            conn.execute(statement.values(rows[start : start + _ROWS_PER_INSERT]))


@dataclass
class _Entry:
    work: RunWork
    done: bool = False
    outcome: bool | BaseException = False
