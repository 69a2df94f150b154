"""A journal's payloads: planned calls as JSON (NaN, infinities and -0.0 round-trip exactly;
numpy scalars become Python numbers), datasets through MLflow's protobuf. Nothing is pickled:
reading a journal never executes code.
"""

from __future__ import annotations

import base64
import json
import numbers
from typing import Any

from mlflow.entities import DatasetInput
from mlflow.protos.service_pb2 import DatasetInput as DatasetInputProto

from actors.queueing._plan import Call, LogBatchCall, LogInputsCall, SetTerminatedCall
from actors.queueing._queues import CreateRunCall
from actors.spool._format import bad


def _number(value: Any) -> Any:
    """JSON's ``default``: numpy scalars and other real numbers as Python numbers."""
    item = getattr(value, "item", None)
    if item is not None and not isinstance(value, str | bytes):
        value = item()
        if isinstance(value, bool | int | float):
            return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"{type(value).__name__} {value!r} cannot be written to a journal")


def dumps(payload: Any) -> str:
    # ensure_ascii keeps any str (lone surrogates included) storable as UTF-8 text;
    # allow_nan writes NaN/Infinity, which json.loads reads back as the same floats.
    return json.dumps(payload, default=_number, ensure_ascii=True, allow_nan=True)


def _dataset_out(dataset: Any) -> str:
    if not isinstance(dataset, DatasetInput):
        raise bad(f"a journal stores mlflow.entities.DatasetInput, not {type(dataset).__name__}")
    return base64.b64encode(dataset.to_proto().SerializeToString()).decode("ascii")


def _dataset_in(text: str) -> DatasetInput:
    proto = DatasetInputProto()
    proto.ParseFromString(base64.b64decode(text, validate=True))
    return DatasetInput.from_proto(proto)


def encode_call(call: Call) -> tuple[str, str]:
    """``(kind, payload)`` of one planned call (not a creation: that lives in ``runs``)."""
    if isinstance(call, LogBatchCall):
        return "log_batch", dumps(
            {
                "metrics": call.metrics,  # tuples: JSON arrays, as lists would be
                "params": call.params,
                "tags": call.tags,
            }
        )
    if isinstance(call, LogInputsCall):
        return "log_inputs", dumps({"datasets": [_dataset_out(d) for d in call.datasets]})
    if isinstance(call, SetTerminatedCall):
        return "set_terminated", dumps({"status": call.status, "end_time": call.end_time})
    if isinstance(call, CreateRunCall):
        raise bad("a creation is recorded with add_run(create=...), not appended as a call")
    raise bad(f"a journal cannot store {type(call).__name__}")


def str_pairs(items: Any) -> list[tuple[str, str]]:
    return [(str(key), str(value)) for key, value in items]


def decode_call(kind: str, payload: str) -> Call:
    """The inverse of :func:`encode_call`; raises ``ValueError`` on anything malformed."""
    data = json.loads(payload)
    if kind == "log_batch":
        metrics = [
            (str(k), v, int(ts), int(step), model_id, ds_name, ds_digest)
            for k, v, ts, step, model_id, ds_name, ds_digest in data["metrics"]
        ]
        return LogBatchCall(metrics, str_pairs(data["params"]), str_pairs(data["tags"]))
    if kind == "log_inputs":
        return LogInputsCall([_dataset_in(text) for text in data["datasets"]])
    if kind == "set_terminated":
        return SetTerminatedCall(data["status"], data["end_time"])
    raise ValueError(f"unknown call kind {kind!r}")
