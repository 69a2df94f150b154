"""What the whole-run writer (:mod:`actors.delivery._sql_runs`) takes of a job: its calls as
a :class:`RunWork`, or None. Pure and free of MLflow's private names, so that a pool thread
can sort jobs into groups without importing the writer (which an MLflow that renamed one
of them cannot import: the fast path is then off, said once, in the process that writes).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME
from mlflow.utils.validation import (
    MAX_ENTITIES_PER_BATCH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
)

from actors.queueing._plan import Call, LogBatchCall, SetTerminatedCall
from actors.queueing._queues import CreateRunCall

GROUP_ENTITIES = MAX_ENTITIES_PER_BATCH  # the most metrics, params and tags of a grouped run


@dataclass
class RunWork:
    """One run's calls of a round, as the writer takes them: an optional creation, batches,
    an optional termination, in that order (what :func:`whole_run` accepts)."""

    run_id: str | None  # the run's ID; for a creation, the ID it gets
    create: CreateRunCall | None
    batches: list[LogBatchCall]
    terminate: SetTerminatedCall | None

    @property
    def small(self) -> bool:
        """Whether the run may share a transaction with others: a long run's round is
        written alone, so that it never delays a short run (as without groups)."""
        size = sum(len(c.metrics) + len(c.params) + len(c.tags) for c in self.batches)
        return size <= GROUP_ENTITIES


def _fits_one_call(call: LogBatchCall) -> bool:
    """Whether MLflow's client sends ``call`` as ONE store ``log_batch`` (it cuts bigger
    ones, which then fail or land in parts), with no metric for a logged model and no
    ``mlflow.runName`` tag (MLflow renames the run for it)."""
    params, tags = len(call.params), len(call.tags)
    room = min(MAX_ENTITIES_PER_BATCH - params - tags, MAX_METRICS_PER_BATCH)
    return (
        params <= MAX_PARAMS_TAGS_PER_BATCH
        and tags <= MAX_PARAMS_TAGS_PER_BATCH
        and len(call.metrics) <= max(room, 0)
        and all(metric[4] is None for metric in call.metrics)
        and all(key != MLFLOW_RUN_NAME for key, _ in call.tags)
    )


def whole_run(run_id: str | None, calls: Sequence[Call]) -> RunWork | None:
    """The calls of one job as a :class:`RunWork`, or None when the writer cannot take them
    (other calls, such as ``log_inputs``; a batch that is not one store call)."""
    calls = list(calls)
    create: CreateRunCall | None = None
    terminate: SetTerminatedCall | None = None
    if calls and isinstance(calls[0], CreateRunCall):
        create = calls.pop(0)  # type: ignore[assignment]
    if calls and isinstance(calls[-1], SetTerminatedCall):
        terminate = calls.pop()  # type: ignore[assignment]
    if create is not None:
        experiment = create.experiment_id
        if not (isinstance(experiment, str) and experiment.isdecimal()):
            return None
        if str(int(experiment)) != experiment:
            return None
        run_id = _creation_id(create)
    if run_id is None or (create is None and not calls and terminate is None):
        return None
    batches: list[LogBatchCall] = []
    for call in calls:
        if not isinstance(call, LogBatchCall) or not _fits_one_call(call):
            return None
        batches.append(call)
    return RunWork(run_id, create, batches, terminate)


def _creation_id(create: CreateRunCall) -> str:
    """The ID a creation's run gets: its create key's 32 hex digits (a new uuid4 without)."""
    if create.create_key:
        try:
            return uuid.UUID(create.create_key).hex
        except ValueError:
            pass
    return uuid.uuid4().hex
