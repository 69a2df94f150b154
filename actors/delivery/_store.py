"""The ``MlflowClient`` that runactors' own calls go through: one HTTP attempt per call,
bounded by what is left of the call's ``retry_timeout``.

MLflow's HTTP layer retries a failed request up to 7 times with exponential backoff (minutes)
and waits up to 120 s for an answer, before the caller sees the failure; runactors retries
transient failures itself (:mod:`actors.delivery._retry`), so with both a client with
``retry_timeout=1`` would give up minutes late, and a ``create_run`` could be re-sent where
runactors cannot look it up first. So runactors' clients on a tracking server use
:class:`BoundedRestStore`: ``max_retries=0``, no status retries, and a per-request timeout of
what is left of the current call's deadline (:func:`request_deadline`), at least
``REQUEST_TIMEOUT_FLOOR`` and at most ``MLFLOW_HTTP_REQUEST_TIMEOUT``. Nothing global changes:
the user's own ``MlflowClient``\\ s and the environment keep MLflow's settings.

It relies on these private MLflow names (``tests/test_retry_bound.py`` checks them, so that
an MLflow upgrade that breaks them fails a test, not a service): ``RestStore._call_endpoint``
(its signature), ``RestStore._METHOD_TO_INFO``, ``_V3_METHOD_TO_INFO``, ``_V3_APIS`` and
``_validate_workspace_support_if_specified``, ``MlflowClient._tracking_client`` and
``TrackingServiceClient.store``; and on ``mlflow.utils.rest_utils.http_request`` and
``verify_rest_response``.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR
from mlflow.protos.service_pb2 import CreateRun, LogBatch
from mlflow.store.tracking.rest_store import RestStore
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service.client import TrackingServiceClient
from mlflow.utils.proto_json_utils import parse_dict
from mlflow.utils.rest_utils import http_request, verify_rest_response

from actors.delivery._new_sqlite import create_sqlite_store

# A request gets at least this long to be answered, even when the call's retry_timeout is
# (nearly) spent: shorter would fail a healthy but loaded server's answers, and the overshoot
# past retry_timeout is at most this.
REQUEST_TIMEOUT_FLOOR = 1.0

_local = threading.local()


@contextmanager
def request_deadline(deadline: float) -> Iterator[None]:
    """Bound this thread's requests by ``deadline`` (``time.monotonic()``) while inside."""
    previous = getattr(_local, "deadline", None)
    _local.deadline = deadline
    try:
        yield
    finally:
        _local.deadline = previous


def request_timeout() -> float:
    """The timeout of a request made now by this thread: what is left of its deadline,
    within ``[REQUEST_TIMEOUT_FLOOR, MLFLOW_HTTP_REQUEST_TIMEOUT]``."""
    ceiling = float(MLFLOW_HTTP_REQUEST_TIMEOUT.get())
    deadline: float | None = getattr(_local, "deadline", None)
    if deadline is None:
        return ceiling
    return min(ceiling, max(deadline - time.monotonic(), REQUEST_TIMEOUT_FLOOR))


