"""Property tests of the batch plan: limits, order, nothing lost, and the seed's exact plan."""

from __future__ import annotations

from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.autologging_utils.client import (
    MlflowAutologgingQueueingClient as SeedClient,
)
from mlflow.utils.autologging_utils.client import (
    _PendingCreateRun,
    _PendingRunOperations,
    _PendingSetTerminated,
)
from mlflow.utils.validation import (
    MAX_DATASETS_PER_BATCH,
    MAX_ENTITIES_PER_BATCH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
)

from actors.queueing import (
    CreateRunCall,
    LogBatchCall,
    LogInputsCall,
    SetTerminatedCall,
    Terminate,
    plan_batches,
)
from actors.queueing import (
    CreateRunCall as CreateRun,
)

sizes = st.fixed_dictionaries(
    {
        "create_tags": st.one_of(st.none(), st.integers(0, 1100)),
        "params": st.integers(0, 450),
        "tags": st.integers(0, 1500),
        "metrics": st.integers(0, 4500),
        "datasets": st.integers(0, 2100),
        "terminate": st.booleans(),
    }
)


def make_inputs(s: dict) -> tuple:
    create = (
        None
        if s["create_tags"] is None
        else CreateRun("0", None, [(f"ct{i}", "v") for i in range(s["create_tags"])], "name")
    )
    params = [(f"p{i}", "v") for i in range(s["params"])]
    tags = [(f"t{i}", "v") for i in range(s["tags"])]
    metrics = [(f"m{i}", float(i), 0, i, None, None, None) for i in range(s["metrics"])]
    datasets = [f"d{i}" for i in range(s["datasets"])]
    terminate = Terminate("FINISHED", 1) if s["terminate"] else None
    return create, params, tags, metrics, datasets, terminate


@settings(max_examples=300, deadline=None)
@given(sizes)
def test_plan_respects_limits_keeps_order_and_loses_nothing(s):
    create, params, tags, metrics, datasets, terminate = make_inputs(s)
    calls = plan_batches(create, params, tags, metrics, datasets, terminate)

    got = {"params": [], "tags": [], "metrics": [], "datasets": []}
    for index, call in enumerate(calls):
        if isinstance(call, CreateRunCall):
            assert index == 0
            assert len(call.tags) <= max(len(create.tags), MAX_ENTITIES_PER_BATCH)
            assert call.run_name == "name"
            got["tags"] += call.tags
        elif isinstance(call, LogBatchCall):
            assert len(call.metrics) <= MAX_METRICS_PER_BATCH
            assert len(call.params) <= MAX_PARAMS_TAGS_PER_BATCH
            assert len(call.tags) <= MAX_PARAMS_TAGS_PER_BATCH
            assert len(call.metrics) + len(call.params) + len(call.tags) <= MAX_ENTITIES_PER_BATCH
            got["params"] += call.params
            got["tags"] += call.tags
            got["metrics"] += call.metrics
        elif isinstance(call, LogInputsCall):
            assert 0 < len(call.datasets) <= MAX_DATASETS_PER_BATCH
            got["datasets"] += call.datasets
        else:
            assert isinstance(call, SetTerminatedCall)
            assert index == len(calls) - 1

    expected_tags = (create.tags if create else []) + tags
    assert got == {
        "params": params,
        "tags": expected_tags,
        "metrics": metrics,
        "datasets": datasets,
    }
    assert (create is not None) == isinstance(calls[0] if calls else None, CreateRunCall)
    assert sum(isinstance(c, SetTerminatedCall) for c in calls) == (terminate is not None)
    # No empty log_batch unless the seed would make one (never, for non-empty inputs).
    assert all(c.metrics or c.params or c.tags for c in calls if isinstance(c, LogBatchCall))


class Recorder:
    """Stands in for MlflowClient inside the seed client, recording the calls it makes."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def create_run(self, experiment_id, start_time, tags):
        self.calls.append(("create_run", sorted(tags)))
        return SimpleNamespace(info=SimpleNamespace(run_id="r"))

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self.calls.append(
            ("log_batch", [m.key for m in metrics], [p.key for p in params], [t.key for t in tags])
        )

    def log_inputs(self, run_id, datasets):
        self.calls.append(("log_inputs", list(datasets)))

    def set_terminated(self, run_id, status, end_time):
        self.calls.append(("set_terminated", status, end_time))


def seed_plan(create, params, tags, metrics, datasets, terminate) -> list[tuple]:
    seed = SeedClient.__new__(SeedClient)
    seed._client = Recorder()
    ops = _PendingRunOperations(run_id="r")
    if create is not None:
        ops.create_run = _PendingCreateRun(
            create.experiment_id, create.start_time, [RunTag(k, v) for k, v in create.tags], None
        )
    ops.params_queue = [Param(k, v) for k, v in params]
    ops.tags_queue = [RunTag(k, v) for k, v in tags]
    ops.metrics_queue = [Metric(r[0], r[1], r[2], r[3]) for r in metrics]
    ops.datasets_queue = list(datasets)
    if terminate is not None:
        ops.set_terminated = _PendingSetTerminated(terminate.status, terminate.end_time)
    seed._flush_pending_operations(ops)
    return seed._client.calls


def our_plan(create, params, tags, metrics, datasets, terminate) -> list[tuple]:
    out: list[tuple] = []
    for call in plan_batches(create, params, tags, metrics, datasets, terminate):
        if isinstance(call, CreateRunCall):
            out.append(("create_run", sorted(k for k, _ in call.tags)))
        elif isinstance(call, LogBatchCall):
            out.append(
                (
                    "log_batch",
                    [m[0] for m in call.metrics],
                    [k for k, _ in call.params],
                    [k for k, _ in call.tags],
                )
            )
        elif isinstance(call, LogInputsCall):
            out.append(("log_inputs", list(call.datasets)))
        else:
            out.append(("set_terminated", call.status, call.end_time))
    return out


@settings(max_examples=150, deadline=None)
@given(sizes)
def test_plan_is_the_seed_clients_plan_call_for_call(s):
    inputs = make_inputs(s)
    assert our_plan(*inputs) == seed_plan(*inputs)


def test_plan_of_nothing_is_empty():
    assert plan_batches(None, [], [], [], [], None) == []
