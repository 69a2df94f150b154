"""Whole runs through the SQL fast path (``actors.delivery._sql_runs``) store exactly what
MLflow's own ``create_run`` / ``log_batch`` / ``set_terminated`` store: random rounds of
several runs (new ones, ones already there, creations into a missing or deleted experiment,
runs deleted, params that change, MLflow's tags, terminations) go through MLflow's client on
one side and through the writer, as one group, on the other (the runs it does not take then
through MLflow's client, as ``actors.delivery._perform`` sends them). Every row of ``runs``,
``tags``, ``params``, ``metrics`` and ``latest_metrics`` is compared, generated IDs, names
and times aside, and so are the experiments' last update, each call's success, and MLflow's
reading APIs (``get_run``, ``search_runs`` with a filter and an order, ``get_metric_history``).
On SQLite and on a real PostgreSQL 15 server.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from actors.delivery._dispatch import _send
from actors.delivery._run_work import whole_run
from actors.delivery._sql_policy import ENV_SWITCH, fast_metrics_writer
from actors.delivery._sql_runs import SqlRunsWriter
from actors.queueing._plan import Call, LogBatchCall, SetTerminatedCall
from actors.queueing._queues import CreateRunCall


@pytest.fixture(params=["sqlite", "postgresql"])
def sql_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("template_db")
        db = tmp_path / "mlflow.db"
        db.write_bytes(template.read_bytes())
        return f"sqlite:///{db}"
    return str(request.getfixturevalue("postgres_uri"))


@pytest.fixture
def client(sql_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    monkeypatch.chdir(tmp_path)  # experiments' artifact locations in the test's folder
    made = MlflowClient(sql_uri)
    yield made
    made._tracking_client.store.engine.dispose()


# -- the random rounds ----------------------------------------------------------------

TARGETS = ("new", "new", "new", "missing", "deleted", "existing", "existing", "deleted_run")


@dataclass
class Spec:
    """One run of a round: where it goes, what it is created with, its calls."""

    target: str
    tags: dict[str, str]
    run_name: str | None
    start_time: int | None
    stored_param: bool  # an existing run holds p0 = "stored"
    batches: list[LogBatchCall]
    terminate: SetTerminatedCall | None


_values = st.sampled_from([0.5, 1.0, -0.0, 2, math.nan, math.inf, 1e300, 0.25])
_metric = st.tuples(
    st.sampled_from(["m0", "m1", "loss"]),
    _values,
    st.integers(0, 3),
    st.integers(0, 3),
    st.none(),
    st.none(),
    st.none(),
)
_batch = st.builds(
    LogBatchCall,
    metrics=st.lists(_metric, max_size=6),
    params=st.dictionaries(
        st.sampled_from(["p0", "p1", "p2"]), st.sampled_from(["1", "2", "stored"]), max_size=2
    ).map(lambda d: list(d.items())),
    tags=st.lists(
        st.tuples(st.sampled_from(["team", "t1", "mlflow.note.content"]), st.sampled_from("ab")),
        max_size=3,
    ),
).filter(lambda call: bool(call.metrics or call.params or call.tags))
_create_tags = st.dictionaries(
    st.sampled_from(
        ["mlflow.user", "mlflow.source.name", "mlflow.source.type", "team", "mlflow.runName"]
    ),
    st.sampled_from(["alice", "train.py", "LOCAL", "a", "named"]),
    max_size=4,
)
_specs = st.builds(
    Spec,
    target=st.sampled_from(TARGETS),
    tags=_create_tags,
    run_name=st.sampled_from([None, None, "named", "other"]),
    start_time=st.sampled_from([None, 0, 1_700_000_000_000]),
    stored_param=st.booleans(),
    batches=st.lists(_batch, max_size=3),
    terminate=st.one_of(
        st.none(),
        st.builds(
            SetTerminatedCall,
            status=st.sampled_from([None, "FINISHED", "FAILED", "KILLED"]),
            end_time=st.sampled_from([None, 5, 1_700_000_000_001]),
        ),
    ),
)


def _nan_after_minus_zero(batch: int) -> LogBatchCall:
    return LogBatchCall(
        [("m0", [-0.0, math.nan][batch], 3, 1 + 2 * batch, None, None, None)], [], []
    )


def _spec(
    target: str, params: list[tuple[str, str]] | None = None, more: list[tuple[str, str]] = ()
) -> Spec:
    """A run for the explicit examples: one metric, ``params``, a second batch of ``more``."""
    batches = [LogBatchCall([("m0", 1.0, 1, 0, None, None, None)], params or [], [("t1", "a")])]
    if more:
        batches.append(LogBatchCall([], list(more), []))
    end = SetTerminatedCall("FAILED", None)
    return Spec(target, {"mlflow.user": "alice"}, "named", None, True, batches, end)


class Side:
    """One side's experiments (an active one, a deleted one) and runs already there."""

    def __init__(self, client: Any, name: str) -> None:
        self.client = client
        self.experiment = client.create_experiment(f"{name}-{uuid.uuid4().hex}")
        self.deleted = client.create_experiment(f"{name}-deleted-{uuid.uuid4().hex}")
        client.delete_experiment(self.deleted)
        self.labels = {self.experiment: "E", self.deleted: "D"}

    def job(self, spec: Spec) -> tuple[str | None, list[Call]]:
        """The run's ID (for a run already there) and its calls."""
        calls: list[Call] = []
        run_id = None
        if spec.target.startswith("existing") or spec.target == "deleted_run":
            run_id = self.client.create_run(self.experiment, start_time=7, run_name="x").info.run_id
            if spec.stored_param:
                self.client.log_param(run_id, "p0", "stored")
            if spec.target == "deleted_run":
                self.client.delete_run(run_id)
        else:
            experiment = {"new": self.experiment, "deleted": self.deleted}.get(
                spec.target, "999999"
            )
            calls.append(
                CreateRunCall(
                    experiment,
                    spec.start_time,
                    list(spec.tags.items()),
                    spec.run_name,
                    str(uuid.uuid4()),
                )
            )
        calls.extend(spec.batches)
        if spec.terminate is not None:
            calls.append(spec.terminate)
        return run_id, calls


