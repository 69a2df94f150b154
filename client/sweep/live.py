"""The live view: what the sweep's run actors are doing, redrawn in the terminal.

Overall progress (trials done, epochs, metric points logged and the rate of logging now,
the delivery time so far, summed over the workers), then a table of the trial runs'
actors as their workers' clients report them (state, queued, logged, errors, worker), and at
the end a summary table. The display is redrawn by the parent's own loop (no refresh
thread), at most every :data:`REFRESH_SECONDS`.
"""

from __future__ import annotations

import time

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from client.sweep.board import Board
from client.sweep.messages import Progress, TrialResult
from client.sweep.plain import result_line
from client.sweep.summary import SweepSummary, summary_table

REFRESH_SECONDS = 0.25
MAX_ROWS = 16  # actor rows shown: the running trials first, then the latest ended

STATE_STYLES = {
    "idle": "dim",
    "waiting": "yellow",
    "flushing": "cyan",
    "retrying": "bold yellow",
    "spooled": "magenta",
    "stopped": "green",
    "failed": "bold red",
    "crashed": "bold red",
    "closed": "dim",
}
OUTCOME_STYLES = {"FINISHED": "green", "FAILED": "bold red", "KILLED": "yellow"}


def render(board: Board, header: str = "") -> RenderableType:
    """The live view of ``board``: a progress line and the table of run actors."""
    elapsed = time.monotonic() - board.started
    progress = Text.assemble(
        ("trials ", "bold"),
        f"{board.done}/{board.trials}",
        ("   epochs ", "bold"),
        f"{board.epochs_total}/{board.trials * board.epochs}",
        ("   points logged ", "bold"),
        f"{board.points_logged:,}",
        ("   logging ", "bold"),
        f"{board.points_per_second:,.0f} points/s",
        ("   delivery time ", "bold"),
        f"{board.delivery_seconds:.1f} s ({board.workers_reporting} workers)",
        ("   elapsed ", "bold"),
        f"{elapsed:.1f} s",
    )
    table = Table(title="run actors", title_justify="left", expand=False)
    table.add_column("trial", justify="right")
    table.add_column("epochs", justify="right")
    table.add_column("trial status")
    table.add_column("actor state")
    table.add_column("queued", justify="right")
    table.add_column("logged", justify="right")
    table.add_column("errors", justify="right")
    table.add_column("worker")
    rows = board.rows()
    running = [row for row in rows if row.outcome == "running"]
    ended = [row for row in rows if row.outcome != "running"]
    shown = sorted(running + ended[-max(MAX_ROWS - len(running), 0) :], key=lambda r: r.trial)
    for row in shown[:MAX_ROWS]:
        table.add_row(
            f"trial-{row.trial}",
            f"{row.epochs}/{board.epochs}",
            Text(row.outcome, style=OUTCOME_STYLES.get(row.outcome, "")),
            Text(row.state, style=STATE_STYLES.get(row.state, "")),
            f"{row.queued:,}",
            f"{row.logged:,}",
            Text(str(row.errors), style="bold red" if row.errors else ""),
            row.worker,
        )
    hidden = len(rows) - min(len(shown), MAX_ROWS)
    parts: list[RenderableType] = [Text(header, style="dim")] if header else []
    parts += [progress, table]
    if hidden > 0:
        parts.append(Text(f"... {hidden} more trial runs", style="dim"))
    return Group(*parts)


class LiveView:
    """The view in a terminal: a rich ``Live`` display, started with the sweep's first
    line (so a store that cannot be used leaves no empty display behind)."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self._live: Live | None = None
        self._header = ""
        self._board: Board | None = None
        self._drawn = 0.0

    def __enter__(self) -> LiveView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def note(self, line: str) -> None:
        """A line worth keeping (the sweep's start, an interruption): above the display."""
        if self._live is None and line.startswith("sweep: "):
            self._header = line
            self._live = Live(console=self.console, auto_refresh=False, transient=False)
            self._live.start()
        self.console.print(Text(line))

    def progress(self, event: Progress, board: Board) -> None:
        self.tick(board)

    def result(self, result: TrialResult, board: Board, echo: bool = True) -> None:
        if echo:  # a trial's end stays above the display, as a log
            self.console.print(Text(result_line(result, board.trials, board.started)))
        self.tick(board, force=True)

    def tick(self, board: Board, force: bool = False) -> None:
        self._board = board
        now = time.monotonic()
        if self._live is None or (not force and now - self._drawn < REFRESH_SECONDS):
            return
        self._drawn = now
        self._live.update(render(board), refresh=True)

    def close(self) -> None:
        """Draw the final state and stop the display (it stays on the screen)."""
        if self._live is None:
            return
        if self._board is not None:
            self._live.update(render(self._board), refresh=True)
        self._live.stop()
        self._live = None

    def summary(self, summary: SweepSummary) -> None:
        self.close()
        self.console.print(summary_table(summary))
