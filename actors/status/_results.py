"""The results of ``status()``: a snapshot of one run (:class:`RunStatus`) and of one client
(:class:`ClientStatus`), plain frozen data that a status server serves as JSON.

States (``RunStatus.state``):

==========  ==================================================================
``idle``     nothing in flight; operations may be queued, waiting for a flush
``ready``    a flush is requested and the run waits for its actor (a client has a bounded
             number of live run actors; runs get one first come, first served)
``waiting``  a flush is planned and waits for a free executor worker
``flushing`` the run's calls are being made
``retrying`` a call failed transiently and is being retried with backoff
``spooled``  the run's work is in the spool (``spool_dir``) and not being re-sent right now
             (between flushes, or waiting for one of the spooler's re-sending threads);
             its next flush re-sends it first
``stopped``  terminated and fully flushed (as its last flush returns); its actor stops
``failed``   its creation failed for good (refused by the store, or past its retries with
             no spool to hold it): nothing of the run will be sent; later calls are dropped
             at their flush, with an error; ``errors`` says why
``crashed``  the actor failed; the next flush starts a new one for the run
``closed``   the client was closed (``status()`` still answers, with the final state)
==========  ==================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from actors.delivery._jobs import JobState, empty_counts
from actors.queueing._pending import PendingRunId

# A run's state (the table above); mypy checks every literal written to or compared with one.
RunState = Literal["idle", "ready", JobState, "stopped", "failed", "crashed", "closed"]

# Every state, in the table's order (the status endpoint's order of its ``state`` labels).
STATES: tuple[RunState, ...] = get_args(RunState)


@dataclass(frozen=True)
class RunStatus:
    """One run, as its actor saw it at the moment of the snapshot (``docs/api.md`` has every
    field; the commented ones below are said there too).

    Attributes:
        pending_id: the run's ``PendingRunId``, or ``None`` for a run addressed by its ID.
        run_id: the run's ID once known, else ``None``.
        state: what the run's actor is doing now (see the table above).
        queued: entities per kind accepted and not yet acknowledged by the store.
        logged: entities per kind acknowledged by the store.
        errors: messages of failed operations, oldest first, repeats counted.
        worker: the executor thread or worker process that has the run's job now.
    """

    pending_id: PendingRunId | None
    run_id: str | None
    state: RunState
    queued: dict[str, int]
    logged: dict[str, int]
    errors: list[str]
    worker: str | None = None
    errors_dropped: int = 0  # errors past the cap of ``errors``, counted in it as one line
    retries: int = 0  # transient failures retried so far (cumulative)
    last_retry_error: str | None = None  # the latest of them, kept after recovery
    spooled: dict[str, int] = field(default_factory=empty_counts)  # on disk, to be re-sent
    # On a database store: "on" (metrics through the SQL fast path), "off", or "fallback:
    # why" (through MLflow's log_batch); None before any metrics or on other stores.
    sql_fast_path: str | None = None
    # With spool_dir: entities in the write-ahead journal on disk that the store has not
    # acknowledged yet, whether still in memory too (queued) or only there (spooled).
    journaled: dict[str, int] = field(default_factory=empty_counts)

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as JSON-ready data (the status server's ``/status`` document).

        Returns:
            A dict of the fields, the pending ID as its label.
        """
        return {
            "pending_id": None if self.pending_id is None else str(self.pending_id),
            "run_id": self.run_id,
            "state": self.state,
            "queued": dict(self.queued),
            "logged": dict(self.logged),
            "errors": list(self.errors),
            "worker": self.worker,
            "errors_dropped": self.errors_dropped,
            "retries": self.retries,
            "last_retry_error": self.last_retry_error,
            "spooled": dict(self.spooled),
            "sql_fast_path": self.sql_fast_path,
            "journaled": dict(self.journaled),
        }


@dataclass(frozen=True)
class ClientStatus:
    """A snapshot of every run of one client, as ``QueueingClient.status()`` returns it.

    Attributes:
        runs: one ``RunStatus`` per run the client has used.
        tracking_uri: the client's store.
        executor: ``"thread"`` or ``"process"``.
    """

    runs: list[RunStatus]
    tracking_uri: str | None = None
    executor: str | None = None
    closed: bool = False  # the client is closed: ``runs`` hold their final state
    client_id: int | None = None  # the number in its runs' pending labels; None before use
    # With spool_dir, the keeper process: "running", "restarted" (running, after it died and
    # was replaced), "dead" (not running: a death of the process would leave runs RUNNING),
    # "stopped" (the client is closed); None without spool_dir or before first use.
    keeper: str | None = None
    # With spool_dir: why the last write of the journal failed (a full disk...), until one
    # succeeds; what was logged meanwhile is only in memory. None while it is written.
    journal_error: str | None = None

    def counts(self) -> dict[str, int]:
        """Runs per state.

        Returns:
            The number of runs in each state that has any, e.g. ``{"idle": 3, "flushing": 1}``.
        """
        counts: dict[str, int] = {}
        for run in self.runs:
            counts[run.state] = counts.get(run.state, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as JSON-ready data, its runs included (one client of ``/status``).

        Returns:
            A dict of the fields, ``runs`` as a list of ``RunStatus.to_dict()``.
        """
        return {
            "client_id": self.client_id,
            "tracking_uri": self.tracking_uri,
            "executor": self.executor,
            "closed": self.closed,
            "keeper": self.keeper,
            "journal_error": self.journal_error,
            "runs": [run.to_dict() for run in self.runs],
        }
