"""``runactors replay``: deliver the journals a closed or dead process left in a spool folder.

Each journal is locked while it is delivered (a live client's journal, or one another replay
is delivering, is reported and left alone), delivered run by run in order, and deleted once
empty. Exit status 1 if anything is left: undelivered calls, a locked, unreadable or
newer-format journal. Foreign files in the folder are reported and never touched.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import click
from mlflow.tracking import MlflowClient
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from actors import (
    KINDS,
    NEW_SUFFIX,
    PREFIX,
    SIDE_SUFFIXES,
    Spool,
    SpoolError,
    SpoolGone,
    SpoolLocked,
    call_with_retry,
    deliver,
    empty_counts,
    end_pending_runs,
    make_client,
    remove_stale_new,
    side_files,
    spool_files,
)

RETRY_TIMEOUT = 60.0


@dataclass
class JournalReport:
    """One journal's line of the summary."""

    name: str
    runs: int = 0
    calls: int = 0
    delivered: dict[str, int] = field(default_factory=empty_counts)
    calls_left: int = 0
    ended: int = 0  # runs of a dead process ended KILLED (the keeper could not)
    status: str = "delivered"
    errors: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.status != "delivered"


def _entities(counts: dict[str, int]) -> str:
    return ", ".join(f"{counts[kind]} {kind}" for kind in KINDS if counts[kind]) or "-"


def _foreign_files(folder: Path, journals: list[Path]) -> list[Path]:
    ours = {p.name for path in journals for p in [path, *side_files(path)]}
    return sorted(
        path
        for path in folder.iterdir()
        if path.name not in ours
        and not (path.name.startswith(PREFIX) and path.name.endswith(NEW_SUFFIX))
        # side files of a journal delivered (and deleted) by another process meanwhile
        and not (path.name.startswith(PREFIX) and path.name.endswith(SIDE_SUFFIXES))
    )