def mlflow_calls(
    client: Any, run_id: str | None, calls: list[Call]
) -> tuple[str | None, list[bool]]:
    """The calls through MLflow's client, as runactors' per-call loop makes them: the run's
    ID and each call's success."""
    done: list[bool] = []
    for call in calls:
        try:
            if isinstance(call, CreateRunCall):
                run_id = client.create_run(
                    call.experiment_id, call.start_time, dict(call.tags), call.run_name
                ).info.run_id
            elif run_id is None:
                done.append(False)
                continue
            else:
                _send(client, run_id, call)
        except MlflowException:
            done.append(False)
        else:
            done.append(True)
    return run_id, done


# -- reading both sides back ----------------------------------------------------------


def _table(client: Any, table: str, run_id: str) -> list[dict[str, Any]]:
    with client._tracking_client.store.engine.connect() as conn:
        rows = conn.execute(
            sqlalchemy.text(f"SELECT * FROM {table} WHERE run_uuid = :r"), {"r": run_id}
        ).mappings()
        return sorted(
            (
                {
                    k: (repr(v) if isinstance(v, float) else v)  # -0.0 and 0.0 told apart
                    for k, v in row.items()
                    if k != "run_uuid"
                }
                for row in rows
            ),
            key=repr,
        )


def _normal(side: Side, spec: Spec, run_id: str, since: int, until: int) -> dict[str, Any]:
    """Every row of the run, with what MLflow generates (ID, random name, times of "now",
    the experiment's ID in the artifact URI) replaced by labels."""
    client = side.client
    rows = {t: _table(client, t, run_id) for t in ("tags", "params", "metrics", "latest_metrics")}
    (run,) = _table(client, "runs", run_id)
    random_name = (
        spec.target in ("new",) and not spec.run_name and "mlflow.runName" not in spec.tags
    )

    def now(value: Any) -> Any:
        return "NOW" if isinstance(value, int) and since <= value <= until else value

    experiment = str(run["experiment_id"])
    location = client.get_experiment(experiment).artifact_location
    run["artifact_uri"] = run["artifact_uri"].replace(location, "LOCATION").replace(run_id, "ID")
    run["experiment_id"] = side.labels.get(experiment, experiment)
    for column in ("start_time", "end_time", "deleted_time"):
        run[column] = now(run[column])
    if random_name:
        name = run["name"]
        run["name"] = "RANDOM"
        rows["tags"] = [
            {**tag, "value": "RANDOM"} if tag["value"] == name else tag for tag in rows["tags"]
        ]
    return {"run": run, **rows}


