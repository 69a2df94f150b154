"""Batch planning: turn one run's queued operations into tracking calls within MLflow's limits.

A pure function, kept apart from the actors so that it can be tested exhaustively. The plan
is the seed client's (``mlflow.utils.autologging_utils.client``), call for call:

1. ``create_run``, carrying the queued tags up to ``MAX_ENTITIES_PER_BATCH`` in all;
2. ``log_batch`` calls pairing chunks of ``MAX_PARAMS_TAGS_PER_BATCH`` params and tags, each
   topped up with metrics to ``MAX_ENTITIES_PER_BATCH`` entities (at most
   ``MAX_METRICS_PER_BATCH`` metrics);
3. ``log_batch`` calls with the remaining metrics, ``MAX_METRICS_PER_BATCH`` at a time;
4. ``log_inputs`` calls, ``MAX_DATASETS_PER_BATCH`` datasets at a time;
5. ``set_terminated``, last.
"""

from __future__ import annotations

from itertools import zip_longest
from typing import Any, NamedTuple, TypeVar

from mlflow.utils.validation import (
    MAX_DATASETS_PER_BATCH,
    MAX_ENTITIES_PER_BATCH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
)

from actors.queueing._queues import CreateRunCall, MetricRow, Pair, Snapshot, Terminate

T = TypeVar("T")


class LogBatchCall(NamedTuple):
    metrics: list[MetricRow]
    params: list[Pair]
    tags: list[Pair]


class LogInputsCall(NamedTuple):
    datasets: list[Any]


class SetTerminatedCall(NamedTuple):
    status: str | None
    end_time: int | None


Call = CreateRunCall | LogBatchCall | LogInputsCall | SetTerminatedCall


def _chunks(items: list[T], size: int) -> list[list[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def call_kind(call: Call) -> str:
    """How messages name a call: ``LogBatch``, ``CreateRun``, ``SetTerminated``, ``LogInputs``."""
    return type(call).__name__.removesuffix("Call")


def plan_batches(
    create: CreateRunCall | None,
    params: list[Pair],
    tags: list[Pair],
    metrics: list[MetricRow],
    datasets: list[Any],
    terminate: Terminate | None,
) -> list[Call]:
    """Return the tracking calls that deliver these operations, in the order to make them.

    >>> calls = plan_batches(None, [("p", "1")], [], [("m", 1.0, 0, 0, None, None, None)], [], None)
    >>> [type(c).__name__ for c in calls]
    ['LogBatchCall']
    """
    calls: list[Call] = []
    if create is not None:
        room = max(MAX_ENTITIES_PER_BATCH - len(create.tags), 0)
        calls.append(
            CreateRunCall(
                create.experiment_id,
                create.start_time,
                create.tags + tags[:room],
                create.run_name,
                create.create_key,
            )
        )
        tags = tags[room:]

    position = 0
    params_batch: list[Pair]
    tags_batch: list[Pair]
    for params_batch, tags_batch in zip_longest(
        _chunks(params, MAX_PARAMS_TAGS_PER_BATCH),
        _chunks(tags, MAX_PARAMS_TAGS_PER_BATCH),
        fillvalue=[],
    ):
        entities = len(params_batch) + len(tags_batch)
        room = max(min(MAX_ENTITIES_PER_BATCH - entities, MAX_METRICS_PER_BATCH), 0)
        calls.append(LogBatchCall(metrics[position : position + room], params_batch, tags_batch))
        position += room

    calls.extend(
        LogBatchCall(chunk, [], []) for chunk in _chunks(metrics[position:], MAX_METRICS_PER_BATCH)
    )
    calls.extend(LogInputsCall(chunk) for chunk in _chunks(datasets, MAX_DATASETS_PER_BATCH))
    if terminate is not None:
        calls.append(SetTerminatedCall(terminate.status, terminate.end_time))
    return calls


def plan_snapshot(snapshot: Snapshot) -> list[Call]:
    """:func:`plan_batches` for everything in a :class:`~actors.queueing._queues.Snapshot`."""
    return plan_batches(
        snapshot.create,
        snapshot.params,
        snapshot.tags,
        snapshot.metrics,
        snapshot.datasets,
        snapshot.terminate,
    )
