"""The SQL fast path (:mod:`actors.delivery._sql_policy`, :mod:`actors.delivery._sql_metrics`),
imported on first use, and what its callers hold of it: a client's :class:`ClientFastPath`.

The fast path relies on private MLflow names (``mlflow.utils.validation._validate_*``, the
table models of ``mlflow.store.tracking.dbmodels``). Imported here at its first use, not with
``import client``, an MLflow release that renames or moves them only turns the fast path off,
with one warning: clients keep working, and metrics go through MLflow's ``log_batch``.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import Any, Protocol

from actors.queueing._queues import MetricRow

_logger = logging.getLogger("runactors.delivery")


class FastPathUnavailable(Exception):
    """This batch cannot go through the fast path: send it through MLflow's API instead.

    Nothing of the batch was stored (the transaction was rolled back or never begun).
    """


class BatchWriter(Protocol):
    """What the fast path's callers use of its writer (``_sql_metrics.SqlMetricsWriter``)."""

    unavailable: str | None

    def write_queued(self, run_id: str, batches: Sequence[Sequence[MetricRow]]) -> None: ...


class RunsWriter(Protocol):
    """What the fast path's callers use of its whole-run writer (``_sql_runs.SqlRunsWriter``)."""

    @property
    def unavailable(self) -> str | None: ...

    def submit(self, work: Any) -> bool: ...

    def write(self, works: Any) -> list[bool]: ...


class ClientFastPath:
    """The fast path of one ``MlflowClient``: its writer (None: the client's store is not a
    database the writer serves, or the switch is off) and whether a fallback was logged."""

    def __init__(
        self, writer: BatchWriter | None, database: bool, runs: RunsWriter | None = None
    ) -> None:
        self.writer = writer
        self.runs = runs  # whole runs (actors.delivery._sql_runs), on the writer's database
        self.database = database  # MLflow's SQL store: status() shows "on"/"off"/"fallback"
        self.warned = False

    def fell_back(self, reason: str) -> str:
        """Log the client's first fallback at WARNING (later ones at DEBUG); the status text."""
        if self.warned:
            _logger.debug("SQL fast path fallback: %s", reason)
        else:
            self.warned = True
            _logger.warning(
                "SQL fast path unavailable, metrics and runs go through MLflow's API: %s", reason
            )
        return f"fallback: {reason}"


_UNTRIED: Any = object()
_module: Any = _UNTRIED  # the module, or None once its import failed
_lock = threading.Lock()


def sql_metrics() -> ModuleType | None:
    """:mod:`actors.delivery._sql_policy`, or None (said once per process) if it cannot be
    imported."""
    global _module
    if _module is _UNTRIED:
        try:
            module: ModuleType | None = importlib.import_module("actors.delivery._sql_policy")
            error = None
        except Exception as exc:  # an MLflow without the private names it relies on
            module, error = None, exc
        with _lock:
            if _module is _UNTRIED:
                _module = module
                if error is not None:
                    import mlflow

                    _logger.warning(
                        "SQL fast path off: it cannot be used with MLflow %s (%r); metrics go"
                        " through MLflow's log_batch.",
                        mlflow.__version__,
                        error,
                    )
    result: ModuleType | None = _module
    return result


def client_fast_path(client: Any) -> ClientFastPath | None:
    """The fast path of ``client`` (an ``MlflowClient``); None without the fast path."""
    module = sql_metrics()
    return None if module is None else module.client_fast_path(client)


def log_batch_is_mlflows(client: Any) -> bool:
    """:func:`actors.delivery._sql_policy.log_batch_is_mlflows`; False without the fast path."""
    module = sql_metrics()
    return module is not None and bool(module.log_batch_is_mlflows(client))


def run_calls_are_mlflows(client: Any) -> bool:
    """:func:`actors.delivery._sql_policy.run_calls_are_mlflows`; False without the fast path."""
    module = sql_metrics()
    return module is not None and bool(module.run_calls_are_mlflows(client))
