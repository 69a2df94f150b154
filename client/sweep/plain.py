"""The plain view: one line per trial start, epoch and end, as text that pipes well.

Used without a terminal (a pipe, ``CI=true``) or with ``--plain``; its lines are the
interface scripts and tests read, so they stay as they are.
"""

from __future__ import annotations

import time

from client.sweep.board import Board
from client.sweep.messages import Progress, TrialResult
from client.sweep.options import SCORE, Echo
from client.sweep.summary import SweepSummary, summary_lines


def _clock(started: float) -> str:
    return f"[{time.monotonic() - started:6.1f}s]"


def _metrics_text(metrics: dict[str, float]) -> str:
    return "  ".join(f"{key} {value:.3f}" for key, value in metrics.items())


def progress_line(event: Progress, trials: int, started: float) -> str:
    where = f"{_clock(started)} trial {event.trial}/{trials}"
    if event.epoch is None:
        return f"{where} started: run {event.run_id} (worker pid {event.pid})"
    states = ", ".join(f"{state} {n}" for state, n in sorted(event.states.items()))
    return (
        f"{where} epoch {event.epoch + 1}  {_metrics_text(event.metrics)}  "
        f"| actors: {states}; points logged {event.logged}, queued {event.queued}"
    )


def result_line(result: TrialResult, trials: int, started: float) -> str:
    line = f"{_clock(started)} trial {result.number}/{trials} {result.status}"
    if result.metrics:
        line += f"  {SCORE} {result.metrics.get(SCORE, float('nan')):.3f}"
    line += f"  ({result.points} points in {result.seconds:.1f} s)"
    return line + (f": {result.error}" if result.error else "")


class PlainView:
    """Lines through ``echo`` (``click.echo``): progress as it comes, the summary at the end."""

    def __init__(self, echo: Echo) -> None:
        self._echo = echo

    def __enter__(self) -> PlainView:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def note(self, line: str) -> None:
        self._echo(line)

    def progress(self, event: Progress, board: Board) -> None:
        self._echo(progress_line(event, board.trials, board.started))

    def result(self, result: TrialResult, board: Board, echo: bool = True) -> None:
        if echo:
            self._echo(result_line(result, board.trials, board.started))

    def tick(self, board: Board) -> None:
        return None

    def summary(self, summary: SweepSummary) -> None:
        for line in summary_lines(summary):
            self._echo(line)