def _reading(side: Side, spec: Spec, run_id: str) -> Any:
    run = side.client.get_run(run_id)
    histories = {
        key: sorted(
            (repr(m.value), m.timestamp, m.step)
            for m in side.client.get_metric_history(run_id, key)
        )
        for key in run.data.metrics
    }
    metrics = {k: repr(v) for k, v in run.data.metrics.items()}
    return (run.info.status, run.info.lifecycle_stage, metrics, run.data.params, histories)


def _search(side: Side, ids: list[str | None], since: int, until: int) -> list[Any]:
    """Searches with a filter and an order: the order's keys in the order found (runs equal
    by them are ordered by their random IDs), and which runs were found (spec indices)."""
    index = {run_id: i for i, run_id in enumerate(ids) if run_id is not None}
    found = []
    for filter_string in ("attributes.status != 'KILLED'", "params.p1 = '1'"):
        runs = side.client.search_runs(
            [side.experiment],
            filter_string=filter_string,
            order_by=["metrics.m0 DESC", "attributes.end_time ASC"],
        )
        end = [r.info.end_time for r in runs]
        found.append(
            [
                (repr(r.data.metrics.get("m0")), "NOW" if e and since <= e <= until else e)
                for r, e in zip(runs, end, strict=True)
            ]
        )
        found.append(sorted(index.get(r.info.run_id, -1) for r in runs))
    return found


def _experiment_times(side: Side) -> list[int]:
    return [side.client.get_experiment(e).last_update_time for e in (side.experiment, side.deleted)]


