"""What ``create_run`` queues: its arguments checked at the call, as one ``CreateRunCall``."""

from __future__ import annotations

import uuid
from typing import Any

from mlflow.utils.time import get_current_time_millis

from actors import CreateRunCall, check_text, check_timestamp, tag_pairs
from client._options import invalid


def creation(
    experiment_id: Any, start_time: int | None, tags: dict[str, Any] | None, run_name: Any
) -> CreateRunCall:
    """The creation ``create_run`` queues; raises ``MlflowException`` naming a bad argument.

    Its start time is fixed here (now, if not given) and it carries a fresh create key, so
    that a creation re-sent from the spool or looked up after an unknown outcome is the same.
    """
    if experiment_id is None:
        raise invalid("Invalid experiment_id None: expected an experiment ID.")
    if run_name is not None and not isinstance(run_name, str):
        raise invalid(f"Invalid run_name {run_name!r}: expected a string.")
    check_text(run_name, "run_name")
    experiment_id = str(experiment_id)
    check_text(experiment_id, "experiment_id")
    check_timestamp(start_time, "start_time")
    pairs = tag_pairs(tags) if tags else []
    if start_time is None:
        start_time = get_current_time_millis()
    return CreateRunCall(experiment_id, start_time, pairs, run_name, str(uuid.uuid4()))
