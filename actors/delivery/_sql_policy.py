"""When the SQL fast path is used: the on/off switch, the stores it serves, and each
``MlflowClient``'s fast path (its writer, made once on first use and cached with the client).

Imported on first use by :mod:`actors.delivery._fast_path`, with the writer
(:mod:`actors.delivery._sql_metrics`) it makes.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any, Final

from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.tracking import MlflowClient

from actors.delivery._fast_path import ClientFastPath, FastPathUnavailable
from actors.delivery._sql_metrics import INSERTS, SqlMetricsWriter
from actors.delivery._sql_runs import SqlRunsWriter

ENV_SWITCH = "RUNACTORS_SQL_FAST_PATH"


def enabled() -> bool:
    """Whether the environment allows the fast path (``RUNACTORS_SQL_FAST_PATH`` is not "0")."""
    return os.environ.get(ENV_SWITCH, "1").strip() != "0"


def fast_metrics_writer(store: object) -> SqlMetricsWriter | None:
    """A writer on ``store``'s own engine when ``store`` is MLflow's plain ``SqlAlchemyStore``
    on a supported database and the fast path is enabled; else None (use MLflow's API).

    A subclass that scopes queries (MLflow's workspace-aware store) is not the store the
    writer was proven against, so it gets None too.
    """
    if not enabled() or type(store) is not SqlAlchemyStore:
        return None
    engine = store.engine
    if engine.dialect.name not in INSERTS:
        return None
    try:
        return SqlMetricsWriter(engine)
    except FastPathUnavailable:
        return None


# MLflow's own ``log_batch`` of the client and of the store, which the fast path stands in for.
_MLFLOW_LOG_BATCH: Final = (MlflowClient.log_batch, SqlAlchemyStore.log_batch)


def log_batch_is_mlflows(client: Any) -> bool:
    """Whether ``client.log_batch`` would run MLflow's own code down to its SQL store: not
    when that code is patched or wrapped (instrumentation, a test's fault injection, a
    subclass), whose caller expects it to run for every batch; the fast path would skip it."""
    store = client._tracking_client.store
    return (type(client).log_batch, type(store).log_batch) == _MLFLOW_LOG_BATCH and not (
        "log_batch" in vars(client) or "log_batch" in vars(store)
    )


# MLflow's own methods, of the client and of the store, that whole runs stand in for.
_MLFLOW_RUN_CALLS: Final = (
    (MlflowClient.create_run, SqlAlchemyStore.create_run),
    (MlflowClient.log_batch, SqlAlchemyStore.log_batch),
    (MlflowClient.set_terminated, SqlAlchemyStore.update_run_info),
)


def run_calls_are_mlflows(client: Any) -> bool:
    """:func:`log_batch_is_mlflows` for every call a whole run stands in for."""
    store = client._tracking_client.store
    for client_method, store_method in _MLFLOW_RUN_CALLS:
        name, store_name = client_method.__name__, store_method.__name__
        if getattr(type(client), name) is not client_method:
            return False
        if getattr(type(store), store_name) is not store_method:
            return False
        if name in vars(client) or store_name in vars(store):
            return False
    return True


_CLIENTS: weakref.WeakKeyDictionary[Any, ClientFastPath] = weakref.WeakKeyDictionary()
_CLIENTS_LOCK = threading.Lock()


def client_fast_path(client: Any) -> ClientFastPath:
    """The fast path of ``client`` (an ``MlflowClient``), built once on first use and cached
    with the client (also when there is none), so that every batch after the first costs a
    dictionary look-up."""
    with _CLIENTS_LOCK:
        found = _CLIENTS.get(client)
    if found is not None:
        return found
    tracking = getattr(client, "_tracking_client", None)
    store = getattr(tracking, "store", None)
    writer = fast_metrics_writer(store)
    runs = None if writer is None else SqlRunsWriter(writer)
    made = ClientFastPath(writer, isinstance(store, SqlAlchemyStore), runs)
    with _CLIENTS_LOCK:
        return _CLIENTS.setdefault(client, made)
