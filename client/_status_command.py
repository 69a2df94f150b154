"""``runactors status URL``: what a status server (``serve_status``) publishes, as a table.

One table of every client and run of the process at ``URL`` (its ``/status`` JSON); with
``--watch`` it is redrawn every ``--interval`` seconds (rich's live display on a terminal,
one table per interval otherwise) until Ctrl-C, which ends it with status 0. Nothing
answering at ``URL`` is a one-line error on stderr and exit status 1. Without a terminal
(a pipe, a file) nothing is cut or wrapped, so ``| grep RUN_ID`` finds a run's row;
``--json`` is one JSON object per line.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import click
from rich.console import Console, Group, JustifyMethod, RenderableType
from rich.table import Table
from rich.text import Text

from actors import KINDS

FETCH_TIMEOUT = 5.0  # seconds a status server has to answer
ERROR_CHARS = 160  # of a run's latest error, under the table
PIPE_WIDTH = 1_000_000  # columns of a console that is no terminal: no line is ever wrapped


class StatusUnavailable(Exception):
    """Nothing (or not a runactors status server) answered at the URL."""


def status_url(url: str) -> str:
    """The ``/status`` address of a server given as ``http://HOST:PORT`` (or ``HOST:PORT``,
    or the ``/status`` address itself)."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    if not url.startswith(("http://", "https://")):
        raise click.BadParameter(f"{url!r}: expected http://HOST:PORT", param_hint="URL")
    url = url.rstrip("/")
    return url if url.endswith("/status") else url + "/status"


