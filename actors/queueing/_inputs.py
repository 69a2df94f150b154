"""Validation and truncation of what callers log, done at the call and cached per key.

Keys are truncated exactly as the seed client does (``mlflow.utils._truncate_dict``), then
checked with MLflow's own validation (``mlflow.utils.validation``); a rejected key or metric
value raises :class:`~mlflow.exceptions.MlflowException` naming it before anything is queued.
A training loop logs the same few keys every step, so a key that passed once is remembered
and costs one set lookup afterwards.

What no store can hold is refused here too, since at the flush it would fail the whole batch
(every good point of the run with it) with a message naming no key: a step or timestamp
outside int64, a metric value beyond a double, a string that cannot be encoded as UTF-8.
"""

from __future__ import annotations

import logging
import numbers
import sys
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

from actors.queueing._queues import MetricRow, Pair

_logger = logging.getLogger("runactors.queueing")

# What every store can hold: steps and timestamps are int64 (SQL BIGINT, protobuf int64),
# metric values doubles. An int within _MAX_DOUBLE converts to a double; beyond it, float()
# decides (it rounds a little past it down, and overflows past that).
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
_MAX_DOUBLE = int(sys.float_info.max)
_MIN_DOUBLE = -_MAX_DOUBLE  # kept: -_MAX_DOUBLE makes a 1024-bit int each time

# Keys seen valid and not needing truncation, per kind. Bounded: cleared when full.
_CACHE_LIMIT = 65_536
_VALID_METRIC_KEYS: set[Any] = set()
_VALID_PARAM_KEYS: set[Any] = set()
_VALID_TAG_KEYS: set[Any] = set()


def _ellipsize(value: str, max_length: int) -> str:
    # mlflow.utils._truncate_and_ellipsize, on a value already converted to str.
    return value[: max_length - 3] + "..." if len(value) > max_length else value


def encodable(text: str) -> bool:
    """Whether ``text`` can be encoded as UTF-8 (no lone surrogate); cheap for ASCII."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unencodable(what: str) -> MlflowException:
    return MlflowException(
        f"Invalid {what}: it cannot be encoded as UTF-8 (a lone surrogate?), so no store can "
        "hold it.",
        INVALID_PARAMETER_VALUE,
    )


def check_text(value: Any, what: str) -> None:
    """Raise naming ``what`` if ``value`` is a string that cannot be encoded as UTF-8."""
    if type(value) is str and value.isascii():
        return
    if isinstance(value, str) and not encodable(value):
        raise _unencodable(f"{what} {value!r}")


def _checked_key(
    key: Any, kind: str, validate: Callable[..., None], valid: set[Any]
) -> tuple[str, bool]:
    """Truncate and validate one key; return it and whether truncation changed it."""
    if not isinstance(key, str):
        raise MlflowException(
            f"Invalid {kind} key {key!r}: keys must be strings, got {type(key).__name__}.",
            INVALID_PARAMETER_VALUE,
        )
    if not encodable(key):
        raise _unencodable(f"{kind} key {key!r}")
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
    try:
        float(value)  # type: ignore[arg-type]  # a Real, or float() raises: both handled
    except (OverflowError, ValueError, TypeError) as exc:
        # Not the value itself: an int of thousands of digits has no repr.
        raise MlflowException(
            f"Invalid value for metric {key!r}: the {type(value).__name__} does not convert to "
            f"a double ({type(exc).__name__}; a double holds up to about +/-1.8e308), so no "
            "store can hold it.",
            INVALID_PARAMETER_VALUE,
        ) from None


def _outside_int64(what: str, value: Any) -> MlflowException:
    # An int of thousands of digits has no repr: show the small ones only.
    large = isinstance(value, int) and value.bit_length() > 128
    shown = "a very large integer" if large else repr(value)
    return MlflowException(
        f"Invalid {what} {shown}: not within the int64 range {INT64_MIN} .. {INT64_MAX} "
        "that stores hold.",
        INVALID_PARAMETER_VALUE,
    )


def check_step(step: Any) -> int:
    """``step or 0``, as the seed does, after checking that it is an int64 integer."""
    if step is None:
        return 0
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise MlflowException(
            f"Invalid step {step!r}: steps must be integers.", INVALID_PARAMETER_VALUE
        )
    step = int(step)
    if not INT64_MIN <= step <= INT64_MAX:
        raise _outside_int64("step", step)
    return step or 0


def check_timestamp(value: Any, name: str) -> None:
    """Raise naming ``name`` unless ``value`` is ``None`` or a number of ms within int64."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise MlflowException(
            f"Invalid {name} {value!r}: expected milliseconds since the epoch (an integer).",
            INVALID_PARAMETER_VALUE,
        )
    if not INT64_MIN <= value <= INT64_MAX:  # type: ignore[operator]  # NaN fails it too
        raise _outside_int64(name, value)


def check_metric_context(
    model_id: str | None, dataset_name: str | None, dataset_digest: str | None
) -> None:
    """The strings ``log_metrics`` takes besides keys (rare: only with a model or dataset)."""
    check_text(model_id, "model_id")
    check_text(dataset_name, "dataset name")
    check_text(dataset_digest, "dataset digest")


def check_dataset_input(dataset_input: Any) -> None:
    """Every string of a ``DatasetInput`` (the dataset's fields, its tags) must encode."""
    dataset = dataset_input.dataset
    for field in ("name", "digest", "source_type", "source", "schema", "profile"):
        check_text(getattr(dataset, field, None), f"dataset {field}")
    for tag in dataset_input.tags or ():
        check_text(tag.key, "dataset input tag key")
        check_text(tag.value, f"value of the dataset input tag {tag.key!r}")


def metric_rows(
    metrics: Mapping[Any, Any],
    timestamp: int,
    step: int,
    model_id: str | None,
    dataset_name: str | None,
    dataset_digest: str | None,
) -> list[MetricRow]:
    """Rows for ``log_metrics``; raises ``MlflowException`` on a bad key or value."""
    if model_id is not None or dataset_name is not None or dataset_digest is not None:
        check_metric_context(model_id, dataset_name, dataset_digest)
    valid = _VALID_METRIC_KEYS
    rows: list[MetricRow] = []
    truncated = False
    for key, value in metrics.items():
        if key not in valid:
            key, changed = _checked_key(key, "metric", _validate_metric_name, valid)
            truncated = truncated or changed
        value_type = type(value)
        if value_type is not float and (
            value_type is not int or not _MIN_DOUBLE <= value <= _MAX_DOUBLE
        ):
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
        if not encodable(text):
            raise _unencodable(f"value of the {kind} {key!r}")
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
