"""``QueueingClient``: the drop-in successor of MLflow's ``MlflowAutologgingQueueingClient``."""

from __future__ import annotations

import math
import os
import threading
import uuid
import weakref
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from mlflow.entities.dataset_input import DatasetInput
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, INVALID_STATE
from mlflow.utils.time import get_current_time_millis

from actors import (
    ClientStatus,
    CreateRunCall,
    PendingRunId,
    RunHandle,
    Session,
    SessionConfig,
    Terminate,
    check_dataset_input,
    check_metrics_mapping,
    check_spool_dir,
    check_status,
    check_step,
    check_text,
    check_timestamp,
    closed_error,
    exit_timeout,
    get_system,
    metric_rows,
    param_pairs,
    tag_pairs,
)
from client._operations import RunOperations
from client._registry import STATUS_PORT_ENV
from client._registry import live as _live
from client._tracking_uri import resolve_tracking_uri

if TYPE_CHECKING:
    from mlflow.data.dataset import Dataset

    from client._status_server import StatusServer

RunIdLike = str | PendingRunId
EXECUTORS = ("thread", "process")


def _start_status_from_env() -> None:
    if os.environ.get(STATUS_PORT_ENV) is not None:
        from client._status_server import start_from_environment

        start_from_environment()


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, INVALID_PARAMETER_VALUE)


def _release(session: Session) -> None:
    """Finalizer of a client dropped without ``close()``: send what it queued, then stop;
    what is lost is logged (warnings), as the exit handler logs it.

    Runs on its own short-lived thread, since garbage collection may happen anywhere, and
    within ``RUNACTORS_EXIT_TIMEOUT`` seconds, as at exit: a hung store must not keep the
    thread, the session's actors and its executor forever.
    """
    if session.closed:
        return

    def close() -> None:
        # Nobody to raise to: what close() would raise is logged, as at exit.
        get_system().close_unattended(session, exit_timeout(), "a client dropped without close()")

    threading.Thread(target=close, name="runactors-release", daemon=True).start()


