"""Validation and truncation of what callers log, done at the call and cached per key.

Keys are truncated exactly as the seed client does (``mlflow.utils._truncate_dict``), then
checked with MLflow's own validation (``mlflow.utils.validation``); a rejected key or metric
value raises :class:`~mlflow.exceptions.MlflowException` naming it before anything is queued.
A training loop logs the same few keys every step, so a key that passed once is remembered
and costs one set lookup afterwards.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Mapping
from typing import Any

from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_PARAM_VAL_LENGTH,
    MAX_TAG_VAL_LENGTH,
    _validate_metric_name,
    _validate_param_name,
    _validate_tag_name,
)

from actors._queues import MetricRow, Pair

_logger = logging.getLogger(__name__)

# Keys seen valid and not needing truncation, per kind. Bounded: cleared when full.
_CACHE_LIMIT = 65_536
_VALID_METRIC_KEYS: set[Any] = set()
_VALID_PARAM_KEYS: set[Any] = set()
_VALID_TAG_KEYS: set[Any] = set()


def _ellipsize(value: str, max_length: int) -> str:
    # mlflow.utils._truncate_and_ellipsize, on a value already converted to str.
    return value[: max_length - 3] + "..." if len(value) > max_length else value


def _checked_key(
    key: Any, kind: str, validate: Callable[..., None], valid: set[Any]
) -> tuple[str, bool]:
    """Truncate and validate one key; return it and whether truncation changed it."""
    if not isinstance(key, str):
        raise MlflowException(
            f"Invalid {kind} key {key!r}: keys must be strings, got {type(key).__name__}.",
            INVALID_PARAMETER_VALUE,
        )
    new_key = _ellipsize(key, MAX_ENTITY_KEY_LENGTH)
    try:
        validate(new_key)
    except MlflowException as exc:
        raise MlflowException(
            f"Invalid {kind} key {key!r}: {exc.message}", INVALID_PARAMETER_VALUE
        ) from None
    if new_key is key:
        if len(valid) >= _CACHE_LIMIT:
            valid.clear()
        valid.add(key)
        return key, False
    _logger.warning("Truncated the key `%s`", new_key)
    return new_key, True


def _check_metric_value(key: str, value: Any) -> None:
    # MLflow's rule (a number, not a bool), narrowed to real numbers: complex is rejected.
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Number)
        or (isinstance(value, numbers.Complex) and not isinstance(value, numbers.Real))
    ):
        raise MlflowException(
            f"Invalid value {value!r} for metric {key!r}: metric values must be real numbers "
            "(NaN and infinities are allowed).",
            INVALID_PARAMETER_VALUE,
        )


def check_step(step: Any) -> int:
    """``step or 0``, as the seed does, after checking that it is an integer."""
    if step is None:
        return 0
    if type(step) is int:
        return step
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise MlflowException(
            f"Invalid step {step!r}: steps must be integers.", INVALID_PARAMETER_VALUE
        )
    return int(step) or 0


def metric_rows(
    metrics: Mapping[Any, Any],
    timestamp: int,
    step: int,
    model_id: str | None,
    dataset_name: str | None,
    dataset_digest: str | None,
) -> list[MetricRow]:
    """Rows for ``log_metrics``; raises ``MlflowException`` on a bad key or value."""
    valid = _VALID_METRIC_KEYS
    rows: list[MetricRow] = []
    truncated = False
    for key, value in metrics.items():
        if key not in valid:
            key, changed = _checked_key(key, "metric", _validate_metric_name, valid)
            truncated = truncated or changed
        value_type = type(value)
        if value_type is not float and value_type is not int:
            _check_metric_value(key, value)
        rows.append((key, value, timestamp, step, model_id, dataset_name, dataset_digest))
    if truncated:
        # Truncation can make two keys equal; like the seed's dict, the last one wins.
        rows = list({row[0]: row for row in rows}.values())
    return rows


def _pairs(
    items: Mapping[Any, Any],
    kind: str,
    validate: Callable[..., None],
    valid: set[Any],
    max_value_length: int,
) -> list[Pair]:
    pairs: dict[str, str] = {}
    for key, value in items.items():
        if key not in valid:
            key, _ = _checked_key(key, kind, validate, valid)
        text = value if type(value) is str else str(value)
        if len(text) > max_value_length:
            length, text = len(text), _ellipsize(text, max_value_length)
            # The start of the value is quoted, not the whole of it (thousands of characters).
            _logger.warning(
                "Truncated the value of the key `%s` from %d to %d characters; it begins `%s...`",
                key,
                length,
                len(text),
                text[:100],
            )
        pairs[key] = text
    return list(pairs.items())


def param_pairs(params: Mapping[Any, Any]) -> list[Pair]:
    """(key, value) pairs for ``log_params``, truncated and validated."""
    _require_mapping(params, "params")
    return _pairs(params, "param", _validate_param_name, _VALID_PARAM_KEYS, MAX_PARAM_VAL_LENGTH)


def tag_pairs(tags: Mapping[Any, Any]) -> list[Pair]:
    """(key, value) pairs for ``set_tags`` and ``create_run``, truncated and validated."""
    _require_mapping(tags, "tags")
    return _pairs(tags, "tag", _validate_tag_name, _VALID_TAG_KEYS, MAX_TAG_VAL_LENGTH)


def _require_mapping(value: Any, name: str) -> None:
    if not isinstance(value, Mapping):
        raise MlflowException(
            f"Invalid {name}: expected a dict, got {type(value).__name__}.",
            INVALID_PARAMETER_VALUE,
        )


def check_metrics_mapping(metrics: Any) -> None:
    _require_mapping(metrics, "metrics")


def check_status(status: str | None) -> None:
    """Reject a termination status that is not a ``RunStatus`` name (``None`` is FINISHED)."""
    if status is None:
        return
    names = sorted(RunStatus.to_string(s) for s in RunStatus.all_status())
    if status not in names:
        raise MlflowException(
            f"Invalid run status {status!r}: expected one of {names}.", INVALID_PARAMETER_VALUE
        )
