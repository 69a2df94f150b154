"""The parent's gathered view of a sweep: trials, epochs, and every run actor's status.

Fed with what the workers send (progress events, status snapshots, results), it answers
what the views show: trials done, epochs done, metric points logged and the rate at which
they are logged now, and one row per trial run as its worker's client last saw it.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Any

from client.sweep.messages import Progress, Snapshot, TrialResult

RATE_WINDOW_SECONDS = 3.0  # "points/s of logging": over the last few seconds


@dataclass(frozen=True)
class ActorRow:
    """One trial run's actor, as its worker's client last reported it."""

    trial: int
    run_id: str
    epochs: int  # epochs the trial ended so far
    outcome: str  # "running", or how the trial ended (FINISHED, FAILED, KILLED)
    state: str  # the run actor's state (see docs/operations.md)
    queued: int  # entities (metrics, params, tags, datasets) not yet acknowledged
    logged: int  # entities acknowledged by the store
    errors: int
    worker: str  # the trial process, and the executor worker serving the run


class Board:
    """What the parent knows of the sweep, updated as messages arrive."""

    def __init__(self, trials: int, epochs: int) -> None:
        self.trials = trials
        self.epochs = epochs
        self.started = time.monotonic()
        self.run_ids: dict[int, str] = {}
        self.epochs_done: dict[int, int] = {}
        self.results: dict[int, TrialResult] = {}
        self._runs: dict[str, tuple[int, dict[str, Any]]] = {}  # run ID -> (pid, its status)
        self._clocks: dict[int, Snapshot] = {}  # pid -> its latest snapshot (for its clock)
        self._rate: collections.deque[tuple[float, int]] = collections.deque()

    def progress(self, event: Progress) -> None:
        self.run_ids[event.trial] = event.run_id
        if event.epoch is not None:
            self.epochs_done[event.trial] = event.epoch + 1

    def snapshot(self, snapshot: Snapshot) -> None:
        for run in snapshot.status.get("runs", []):
            if run.get("run_id"):
                self._runs[run["run_id"]] = (snapshot.pid, run)
        self._clocks[snapshot.pid] = snapshot
        now = time.monotonic()
        self._rate.append((now, self.points_logged))
        while len(self._rate) > 2 and now - self._rate[1][0] > RATE_WINDOW_SECONDS:
            self._rate.popleft()

    def result(self, result: TrialResult) -> None:
        self.results[result.number] = result
        if result.run_id is not None:
            self.run_ids[result.number] = result.run_id

    @property
    def done(self) -> int:
        return len(self.results)

    @property
    def epochs_total(self) -> int:
        return sum(self.epochs_done.values())

    @property
    def points_logged(self) -> int:
        """Metric points the store acknowledged, over every trial run reported so far."""
        return sum(run["logged"]["metrics"] for _, run in self._runs.values())

    @property
    def points_per_second(self) -> float:
        """Metric points acknowledged per second over the last few seconds."""
        if len(self._rate) < 2:
            return 0.0
        (t0, p0), (t1, p1) = self._rate[0], self._rate[-1]
        return (p1 - p0) / (t1 - t0) if t1 > t0 else 0.0

    @property
    def delivery_seconds(self) -> float:
        """The workers' clients' delivery time, summed over the workers."""
        return sum(clock.delivery_seconds for clock in self._clocks.values())

    @property
    def startup_seconds(self) -> float:
        """Of the delivery time, the workers' first deliveries (which open the store)."""
        return sum(clock.startup_seconds for clock in self._clocks.values())

    @property
    def startup_points(self) -> int:
        """Metric points acknowledged by the end of the workers' first deliveries."""
        return sum(clock.startup_points for clock in self._clocks.values())

    @property
    def call_seconds(self) -> float:
        """The training loops' time in tracking calls, summed over the workers."""
        return sum(clock.call_seconds for clock in self._clocks.values())

    @property
    def workers_reporting(self) -> int:
        return len(self._clocks)

    def rows(self) -> list[ActorRow]:
        """One row per trial run reported by a worker, in trial order."""
        trials = {run_id: trial for trial, run_id in self.run_ids.items()}
        rows = []
        for run_id, (pid, run) in self._runs.items():
            trial = trials.get(run_id)
            if trial is None:
                continue
            worker = f"pid {pid}" + (f" / {run['worker']}" if run.get("worker") else "")
            rows.append(
                ActorRow(
                    trial=trial,
                    run_id=run_id,
                    epochs=self.epochs_done.get(trial, 0),
                    outcome=self.results[trial].status if trial in self.results else "running",
                    state=run["state"],
                    queued=sum(run["queued"].values()),
                    logged=sum(run["logged"].values()),
                    errors=len(run["errors"]),
                    worker=worker,
                )
            )
        return sorted(rows, key=lambda row: row.trial)
