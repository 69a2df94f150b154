"""What the sweep shows while it runs: the plain lines or the live view, and which one."""

from __future__ import annotations

import os
import sys
from typing import Protocol

from rich.console import Console

from client.sweep.board import Board
from client.sweep.messages import Progress, TrialResult
from client.sweep.options import Echo
from client.sweep.summary import SweepSummary


class View(Protocol):
    """Told what happens in the sweep, by the parent's loop."""

    def __enter__(self) -> View: ...

    def __exit__(self, *exc: object) -> None: ...

    def note(self, line: str) -> None:
        """A line of its own: the sweep's start, an interruption."""

    def progress(self, event: Progress, board: Board) -> None:
        """A trial started or ended an epoch (``board`` already has it)."""

    def result(self, result: TrialResult, board: Board, echo: bool = True) -> None:
        """A trial ended (``echo``: worth a line of its own)."""

    def tick(self, board: Board) -> None:
        """The parent's loop went round (a status snapshot may have come)."""

    def summary(self, summary: SweepSummary) -> None:
        """The sweep is over: its outcome."""


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def choose_view(plain: bool, echo: Echo) -> View:
    """The live view in a terminal; the plain lines with ``--plain``, in CI, or in a pipe."""
    from client.sweep.live import LiveView
    from client.sweep.plain import PlainView

    if plain or in_ci():
        return PlainView(echo)
    console = Console()
    if not sys.stdout.isatty() or not console.is_terminal or console.is_dumb_terminal:
        return PlainView(echo)
    return LiveView(console)
