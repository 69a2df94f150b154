"""The outcome of a sweep, and the figures a user can believe.

The points per second that matter are those of *delivery*: metric points over the time the
clients spent delivering them (each flush until the store acknowledged it). The training
time is not the tracking's: the trials train while their points are delivered in the
background, and the training loops only pay for their ``log_*`` and ``flush`` calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rich.table import Table

from client.sweep.messages import TrialResult
from client.sweep.options import SCORE
from client.sweep.store import ui_command


@dataclass
class SweepSummary:
    """The outcome of a sweep."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    results: list[TrialResult]
    seconds: float
    delivery_seconds: float = 0.0  # the workers' clients, flush to acknowledged, summed
    startup_seconds: float = 0.0  # of it, the workers' first deliveries (opening the store)
    startup_points: int = 0  # metric points acknowledged by the end of those
    call_seconds: float = 0.0  # the training loops' time in tracking calls, summed
    workers: int = 0  # worker processes that reported

    @property
    def finished(self) -> list[TrialResult]:
        return [result for result in self.results if result.status == "FINISHED"]

    @property
    def failures(self) -> list[TrialResult]:
        return [result for result in self.results if result.status != "FINISHED"]

    @property
    def best(self) -> TrialResult | None:
        """The finished trial with the highest final :data:`SCORE` (NaN counts as lowest)."""
        scored = [r for r in self.finished if not np.isnan(r.metrics.get(SCORE, np.nan))]
        return max(scored, key=lambda r: r.metrics[SCORE], default=None)

    @property
    def points(self) -> int:
        """Metric points of the trial runs that the store acknowledged."""
        return sum(result.points for result in self.results)

    @property
    def trial_runs(self) -> int:
        return sum(1 for result in self.results if result.run_id is not None)

    @property
    def delivery_rate(self) -> float | None:
        """Metric points per second of delivery once the workers' clients had started (None
        if every point went with a first delivery: the sweep was too small to tell)."""
        seconds = self.delivery_seconds - self.startup_seconds
        points = self.points - self.startup_points
        if seconds <= 0.001 or points <= 0:
            return None
        return points / seconds

    @property
    def trial_seconds(self) -> float:
        """The trials' time in their workers, summed."""
        return sum(result.seconds for result in self.results)

    @property
    def store_share(self) -> float:
        """The share of the trials' time during which their client was delivering."""
        return self.delivery_seconds / self.trial_seconds if self.trial_seconds > 0 else 0.0


def _rate_text(summary: SweepSummary) -> str:
    rate = summary.delivery_rate
    return "n/a (every point went with a first delivery)" if rate is None else f"{rate:,.0f}"


def _best_text(best: TrialResult) -> str:
    params = ", ".join(f"{key}={value}" for key, value in best.params.items())
    return f"trial {best.number} ({SCORE} {best.metrics[SCORE]:.4f}) run {best.run_id}; {params}"


def summary_lines(summary: SweepSummary) -> list[str]:
    """The end-of-sweep report, as plain lines."""
    best = summary.best
    lines = [
        f"done in {summary.seconds:.1f} s: {len(summary.results)} trial runs "
        f"({len(summary.finished)} finished, {len(summary.failures)} failed) under parent run "
        f"{summary.parent_run_id}",
        f"best trial: {_best_text(best)}" if best else "best trial: none (no trial finished)",
        f"metric points logged: {summary.points} by {summary.trial_runs} trial runs",
        f"delivery: {summary.delivery_seconds:.2f} s from flush to acknowledged, "
        f"{summary.store_share:.1%} of the trials' {summary.trial_seconds:.1f} s, in the "
        f"background (of it {summary.startup_seconds:.2f} s the workers' first deliveries, "
        f"which open the store); after those: {_rate_text(summary)} points/s",
        f"tracking calls in the training loops: {summary.call_seconds * 1000:.1f} ms",
        f"failures: {len(summary.failures)}",
    ]
    lines.extend(f"  trial {r.number}: {r.error or r.status}" for r in summary.failures)
    lines.append(f"view: {ui_command(summary.tracking_uri)}")
    return lines


def summary_table(summary: SweepSummary) -> Table:
    """The end-of-sweep report, as a table for the live view."""
    table = Table(title="sweep summary", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    best = summary.best
    table.add_row(
        "trials",
        f"{len(summary.results)} ({len(summary.finished)} finished, "
        f"{len(summary.failures)} failed or killed) in {summary.seconds:.1f} s",
    )
    table.add_row("parent run", summary.parent_run_id)
    table.add_row("best trial", _best_text(best) if best else "none (no trial finished)")
    table.add_row("metric points logged", f"{summary.points:,} by {summary.trial_runs} trial runs")
    table.add_row(
        "delivery time",
        f"{summary.delivery_seconds:.2f} s (each flush until the store acknowledged it, "
        f"summed over {summary.workers} workers), of which {summary.startup_seconds:.2f} s "
        "their first deliveries (which open the store)",
    )
    table.add_row("delivery rate", f"{_rate_text(summary)} points/s after the first deliveries")
    table.add_row(
        "store's share",
        f"{summary.store_share:.1%} of the trials' {summary.trial_seconds:.1f} s, "
        "in the background of the training",
    )
    table.add_row("tracking calls", f"{summary.call_seconds * 1000:.1f} ms in the training loops")
    for result in summary.failures:
        table.add_row(f"trial {result.number}", result.error or result.status, style="red")
    table.add_row("view", ui_command(summary.tracking_uri))
    return table
