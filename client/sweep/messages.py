"""What the parent and the worker processes send each other over their pipes.

The parent sends a worker :class:`TrialSpec` (a trial to run) or ``None`` (exit). A worker
sends, in order: :class:`WorkerReady`, then per trial its :class:`Progress` events, its
:class:`Snapshot` of its client's status (every few tenths of a second and once at the end)
and its :class:`TrialResult` (a trial's last event and snapshot always arrive before it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TrialSpec:
    """One trial, as sent to a worker."""

    number: int  # 1-based
    params: dict[str, Any]
    epochs: int
    seed: int
    experiment_id: str
    parent_run_id: str
    fail: bool = False
    run_id: str | None = None  # created by the parent as it hands the trial out
    log_every_batch: bool = False


@dataclass(frozen=True)
class WorkerReady:
    """A worker runs our code: it can take a trial."""

    pid: int


@dataclass(frozen=True)
class Progress:
    """A trial started (its run exists) or ended an epoch."""

    trial: int
    run_id: str
    epoch: int | None = None  # None: the trial's run was just created
    metrics: dict[str, float] = field(default_factory=dict)
    states: dict[str, int] = field(default_factory=dict)  # the worker client's run states
    logged: int = 0  # metric points the store acknowledged so far
    queued: int = 0  # metric points queued or in flight
    pid: int | None = None  # the worker process (on the "started" event)


@dataclass(frozen=True)
class Snapshot:
    """A worker's client as ``status()`` sees it, and how long the client spent delivering.

    ``status`` is ``ClientStatus.to_dict()``, its runs cut to those that changed since the
    worker's previous snapshot (a run already sent as ``stopped`` is not sent again), so
    that a worker that ran many trials keeps its messages small.
    """

    pid: int
    status: dict[str, Any]
    delivery_seconds: float  # flush to acknowledged, overlapping flushes counted once
    call_seconds: float  # the training loop's time inside log_* and flush calls
    startup_seconds: float = 0.0  # the first delivery (starts the executor, opens the store)
    startup_points: int = 0  # metric points acknowledged when the first delivery ended


@dataclass(frozen=True)
class TrialResult:
    """How a trial ended."""

    number: int
    run_id: str | None
    status: str  # FINISHED, FAILED or KILLED
    params: dict[str, Any]
    metrics: dict[str, float]  # the last epoch's
    points: int  # metric points the store acknowledged
    seconds: float
    error: str | None = None


Message = WorkerReady | Progress | Snapshot | TrialResult