class BoundedRestStore(RestStore):
    """MLflow's REST store with one attempt per request and a deadline-bound timeout."""

    def _call_endpoint(
        self,
        api: Any,
        json_body: Any = None,
        endpoint: str | None = None,
        retry_timeout_seconds: Any = None,
        response_proto: Any = None,
    ) -> Any:
        body = json.loads(json_body) if json_body is not None else None
        return self._request(api, body, endpoint, response_proto)

    def _request(
        self,
        api: Any,
        body: dict[str, Any] | None,
        endpoint: str | None = None,
        response_proto: Any = None,
    ) -> Any:
        # Routing as RestStore._call_endpoint does it; the request as call_endpoint makes it,
        # with MLflow's retries off.
        method_to_info = self._V3_METHOD_TO_INFO if api in self._V3_APIS else self._METHOD_TO_INFO
        self._validate_workspace_support_if_specified()
        if endpoint:
            _, method = method_to_info[api]
        else:
            endpoint, method = method_to_info[api]
        response_proto = response_proto or api.Response()
        response = http_request(
            host_creds=self.get_host_creds(),
            endpoint=endpoint,
            method=method,
            max_retries=0,
            backoff_factor=0,
            retry_codes=(),
            timeout=request_timeout(),
            **({"params": body} if method == "GET" else {"json": body}),
        )
        response = verify_rest_response(response, endpoint)
        if response.status_code == 204:
            return response_proto
        parse_dict(js_dict=json.loads(response.text), message=response_proto)
        return response_proto

    def log_batch(
        self, run_id: str, metrics: list[Metric], params: list[Param], tags: list[RunTag]
    ) -> None:
        """``RestStore.log_batch`` without its protobuf round trip: the body is built as the
        dict that ``message_to_json`` makes of the ``LogBatch`` message (see
        :func:`log_batch_body`), which cost about 85% of the client's time per batch."""
        self._request(LogBatch, log_batch_body(run_id, metrics, params, tags))

    def create_run(self, *args: Any, **kwargs: Any) -> Run:
        """``RestStore.create_run``, refusing an answer without a run ID: a ``200 {}`` (a
        stub, a misrouted proxy) would otherwise be a run with the ID ``''`` that every later
        call of the run is sent to."""
        run: Run = super().create_run(*args, **kwargs)
        if not run.info.run_id:
            endpoint, method = self._METHOD_TO_INFO[CreateRun]
            raise MlflowException(
                f"{method} {self.get_host_creds().host.rstrip('/')}{endpoint} answered without"
                " a run ID: the run was not created (is this a tracking server?)",
                error_code=INTERNAL_ERROR,
            )
        return run


def _double(value: float) -> float | str:
    # Protobuf's JSON mapping of a double: numbers, and these three as strings.
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _metric_json(metric: Metric) -> dict[str, Any]:
    # Metric.to_proto's fields: the four always, the others when set (proto2: set fields
    # are written even when empty; unset ones are left out).
    out: dict[str, Any] = {
        "key": metric.key,
        "value": _double(metric.value),
        "timestamp": int(metric.timestamp),
        "step": int(metric.step),
    }
    for name in ("model_id", "dataset_name", "dataset_digest", "run_id"):
        value = getattr(metric, name, None)
        if value:
            out[name] = value
    return out


def log_batch_body(
    run_id: str, metrics: list[Metric], params: list[Param], tags: list[RunTag]
) -> dict[str, Any]:
    """The JSON body of a ``LogBatch`` request: the same dict as
    ``json.loads(message_to_json(LogBatch(...)))``, built directly from the entities
    (``tests/test_rest_body.py`` compares the two)."""
    body: dict[str, Any] = {}
    if metrics:
        body["metrics"] = [_metric_json(m) for m in metrics]
    if params:
        body["params"] = [{"key": p.key, "value": p.value} for p in params]
    if tags:
        body["tags"] = [{"key": t.key, "value": t.value} for t in tags]
    body["run_id"] = run_id
    return body


class _TrackingClient(TrackingServiceClient):
    """MLflow's tracking service client on a given store object."""

    def __init__(self, tracking_uri: str, store: Any) -> None:
        self._store = store
        super().__init__(tracking_uri)

    @property
    def store(self) -> Any:
        return self._store


def make_client(tracking_uri: str) -> MlflowClient:
    """An ``MlflowClient`` for runactors' own calls: on a tracking server (a plain
    ``RestStore``), one on :class:`BoundedRestStore`; elsewhere MLflow's own. A SQLite store
    that does not exist yet is created whole first (:mod:`actors.delivery._new_sqlite`)."""
    create_sqlite_store(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    store = client._tracking_client.store
    if type(store) is RestStore:
        bounded = BoundedRestStore(store.get_host_creds)
        client._tracking_client = _TrackingClient(client._tracking_client.tracking_uri, bounded)
    return client
