"""When the SQL fast path is used: the on/off switch, the stores it serves, and each
``MlflowClient``'s fast path (its writer, made once on first use and cached with the client).

Imported on first use by :mod:`actors.delivery._fast_path`, with the writer
(:mod:`actors.delivery._sql_metrics`) it makes.
"""

from __future__ import annotations

import os
import sys
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


def _is_mlflows(owner: object, name: str, defined_in: type) -> bool:
    """Whether ``owner.name`` is MLflow's own method as ``defined_in`` defines it: not patched
    or wrapped (instrumentation, a test's fault injection, a subclass's override). Told by
    where the function was defined, not by identity with a function taken at import, since
    this module is imported on first use, which may come after a patch."""
    func = getattr(owner, name, None)
    module = sys.modules.get(defined_in.__module__)
    code = getattr(func, "__code__", None)
    return (
        getattr(func, "__module__", None) == defined_in.__module__
        and getattr(func, "__qualname__", None) == f"{defined_in.__qualname__}.{name}"
        and not hasattr(func, "__wrapped__")
        and code is not None
        and module is not None
        and code.co_filename == getattr(module, "__file__", None)
    )


def _calls_are_mlflows(client: Any, names: tuple[tuple[str, str], ...]) -> bool:
    store = client._tracking_client.store
    for name, store_name in names:
        if name in vars(client) or store_name in vars(store):
            return False
        if not _is_mlflows(type(client), name, MlflowClient):
            return False
        if not _is_mlflows(type(store), store_name, SqlAlchemyStore):
            return False
    return True


# MLflow's methods (the client's, the store's) that the fast path for metrics stands in for.
_METRIC_CALLS: Final = (("log_batch", "log_batch"),)
# ... and those that whole runs stand in for.
_RUN_CALLS: Final = (
    ("create_run", "create_run"),
    ("log_batch", "log_batch"),
    ("set_terminated", "update_run_info"),
)


def log_batch_is_mlflows(client: Any) -> bool:
    """Whether ``client.log_batch`` would run MLflow's own code down to its SQL store: not
    when that code is patched or wrapped (instrumentation, a test's fault injection, a
    subclass), whose caller expects it to run for every batch; the fast path would skip it."""
    return _calls_are_mlflows(client, _METRIC_CALLS)


def run_calls_are_mlflows(client: Any) -> bool:
    """:func:`log_batch_is_mlflows` for every call a whole run stands in for."""
    return _calls_are_mlflows(client, _RUN_CALLS)


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
