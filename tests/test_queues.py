"""A run's queues: what each kind of append does in each of the three queue classes (plain,
counted by ``max_queued``, watched for full batches), one short unit test per behaviour."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

from actors.queueing import BoundedRunQueues, Budget, RunQueues, WatchedRunQueues

KINDS = ("params", "tags", "datasets")


def _queues(cls: type[RunQueues], limit: int = 1000) -> RunQueues:
    if cls is RunQueues:
        return RunQueues()
    return cls(None, Budget(limit, timeout=0.0))  # type: ignore[call-arg]


def _add(queues: RunQueues, kind: str, items: list) -> None:
    getattr(queues, f"add_{kind}")(items)


CLASSES = [RunQueues, BoundedRunQueues, WatchedRunQueues]


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("kind", KINDS)
def test_appends_keep_order_and_a_sealed_queue_refuses(cls, kind):
    queues = _queues(cls)
    _add(queues, kind, [("a", "1"), ("b", "2")])
    _add(queues, kind, [("c", "3")])
    assert getattr(queues.take(), kind) == [("a", "1"), ("b", "2"), ("c", "3")]
    queues.seal()
    with pytest.raises(MlflowException, match="closed"):
        _add(queues, kind, [("d", "4")])
    assert not queues.has_work()


@pytest.mark.parametrize("cls", CLASSES)
def test_a_param_repeated_is_queued_once_and_a_changed_one_queues_nothing(cls):
    queues = _queues(cls)
    queues.add_params([("a", "1")])
    queues.add_params([("a", "1"), ("b", "2")])
    with pytest.raises(MlflowException, match="'a'"):
        queues.add_params([("c", "3"), ("a", "other")])
    assert queues.take().params == [("a", "1"), ("b", "2")]
    assert [queues.params_memory.get(key) for key in "abc"] == ["1", "2", None]


@pytest.mark.parametrize("cls", [BoundedRunQueues, WatchedRunQueues])
@pytest.mark.parametrize("kind", KINDS)
def test_max_queued_counts_every_kind_and_refuses_what_does_not_fit(cls, kind):
    queues = _queues(cls, limit=3)
    budget = queues._budget  # type: ignore[attr-defined]
    _add(queues, kind, [("a", "1"), ("b", "2")])
    assert budget.held == 2
    with pytest.raises(MlflowException, match="max_queued=3"):
        _add(queues, kind, [("c", "3"), ("d", "4")])  # no flush makes room: timeout 0
    assert budget.held == 2
    queues.release(queues.take())
    assert budget.held == 0


@pytest.mark.parametrize("kind", ["params", "tags"])
def test_a_full_batch_of_params_and_tags_asks_for_a_flush_once(kind):
    queues = _queues(WatchedRunQueues, limit=10 * MAX_PARAMS_TAGS_PER_BATCH)
    calls: list[int] = []
    queues.on_full = lambda: calls.append(1)  # type: ignore[attr-defined]
    other = "tags" if kind == "params" else "params"
    _add(queues, other, [(f"o{i}", "v") for i in range(MAX_PARAMS_TAGS_PER_BATCH - 1)])
    assert calls == []
    _add(queues, kind, [("last", "v")])  # params and tags share the batch limit
    assert calls == [1]
    _add(queues, kind, [("more", "v")])
    assert calls == [1]  # once, until the next take
    queues.take()
    _add(queues, kind, [(f"n{i}", "v") for i in range(MAX_PARAMS_TAGS_PER_BATCH)])
    assert calls == [1, 1]


def test_datasets_never_ask_for_a_flush():
    queues = _queues(WatchedRunQueues, limit=10 * MAX_PARAMS_TAGS_PER_BATCH)
    calls: list[int] = []
    queues.on_full = lambda: calls.append(1)  # type: ignore[attr-defined]
    queues.add_datasets([("d", str(i)) for i in range(2 * MAX_PARAMS_TAGS_PER_BATCH)])
    assert calls == []
