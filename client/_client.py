"""``QueueingClient``: the drop-in successor of MLflow's ``MlflowAutologgingQueueingClient``."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from mlflow.entities.dataset_input import DatasetInput
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_STATE
from mlflow.utils.time import get_current_time_millis

from actors import (
    ClientStatus,
    PendingRunId,
    RunHandle,
    Session,
    Terminate,
    check_dataset_input,
    check_metrics_mapping,
    check_status,
    check_step,
    check_timestamp,
    closed_error,
    get_system,
    metric_rows,
    param_pairs,
    tag_pairs,
)
from client import _dying
from client._creation import creation
from client._operations import RunOperations
from client._options import invalid, session_config
from client._registry import live as _live
from client._registry import release
from client._registry import start_status_from_env as _start_status_from_env

if TYPE_CHECKING:
    from mlflow.data.dataset import Dataset

    from client._status_server import StatusServer

RunIdLike = str | PendingRunId


class QueueingClient:
    """Queues run operations and delivers them through per-run actors.

    Thread-safe; every ``log_*`` call validates its input and appends to the run's queue
    without waiting for any actor. ``flush()`` sends everything queued so far.

    >>> from client import QueueingClient                          # doctest: +SKIP
    >>> with QueueingClient("sqlite:///mlflow.db") as client:      # doctest: +SKIP
    ...     run = client.create_run("0", run_name="trial-1")
    ...     for step in range(100):
    ...         client.log_metrics(run, {"loss": 1 / (step + 1)}, step=step)
    ...     client.set_terminated(run, "FINISHED")

    Args:
        tracking_uri: the store; ``None``: ``mlflow.get_tracking_uri()``, resolved now.
        executor: ``"thread"`` or ``"process"`` (worker processes) for the tracking calls.
        max_workers: tracking calls at once; ``None``: ``min(2 x CPUs, 8)``.
        flush_interval: seconds between background flushes; ``None``: none.
        max_queued: entities held in memory at most; ``None``: no bound.
        retry_timeout: seconds a transient failure is retried before it is an error.
        spool_dir: a folder for the write-ahead journal of every logged call; ``None``: none.
        journal_interval: with ``spool_dir``, most seconds a call waits to be on disk.
        end_runs: a process dying of a signal or exception ends this client's runs.

    Raises:
        MlflowException: an invalid option (``INVALID_PARAMETER_VALUE``, naming it).
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        *,
        executor: Literal["thread", "process"] = "thread",
        max_workers: int | None = None,
        flush_interval: float | None = None,
        max_queued: int | None = None,
        retry_timeout: float = 60.0,
        spool_dir: str | os.PathLike[str] | None = None,
        journal_interval: float = 0.2,
        end_runs: bool = True,
    ) -> None:
        options = (max_workers, flush_interval, max_queued, retry_timeout, spool_dir)
        self._config = session_config(tracking_uri, executor, *options, journal_interval, end_runs)
        self._closed = False
        self._reset()
        if end_runs:
            _dying.install()
        _start_status_from_env()

    def _reset(self) -> None:
        """Start with no session (opened on first use) and no queued operations."""
        self._lock = threading.Lock()
        self._runs: dict[Any, RunHandle] = {}
        self._session: Session | None = None
        self._closed_session: Session | None = None  # kept after close() for status()
        self._finalizer: weakref.finalize[Any, Any] | None = None
        if not self._closed:
            _live.add(self)
        else:  # a forked child of a process where it was closing: nothing of it is here
            _live.discard(self)

    @property
    def tracking_uri(self) -> str:
        """The store this client delivers to, resolved and made absolute at construction."""
        return self._config.tracking_uri

    # -- sessions and runs ------------------------------------------------------------

    def _get_session(self) -> Session:
        session = self._session
        if session is not None:
            return session
        with self._lock:
            if self._closed:
                raise closed_error()
            if self._session is None:
                session = get_system().open_session(self._config)
                self._finalizer = weakref.finalize(self, release, session)
                self._finalizer.atexit = False  # the actor system's exit handler closes it
                self._session = session
            return self._session

    def _register(self, run_id: Any) -> RunHandle:
        """The slow path of every call: the first use of a run ID string, or a bad ID."""
        if self._closed:
            raise closed_error()
        if isinstance(run_id, PendingRunId):
            raise invalid(
                f"{run_id!r} was not created by this client: a PendingRunId can only be used "
                "with the client whose create_run() returned it."
            )
        if not isinstance(run_id, str) or not run_id:
            raise invalid(
                f"Invalid run_id {run_id!r}: expected a run ID string or a PendingRunId "
                "returned by this client's create_run()."
            )
        handle = get_system().register_run(self._get_session(), run_id)
        with self._lock:
            return self._runs.setdefault(run_id, handle)

    def _handle(self, run_id: Any) -> RunHandle:
        try:
            return self._runs[run_id]
        except (KeyError, TypeError):
            return self._register(run_id)

    # -- the seed's API ---------------------------------------------------------------

    def create_run(
        self,
        experiment_id: str,
        start_time: int | None = None,
        tags: dict[str, Any] | None = None,
        run_name: str | None = None,
    ) -> PendingRunId:
        """Queue the creation of a run.

        Args:
            experiment_id: the experiment of the run.
            start_time: milliseconds since the epoch; ``None``: now.
            tags: the run's tags, sent with its creation.
            run_name: the run's name.

        Returns:
            The ``PendingRunId`` that stands for the run in this client's calls.

        Raises:
            MlflowException: invalid input, or the client is closed.
        """
        if self._closed:
            raise closed_error()
        create = creation(experiment_id, start_time, tags, run_name)
        if self._config.end_runs:  # made off the main thread, or before a fork: now
            _dying.install()
        handle = get_system().register_run(self._get_session(), None, create)
        with self._lock:
            self._runs[handle.key] = handle
        assert handle.pending is not None
        return handle.pending

    def set_terminated(
        self, run_id: RunIdLike, status: str | None = None, end_time: int | None = None
    ) -> None:
        """Queue the termination of a run; it is sent after everything queued before it.

        Args:
            run_id: a run ID string or a ``PendingRunId`` of this client.
            status: a ``RunStatus`` name (``FINISHED`` when ``None``, as MLflow).
            end_time: milliseconds since the epoch; ``None``: now.

        Raises:
            MlflowException: invalid input, a termination already queued, a closed client.
        """
        handle = self._handle(run_id)
        check_status(status)
        check_timestamp(end_time, "end_time")
        if end_time is None:  # fixed now, as MLflow's own client would at the call
            end_time = get_current_time_millis()
        if not handle.queues.set_terminate(Terminate(status, end_time)):
            raise MlflowException(
                f"The run {handle.record.label} already has a termination queued; a run can be "
                "terminated once per flush.",
                INVALID_STATE,
            )

    def log_params(self, run_id: RunIdLike, params: dict[str, Any]) -> None:
        """Queue params (name to value); keys and values are truncated as MLflow's seed
        client does. Raises ``MlflowException`` for a bad run ID or param, or once closed."""
        handle = self._handle(run_id)
        pairs = param_pairs(params)
        if pairs:
            handle.queues.add_params(pairs)

    def set_tags(self, run_id: RunIdLike, tags: dict[str, Any]) -> None:
        """Queue tags (name to value); keys and values are truncated as MLflow's seed
        client does. Raises ``MlflowException`` for a bad run ID or tag, or once closed."""
        handle = self._handle(run_id)
        pairs = tag_pairs(tags)
        if pairs:
            handle.queues.add_tags(pairs)

    def log_metrics(
        self,
        run_id: RunIdLike,
        metrics: dict[str, float],
        step: int | None = None,
        dataset: Dataset | None = None,
        model_id: str | None = None,
    ) -> None:
        """Queue metrics at ``step`` (default 0), timestamped now.

        Args:
            run_id: a run ID string or a ``PendingRunId`` of this client.
            metrics: metric name to a real number.
            step: the step of every metric of the call.
            dataset: the dataset the metrics were computed on (its name and digest).
            model_id: the logged model the metrics belong to.

        Raises:
            MlflowException: invalid input, no room (``max_queued``) within ``retry_timeout``.
        """
        try:
            handle = self._runs[run_id]
        except (KeyError, TypeError):
            handle = self._register(run_id)
        if type(metrics) is not dict:
            check_metrics_mapping(metrics)
        rows = metric_rows(
            metrics,
            get_current_time_millis(),
            # A plain int step within int64 (constants folded) skips the call.
            step if type(step) is int and -(2**63) <= step < 2**63 else check_step(step),
            model_id,
            None if dataset is None else dataset.name,
            None if dataset is None else dataset.digest,
        )
        if rows:
            handle.queues.add_metrics(rows)

    def log_inputs(self, run_id: RunIdLike, datasets: list[DatasetInput] | None) -> None:
        """Queue dataset inputs; ``None`` or ``[]`` does nothing. Raises ``MlflowException``
        for a bad run ID or dataset, or once the client is closed."""
        if not datasets:
            return
        handle = self._handle(run_id)
        for dataset in datasets:
            if not isinstance(dataset, DatasetInput):
                raise invalid(
                    f"Invalid dataset {dataset!r}: expected mlflow.entities.DatasetInput."
                )
            check_dataset_input(dataset)
        handle.queues.add_datasets(list(datasets))

    def flush(self, synchronous: bool = True) -> RunOperations:
        """Send everything this client queued; wait for it unless ``synchronous=False``.

        Returns:
            The flush's ``RunOperations`` (already completed when ``synchronous``).

        Raises:
            MlflowException: what it failed to deliver (``synchronous``), or a closed client.
        """
        if self._closed:
            raise closed_error()
        session = self._session
        operations = RunOperations(get_system().flush(session) if session else [])
        if synchronous:
            operations.await_completion()
        return operations

    def status(self) -> ClientStatus:
        """A snapshot of what every run's actor is doing; never waits on a flush.

        After ``close()`` it keeps answering, with each run's final state (``stopped`` or
        ``closed``), what was logged and what failed.

        Returns:
            A ``ClientStatus``, one ``RunStatus`` per run.
        """
        closed = self._closed
        session = self._closed_session if closed else self._session
        handles = list(session.handles.values()) if session else []
        return ClientStatus(
            runs=[handle.record.snapshot(handle.queues) for handle in handles],
            tracking_uri=self._config.tracking_uri,
            executor=self._config.executor,
            closed=closed,
            client_id=session.id if session else None,
            keeper=session.keeper_state() if session else None,
            journal_error=session.journal_failure() if session else None,
        )

    def keeper_healthy(self) -> bool:
        """False while this client's keeper process (``spool_dir``) is dead: for ``/healthz``."""
        return self.status().keeper != "dead"

    def serve_status(self, host: str = "127.0.0.1", port: int = 0) -> StatusServer:
        """Serve the status of every open client of this process over HTTP, until the
        returned server's ``close()`` (or exit): ``GET /status`` (JSON) and ``GET /metrics``
        (Prometheus). ``port=0`` picks a free port (see ``StatusServer.url``). No
        authentication: binding beyond loopback is the caller's explicit choice.

        Returns:
            The running ``StatusServer``.

        Raises:
            MlflowException: a bad, used or unbindable address, or a closed client.
        """
        if self._closed:
            raise closed_error()
        from client._status_server import StatusServer

        return StatusServer(host, port)

    def close(self, timeout: float | None = None) -> None:
        """Flush what is queued, wait up to ``timeout`` s, and stop this client's actors.

        Args:
            timeout: seconds to wait for the last flush; ``None``: as long as it takes.

        Raises:
            MlflowException: what is lost: operations that failed permanently or could be
                neither delivered nor spooled, and that no ``flush()`` raised. What is in the
                spool (``spool_dir``) is not lost: one warning names it and ``runactors replay``.

        Calling it again does nothing; any other method but ``status()`` raises once the
        client is closed. A call racing ``close()`` in another thread either returns and is
        in that last flush, or raises.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._runs = {}
            session, self._session = self._session, None
            self._closed_session = session
            if self._finalizer is not None:
                self._finalizer.detach()
        if session is None:
            _live.discard(self)
            return
        # Sealed before the last flush: a log_* call that got past the closed check above
        # either appended before this (and is flushed) or raises closed_error().
        session.seal()
        try:
            failures = get_system().close_session(session, timeout)
        finally:
            _live.discard(self)  # on status servers until here, with its runs' progress
        if failures:
            raise MlflowException(
                "The following failures occurred while closing the client: " + "\n".join(failures)
            )

    def _drop_queued(self) -> None:
        """Forget every operation this client queued and has not flushed yet."""
        session = self._session
        if session is None or session.sealed:  # closing: its last flush sends what is queued
            return
        for handle in list(session.handles.values()):
            snapshot = handle.queues.drop()
            if snapshot.create is not None and handle.pending is not None:
                handle.pending._set_failed("dropped: the client's context exited with an error")

    def __enter__(self) -> QueueingClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None and exc is None and traceback is None:
            self.flush(synchronous=True)
        elif not _dying.keeps_queued(exc):  # a dying process delivers it (client._dying)
            self._drop_queued()

    # -- processes --------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self._config}

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self._config = state["config"]
        self._closed = False
        self._reset()
        if self._config.end_runs:
            _dying.install()
        _start_status_from_env()  # an unpickled copy may be its process's first client

    def _after_fork_in_child(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
        self._reset()

    def __repr__(self) -> str:
        return (
            f"QueueingClient({self._config.tracking_uri!r}, executor={self._config.executor!r}"
            f"{', closed' if self._closed else ''})"
        )


MlflowAutologgingQueueingClient = QueueingClient


def _reset_clients_in_child() -> None:
    for client in list(_live):
        client._after_fork_in_child()


os.register_at_fork(after_in_child=_reset_clients_in_child)