@settings(
    max_examples=12,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # a shrink takes minutes here
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(specs=st.lists(_specs, min_size=1, max_size=5))
# Each failure next to runs that go through: a param whose stored value changes, a param
# changed between two batches, a missing and a deleted experiment, a deleted run.
@example(specs=[_spec("existing", params=[("p0", "1")]), _spec("new", params=[("p1", "1")])])
@example(specs=[_spec("new", params=[("p1", "1")], more=[("p1", "2")]), _spec("existing")])
@example(specs=[_spec("missing"), _spec("new"), _spec("deleted"), _spec("deleted_run")])
# A latest value -0.0 from one batch, then a NaN (stored as 0) from the next: MLflow's ORM
# leaves the equal -0.0 (PostgreSQL tells them apart); found by the generated rounds.
@example(
    specs=[
        Spec("new", {}, None, 0, False, [_nan_after_minus_zero(0), _nan_after_minus_zero(1)], None)
    ]
)
def test_whole_runs_store_what_mlflow_stores(client: Any, specs: list[Spec]) -> None:
    store = client._tracking_client.store
    writer = fast_metrics_writer(store)
    assert writer is not None
    runs_writer = SqlRunsWriter(writer)
    by_mlflow, by_fast = Side(client, "mlflow"), Side(client, "fast")
    since = int(time.time() * 1000)
    jobs_mlflow = [by_mlflow.job(spec) for spec in specs]
    jobs_fast = [by_fast.job(spec) for spec in specs]
    before = _experiment_times(by_mlflow), _experiment_times(by_fast)

    outcome_mlflow = [mlflow_calls(client, run_id, calls) for run_id, calls in jobs_mlflow]

    works = [whole_run(run_id, calls) for run_id, calls in jobs_fast]
    taken = runs_writer.write([w for w in works if w is not None])
    stored = iter(taken)
    outcome_fast = []
    for work, (run_id, calls) in zip(works, jobs_fast, strict=True):
        if work is not None and next(stored):
            outcome_fast.append((work.run_id, [True] * len(calls)))
        else:  # not taken: MLflow's calls, as actors.delivery._perform sends them
            outcome_fast.append(mlflow_calls(client, run_id, calls))
    until = int(time.time() * 1000)

    assert [o[1] for o in outcome_fast] == [o[1] for o in outcome_mlflow]
    assert (_experiment_times(by_mlflow), _experiment_times(by_fast)) == before
    for spec, (id_mlflow, _), (id_fast, _) in zip(specs, outcome_mlflow, outcome_fast, strict=True):
        assert (id_mlflow is None) == (id_fast is None)
        if id_mlflow is None or id_fast is None:
            continue
        assert _normal(by_fast, spec, id_fast, since, until) == _normal(
            by_mlflow, spec, id_mlflow, since, until
        )
        assert _reading(by_fast, spec, id_fast) == _reading(by_mlflow, spec, id_mlflow)
    assert _search(by_fast, [o[0] for o in outcome_fast], since, until) == _search(
        by_mlflow, [o[0] for o in outcome_mlflow], since, until
    )
    # Nothing else landed: as many runs on each side.
    counts = [
        len(client.search_runs([side.experiment, side.deleted], run_view_type=ViewType.ALL))
        for side in (by_mlflow, by_fast)
    ]
    assert counts[0] == counts[1]


def test_a_creation_retried_after_it_landed_makes_one_run(client: Any) -> None:
    """The run's ID is its create key's: a second attempt (the first one's answer lost)
    finds it and stores nothing again."""
    writer = fast_metrics_writer(client._tracking_client.store)
    assert writer is not None
    runs_writer = SqlRunsWriter(writer)
    experiment = client.create_experiment(f"again-{uuid.uuid4().hex}")
    calls: list[Call] = [
        CreateRunCall(experiment, 5, [("team", "a")], "once", str(uuid.uuid4())),
        LogBatchCall([("m", 1.0, 1, 0, None, None, None)], [("p", "1")], []),
        SetTerminatedCall(None, None),
    ]
    work = whole_run(None, calls)
    assert work is not None
    assert runs_writer.write([work]) == [True]
    assert runs_writer.write([work]) == [True]
    (run,) = client.search_runs([experiment])
    assert run.info.run_id == work.run_id
    assert run.data.params == {"p": "1"} and run.info.status == "FINISHED"


def test_a_sweep_goes_through_whole_and_a_failing_run_fails_alone(
    tracking_uri: str, experiment_id: str, store: MlflowClient, executor: str
) -> None:
    """Through the client, on both executors: a round of short runs is stored whole (status
    says "on"), each exactly once; a run into a deleted experiment fails with MLflow's own
    error, the others of its round unaffected."""
    from client import QueueingClient

    deleted = store.create_experiment("deleted")
    store.delete_experiment(deleted)
    client = QueueingClient(tracking_uri, executor=executor, max_workers=2)  # type: ignore[arg-type]
    try:
        runs = [
            client.create_run(experiment_id, run_name=f"r{i}", tags={"t": "x"}) for i in range(12)
        ]
        lost = client.create_run(deleted, run_name="lost")
        for i, run in enumerate([*runs, lost]):
            client.log_params(run, {"lr": str(i)})
            client.log_metrics(run, {"loss": i / 3, "acc": 1.0}, step=i)
            client.set_terminated(run, status="FAILED" if i % 5 == 0 else "FINISHED")
        with pytest.raises(
            MlflowException, match=r"experiment \d+ must be in the .+active.+ state"
        ):
            client.flush()
        statuses = client.status().runs
    finally:
        client.close()
    stored = store.search_runs([experiment_id], order_by=["params.lr ASC"])
    assert sorted(r.info.run_name for r in stored) == sorted(f"r{i}" for i in range(12))
    for run in stored:
        i = int(run.info.run_name[1:])
        assert run.data.params == {"lr": str(i)}
        assert run.data.metrics == {"loss": i / 3, "acc": 1.0}
        assert run.data.tags == {"t": "x", "mlflow.runName": f"r{i}"}
        assert run.info.status == ("FAILED" if i % 5 == 0 else "FINISHED")
    assert store.search_runs([deleted], run_view_type=ViewType.ALL) == []
    assert [s.sql_fast_path for s in statuses[:12]] == ["on"] * 12
    assert statuses[12].errors and "Current state is deleted" in statuses[12].errors[0]


def test_the_spool_finds_a_run_the_fast_path_made_by_its_id(client: Any, sql_uri: str) -> None:
    """A creation re-sent from the spool is looked up first: the run the fast path made (with
    metrics already, so no longer "fresh") is found by its create key's ID, not made twice."""
    from actors.delivery._create_key import find_created_run

    writer = fast_metrics_writer(client._tracking_client.store)
    assert writer is not None
    experiment = client.create_experiment(f"spool-{uuid.uuid4().hex}")
    key = str(uuid.uuid4())
    create = CreateRunCall(experiment, 5, [("team", "a")], "spooled", key)
    work = whole_run(None, [create, LogBatchCall([("m", 1.0, 1, 0, None, None, None)], [], [])])
    assert work is not None
    assert find_created_run(client, sql_uri, create, key) is None
    assert SqlRunsWriter(writer).write([work]) == [True]
    assert find_created_run(client, sql_uri, create, key) == uuid.UUID(key).hex == work.run_id