def fetch_status(url: str, timeout: float = FETCH_TIMEOUT) -> dict[str, Any]:
    """The JSON a status server answers at ``url`` (a ``/status`` address)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        raise StatusUnavailable(f"{url} answered HTTP {exc.code}: not a runactors status") from exc
    except urllib.error.URLError as exc:
        raise StatusUnavailable(f"nothing answers at {url}: {exc.reason}") from exc
    except (OSError, ValueError) as exc:  # a timeout, a reset connection, a malformed URL
        raise StatusUnavailable(f"nothing answers at {url}: {exc}") from exc
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, dict) or not isinstance(document.get("clients"), list):
        raise StatusUnavailable(f"{url} did not answer with a runactors status")
    return document


def _total(counts: dict[str, int] | None) -> int:
    return sum((counts or {}).get(kind, 0) for kind in KINDS)


def _error_count(run: dict[str, Any]) -> int:
    """Errors of a run, repeats (``(xN)``) and those no longer kept included."""
    count = int(run.get("errors_dropped") or 0)
    for message in run.get("errors") or []:
        head, _, tail = str(message).rpartition(" (x")
        count += int(tail[:-1]) if head and tail.endswith(")") and tail[:-1].isdigit() else 1
    return count


def status_view(
    document: dict[str, Any],
    url: str,
    problem: str | None = None,
    error_chars: int | None = ERROR_CHARS,
) -> Group:
    """The table of every client and run in a ``/status`` document, with a title line, the
    clients' stores, and each failing run's latest error (its first ``error_chars``
    characters; ``None``: whole, as a pipe gets it)."""
    clients = document.get("clients") or []
    runs = [(client, run) for client in clients for run in client.get("runs") or []]
    states: dict[str, int] = {}
    for _, run in runs:
        states[run.get("state", "?")] = states.get(run.get("state", "?"), 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
    title = (
        f"runactors at {url} (pid {document.get('pid')}): {len(clients)} client(s), "
        f"{len(runs)} run(s){': ' + summary if summary else ''}"
    )
    # Text, never str: a served value is not rich markup ("worker-0[pid 42]", "[::1]").
    # The title is a line of its own: a table's title is wrapped to the table's width.
    table = Table(expand=False)
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("client", "right"),
        ("run", "left"),
        ("state", "left"),
        ("queued", "right"),
        ("logged", "right"),
        ("spooled", "right"),
        ("errors", "right"),
        ("retries", "right"),
        ("worker", "left"),
    )
    for name, justify in columns:
        table.add_column(name, justify=justify, overflow="fold")
    notes: list[RenderableType] = []
    for client in clients:
        cid = client.get("client_id")
        closed = " (closed)" if client.get("closed") else ""
        notes.append(
            Text(f"client {cid}: {client.get('executor')} executor, {client.get('tracking_uri')}")
            + Text(closed)
        )
    for client, run in runs:
        label = run.get("run_id") or run.get("pending_id") or "?"
        errors = _error_count(run)
        state = str(run.get("state"))
        style = {"crashed": "red", "failed": "red", "retrying": "yellow", "spooled": "yellow"}.get(
            state, ""
        )
        table.add_row(
            Text(str(client.get("client_id"))),
            Text(str(label)),
            Text(state, style=style),
            Text(f"{_total(run.get('queued')):,}"),
            Text(f"{_total(run.get('logged')):,}"),
            Text(f"{_total(run.get('spooled')):,}"),
            Text(f"{errors:,}", style="red" if errors else ""),
            Text(f"{int(run.get('retries') or 0):,}"),
            Text(str(run.get("worker") or "-")),
        )
        if run.get("errors"):
            last = str(run["errors"][-1]).replace("\n", " ")
            if error_chars is not None and len(last) > error_chars:
                last = last[:error_chars] + "..."
            notes.append(Text(f"{label}: {last}", style="red"))
    parts: list[RenderableType] = [Text(title), table, *notes]
    if problem:
        parts.append(Text(problem, style="bold red"))
    return Group(*parts)


@click.command()
@click.argument("url")
@click.option("--watch", is_flag=True, help="Redraw every --interval seconds until Ctrl-C.")
@click.option("--json", "as_json", is_flag=True, help="Print the /status JSON instead.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Seconds between refreshes with --watch.",
)
def status(url: str, watch: bool, as_json: bool, interval: float) -> None:
    """Show what the status server at URL (http://HOST:PORT, from serve_status or
    RUNACTORS_STATUS_PORT) publishes: every client and run, their state, queued, logged and
    spooled entities, errors, retries and worker. Exits with status 1 if nothing answers."""
    address = status_url(url)
    base = address.removesuffix("/status")
    try:
        document = fetch_status(address)
    except StatusUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    console = Console()
    if not console.is_terminal:  # whole values, whatever COLUMNS says: a pipe has no width
        console = Console(width=PIPE_WIDTH)
    try:
        if watch and not as_json and console.is_terminal:
            _watch_live(address, base, interval, console, document)
            return
        if as_json:
            _print_json(document)
        else:
            console.print(status_view(document, base, error_chars=_error_chars(console)))
        if watch:
            _watch_plain(address, base, interval, console, as_json)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a watch ends: exit status 0


def _error_chars(console: Console) -> int | None:
    """How much of a run's latest error to show: a line of it on a terminal, all of it
    elsewhere (a pipe or a log is read by programs: nothing is cut)."""
    return ERROR_CHARS if console.is_terminal else None


def _print_json(document: dict[str, Any]) -> None:
    # One object per line, also with --watch: a stream for jq and line-based tools.
    click.echo(json.dumps(document))


def _watch_plain(address: str, base: str, interval: float, console: Console, as_json: bool) -> None:
    """Without a terminal (a pipe, a log): the whole view again every interval."""
    while True:
        time.sleep(interval)
        try:
            document = fetch_status(address)
        except StatusUnavailable as exc:  # on stderr, one line: stdout stays tables or JSON
            message = " ".join(str(exc).split())
            click.echo(f"{time.strftime('%H:%M:%S')} {message}", err=True)
            continue
        if as_json:
            _print_json(document)
        else:
            console.print(status_view(document, base, error_chars=None))


def _watch_live(
    address: str, base: str, interval: float, console: Console, document: dict[str, Any]
) -> None:
    """On a terminal: one view redrawn in place; a server that stops answering is shown
    under the last table it served, until it answers again."""
    from rich.live import Live

    with Live(status_view(document, base), console=console, auto_refresh=False) as live:
        while True:
            time.sleep(interval)
            try:
                document = fetch_status(address)
                problem = None
            except StatusUnavailable as exc:
                problem = f"{time.strftime('%H:%M:%S')} {exc}"
            live.update(status_view(document, base, problem), refresh=True)