def _check_spool_dir(spool_dir: Any) -> str | None:
    """The spool folder as an absolute path (a pickled copy must write to the same one),
    made (0700) and proven writable now: a folder that cannot be used fails here, naming
    it, not at the first outage. The journal itself is created at the first spool write."""
    if spool_dir is None:
        return None
    if not isinstance(spool_dir, str | os.PathLike) or not os.fspath(spool_dir):
        raise _invalid(f"Invalid spool_dir {spool_dir!r}: expected a folder path (str, PathLike).")
    path = os.path.abspath(os.fspath(spool_dir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise _invalid(f"Invalid spool_dir {path!r}: it exists and is not a folder.")
    check_spool_dir(path)
    return path


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
    ) -> None:
        if executor not in EXECUTORS:
            raise _invalid(f"Invalid executor {executor!r}: expected one of {list(EXECUTORS)}.")
        if max_workers is not None and (
            isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1
        ):
            raise _invalid(f"Invalid max_workers {max_workers!r}: expected an integer >= 1.")
        if flush_interval is not None and (
            isinstance(flush_interval, bool)
            or not isinstance(flush_interval, int | float)
            or not 0 < flush_interval < math.inf
        ):
            raise _invalid(
                f"Invalid flush_interval {flush_interval!r}: expected a number of seconds > 0, "
                "or None for no background flushes."
            )
        if max_queued is not None and (
            isinstance(max_queued, bool) or not isinstance(max_queued, int) or max_queued < 1
        ):
            raise _invalid(
                f"Invalid max_queued {max_queued!r}: expected an integer >= 1 (entities held "
                "in memory), or None for no bound."
            )
        if not isinstance(retry_timeout, int | float) or not retry_timeout >= 0:
            raise _invalid(f"Invalid retry_timeout {retry_timeout!r}: expected >= 0 seconds.")
        self._config = SessionConfig(
            # Checked and made absolute here: a pickled copy must reach the same store.
            tracking_uri=resolve_tracking_uri(tracking_uri),
            executor=executor,
            max_workers=max_workers,
            flush_interval=None if flush_interval is None else float(flush_interval),
            max_queued=max_queued,
            retry_timeout=float(retry_timeout),
            spool_dir=_check_spool_dir(spool_dir),
        )
        self._closed = False
        self._reset()
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
                self._finalizer = weakref.finalize(self, _release, session)
                self._finalizer.atexit = False  # the actor system's exit handler closes it
                self._session = session
            return self._session

    def _register(self, run_id: Any) -> RunHandle:
        """The slow path of every call: the first use of a run ID string, or a bad ID."""
        if self._closed:
            raise closed_error()
        if isinstance(run_id, PendingRunId):
            raise _invalid(
                f"{run_id!r} was not created by this client: a PendingRunId can only be used "
                "with the client whose create_run() returned it."
            )
        if not isinstance(run_id, str) or not run_id:
            raise _invalid(
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
        """Queue the creation of a run and return its ``PendingRunId``."""
        if self._closed:
            raise closed_error()
        if experiment_id is None:
            raise _invalid("Invalid experiment_id None: expected an experiment ID.")
        if run_name is not None and not isinstance(run_name, str):
            raise _invalid(f"Invalid run_name {run_name!r}: expected a string.")
        check_text(run_name, "run_name")
        experiment_id = str(experiment_id)
        check_text(experiment_id, "experiment_id")
        check_timestamp(start_time, "start_time")
        pairs = tag_pairs(tags) if tags else []
        if start_time is None:  # fixed now: a spooled creation is re-sent identical
            start_time = get_current_time_millis()
        create = CreateRunCall(experiment_id, start_time, pairs, run_name, str(uuid.uuid4()))
        handle = get_system().register_run(self._get_session(), None, create)
        with self._lock:
            self._runs[handle.key] = handle
        assert handle.pending is not None
        return handle.pending

    def set_terminated(
        self, run_id: RunIdLike, status: str | None = None, end_time: int | None = None
    ) -> None:
        """Queue the termination of a run; it is sent after everything queued before it."""
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
        """Queue params; keys and values are truncated as MLflow's seed client does."""
        handle = self._handle(run_id)
        pairs = param_pairs(params)
        if pairs:
            handle.queues.add_params(pairs)

    def set_tags(self, run_id: RunIdLike, tags: dict[str, Any]) -> None:
        """Queue tags; keys and values are truncated as MLflow's seed client does."""
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
        """Queue metrics at ``step`` (default 0), timestamped now."""
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
        """Queue dataset inputs; ``None`` or ``[]`` does nothing."""
        if not datasets:
            return
        handle = self._handle(run_id)
        for dataset in datasets:
            if not isinstance(dataset, DatasetInput):
                raise _invalid(
                    f"Invalid dataset {dataset!r}: expected mlflow.entities.DatasetInput."
                )
            check_dataset_input(dataset)
        handle.queues.add_datasets(list(datasets))

    def flush(self, synchronous: bool = True) -> RunOperations:
        """Send everything this client queued; wait for it unless ``synchronous=False``."""
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
        )

    def serve_status(self, host: str = "127.0.0.1", port: int = 0) -> StatusServer:
        """Serve the status of every open client of this process over HTTP, until the
        returned server's ``close()`` (or exit): ``GET /status`` (JSON) and ``GET /metrics``
        (Prometheus). ``port=0`` picks a free port (see ``StatusServer.url``). No
        authentication: binding beyond loopback is the caller's explicit choice.

        Raises ``MlflowException`` if the address is in use or cannot be bound.
        """
        if self._closed:
            raise closed_error()
        from client._status_server import StatusServer

        return StatusServer(host, port)

    def close(self, timeout: float | None = None) -> None:
        """Flush what is queued, wait up to ``timeout`` s, and stop this client's actors.

        Raises ``MlflowException`` for what is lost: operations that failed permanently or
        could be neither delivered nor spooled, and that no ``flush()`` raised. What is in
        the spool (``spool_dir``) is not lost: one warning names it and ``runactors replay``.
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
        if session is None:
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
        else:
            self._drop_queued()

    # -- processes --------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self._config}

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self._config = state["config"]
        self._closed = False
        self._reset()
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
