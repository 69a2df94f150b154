"""What every run actor is doing: the live record an actor keeps, and the snapshots callers get.

A :class:`RunRecord` is written only by its run's actor (and the executor working for it)
and read by anyone, without locks or messages, so ``status()`` answers at once even while
the actor's flush is waiting on a slow store.

States (``RunStatus.state``):

==========  ==================================================================
``idle``     nothing in flight; operations may be queued, waiting for a flush
``waiting``  a flush is planned and waits for a free executor worker
``flushing`` the run's calls are being made
``retrying`` a call failed transiently and is being retried with backoff
``stopped``  terminated and fully flushed; the run's actor has stopped
``crashed``  the actor failed; the next flush starts a new one for the run
``closed``   the client was closed
==========  ==================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from actors._pending import PendingRunId
from actors._perform import KINDS, empty_counts
from actors._queues import RunQueues

STATES = ("idle", "waiting", "flushing", "retrying", "stopped", "crashed", "closed")
BUSY_STATES = frozenset({"waiting", "flushing", "retrying"})


@dataclass
class RunRecord:
    """The live, actor-owned state of one run."""

    pending: PendingRunId | None
    run_id: str | None = None
    state: str = "idle"
    inflight: dict[str, int] = field(default_factory=empty_counts)
    logged: dict[str, int] = field(default_factory=empty_counts)
    errors: list[str] = field(default_factory=list)
    terminated: bool = False
    create_error: str | None = None
    worker: str | None = None

    @property
    def label(self) -> str:
        """How messages name the run: its ID once known, else its pending label."""
        return self.run_id or str(self.pending)

    def snapshot(self, queues: RunQueues) -> RunStatus:
        queued = queues.counts()
        inflight = self.inflight
        return RunStatus(
            pending_id=self.pending,
            run_id=self.run_id,
            state=self.state,
            queued={kind: queued[kind] + inflight[kind] for kind in KINDS},
            logged=dict(self.logged),
            errors=list(self.errors),
            worker=self.worker,
        )


@dataclass(frozen=True)
class RunStatus:
    """One run, as its actor saw it at the moment of the snapshot."""

    pending_id: PendingRunId | None
    run_id: str | None
    state: str
    queued: dict[str, int]
    logged: dict[str, int]
    errors: list[str]
    worker: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "pending_id": None if self.pending_id is None else str(self.pending_id),
            "run_id": self.run_id,
            "state": self.state,
            "queued": dict(self.queued),
            "logged": dict(self.logged),
            "errors": list(self.errors),
            "worker": self.worker,
        }


@dataclass(frozen=True)
class ClientStatus:
    """A snapshot of every run of one client."""

    runs: list[RunStatus]
    tracking_uri: str | None = None
    executor: str | None = None

    def counts(self) -> dict[str, int]:
        """Runs per state, e.g. ``{"idle": 3, "flushing": 1}``."""
        counts: dict[str, int] = {}
        for run in self.runs:
            counts[run.state] = counts.get(run.state, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "tracking_uri": self.tracking_uri,
            "executor": self.executor,
            "runs": [run.to_dict() for run in self.runs],
        }