class _Progress:
    """The progress bar on a terminal; on anything else, a plain line at the first call
    delivered and at every tenth of the total, so logs show a replay advancing."""

    def __init__(self, console: Console, total: int) -> None:
        self._console = console
        self._total = max(total, 1)
        self._done = 0
        self._next_line = 0
        self._bar: Progress | None = None
        self._task: Any = None
        if console.is_terminal:
            self._bar = Progress(
                TextColumn("[bold]replay[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("calls"),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
            self._task = self._bar.add_task("replay", total=total)
            self._bar.start()

    def advance(self, _key: str, _counts: dict[str, int]) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.update(self._task, completed=self._done)
        elif self._done >= self._next_line:
            self._console.print(f"runactors replay: {self._done}/{self._total} calls delivered")
            self._next_line = self._done + max(self._total // 10, 1)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _open_all(
    journals: list[Path], err: Callable[[str], None]
) -> tuple[list[Spool], list[JournalReport]]:
    opened: list[Spool] = []
    reports: list[JournalReport] = []
    for path in journals:
        try:
            opened.append(Spool.open(path))
        except SpoolGone:
            continue  # delivered by a replay running at the same time
        except SpoolLocked:
            err(f"{path.name}: in use by a live client or another replay; left for later")
            reports.append(JournalReport(path.name, status="locked"))
        except SpoolError as exc:
            err(f"{path.name}: {exc.message}")
            reports.append(JournalReport(path.name, status="unreadable", errors=[exc.message]))
    return opened, reports


def _client(uri: str, retry_timeout: float, clients: dict[str, MlflowClient]) -> MlflowClient:
    """One client per tracking URI, the kind the executors use (one HTTP attempt per call,
    so this command's retries are the only ones). Making one already opens the store (a SQLite
    store checks its tables), so that is retried like any call: it may be locked or down."""
    if uri not in clients:
        clients[uri] = call_with_retry(partial(make_client, uri), retry_timeout)
    return clients[uri]


def _deliver_one(
    spool: Spool,
    tracking_uri: str | None,
    retry_timeout: float,
    clients: dict[str, MlflowClient],
    progress: _Progress,
) -> JournalReport:
    report = JournalReport(spool.path.name)
    try:
        uri = tracking_uri or spool.tracking_uri
        try:
            client = _client(uri, retry_timeout, clients)
        except Exception as exc:
            report.status = "store unavailable"
            report.calls_left = spool.pending_calls()
            report.errors = [f"tracking store {uri} unavailable: {exc!r}"]
            return report
        summary = deliver(spool, client, retry_timeout, progress.advance, tracking_uri=uri)
        report.runs = len(summary.runs)
        report.calls = summary.calls
        report.delivered = summary.delivered
        report.calls_left = summary.calls_left
        report.errors = summary.errors
        # Then the runs a keeper recorded and could not end (their process died).
        known = {run.key: run.run_id for run in summary.runs if run.run_id is not None}
        ends = end_pending_runs(spool, client, uri, retry_timeout, known)
        report.ended, report.errors = len(ends.ended), report.errors + ends.errors
        if report.calls_left or ends.left:
            report.status = "left"
    except SpoolError as exc:
        report.status, report.errors = "journal error", [exc.message]
    finally:
        spool.close()
    return report


def _summary(console: Console, reports: list[JournalReport]) -> None:
    table = Table(title="runactors replay")
    for column in ("journal", "runs", "calls", "delivered", "calls left", "status"):
        numeric = column in ("runs", "calls", "calls left")
        table.add_column(column, justify="right" if numeric else "left", no_wrap=True)
    for report in reports:
        table.add_row(
            report.name,
            str(report.runs),
            str(report.calls),
            _entities(report.delivered),
            str(report.calls_left),
            report.status,
        )
    console.print(table)
    for report in reports:
        if report.ended:
            console.print(f"{report.name}: {report.ended} runs of a dead process ended KILLED")
        for error in report.errors:
            console.print(f"{report.name}: {error}", markup=False, soft_wrap=True)


def replay_folder(
    folder: Path, tracking_uri: str | None, retry_timeout: float
) -> list[JournalReport]:
    """Deliver every journal in ``folder``; one report per journal, printed as a table."""
    out = Console(width=None if sys.stdout.isatty() else 160, highlight=False)
    err_console = Console(stderr=True, highlight=False)

    def err(message: str) -> None:
        err_console.print(f"runactors replay: {message}", markup=False, soft_wrap=True)

    try:
        remove_stale_new(folder)
        journals = spool_files(folder)
        foreign = _foreign_files(folder, journals)
    except OSError as exc:
        raise click.ClickException(f"cannot read spool folder {folder}: {exc}") from None
    for path in foreign:
        err(f"{path.name}: not a runactors journal; left alone")
    if not journals:
        out.print(f"Nothing to replay in {folder}.")
        return []
    opened, reports = _open_all(journals, err)
    clients: dict[str, MlflowClient] = {}
    progress = _Progress(err_console, sum(spool.pending_calls() for spool in opened))
    try:
        for spool in opened:
            reports.append(_deliver_one(spool, tracking_uri, retry_timeout, clients, progress))
    finally:
        progress.stop()
        for spool in opened:
            spool.close()  # a no-op for the delivered ones; keeps the rest if interrupted
    _summary(out, reports)
    return reports


@click.command()
@click.argument("spool_dir", type=click.Path(path_type=Path))
@click.option(
    "--tracking-uri",
    default=None,
    help="Deliver to this tracking store or server instead of each journal's own.",
)
@click.option(
    "--retry-timeout",
    type=click.FloatRange(min=0),
    default=RETRY_TIMEOUT,
    show_default=True,
    help="How long a transiently failing call is retried before its run is left for later.",
)
def replay(spool_dir: Path, tracking_uri: str | None, retry_timeout: float) -> None:
    """Deliver the operations spooled in SPOOL_DIR, in order, exactly once.

    Every journal (runactors-*.spool) not in use by a live process is delivered to its
    tracking URI (or --tracking-uri) and deleted once delivered. Safe to run again, to
    interrupt at any point, and to run twice at once. Exits with status 1 if anything is
    left (undelivered calls, or a journal locked by a live process, unreadable or of
    another format version). Other files in SPOOL_DIR are reported and left alone.
    """
    if not spool_dir.exists():
        raise click.ClickException(f"spool folder {spool_dir} does not exist")
    if not spool_dir.is_dir():
        raise click.ClickException(f"{spool_dir} is not a folder")
    # One HTTP attempt per call: the delivery's own retry loop (bounded by --retry-timeout)
    # does the retrying, and looks a creation up before sending it again, where MLflow's
    # HTTP layer would re-send a creation blindly, and for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    # MLflow prints "View run ... at: URL" per run terminated on a server: not replay's output.
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    reports = replay_folder(spool_dir, tracking_uri, retry_timeout)
    if any(report.failed for report in reports):
        sys.exit(1)
