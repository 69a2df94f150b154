"""``runactors bench``: the click command that runs the chosen scenarios and reports them."""

from __future__ import annotations

import json
import os

import click

from client.bench._report import lines, machine, plot, to_dict
from client.bench._scenarios import SCENARIOS, Options


@click.command("bench")
@click.option(
    "--scenario",
    "scenarios",
    type=click.Choice(list(SCENARIOS)),
    multiple=True,
    help="A scenario to run (repeatable).  [default: all]",
)
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Interleaved rounds per contender, each on a fresh store.",
)
@click.option(
    "--max-workers",
    type=click.IntRange(min=1),
    default=None,
    help="max_workers of the runactors clients.  [default: the client's own]",
)
@click.option(
    "--calls",
    type=click.IntRange(min=100),
    default=20_000,
    show_default=True,
    help="hot: log_metrics calls per timing round.",
)
@click.option(
    "--repeat",
    type=click.IntRange(min=1),
    default=7,
    show_default=True,
    help="hot: timing rounds; the best is kept.",
)
@click.option(
    "--runs", type=click.IntRange(min=1), default=8, show_default=True, help="sqlite-*: runs."
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=1_000,
    show_default=True,
    help="sqlite-*: steps per run (two metrics each).",
)
@click.option(
    "--small-runs",
    type=click.IntRange(min=1),
    default=300,
    show_default=True,
    help="small-runs-*: runs of 10 metrics each.",
)
@click.option(
    "--server-runs",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="server-thread: runs.",
)
@click.option(
    "--server-steps",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="server-thread: steps per run (two metrics each).",
)
@click.option(
    "--scale-runs",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="scale-10k: runs queued before the flush.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write a PNG bar chart of the ratios to this file.",
)
def bench(
    scenarios: tuple[str, ...],
    rounds: int,
    max_workers: int | None,
    calls: int,
    repeat: int,
    runs: int,
    steps: int,
    small_runs: int,
    server_runs: int,
    server_steps: int,
    scale_runs: int,
    as_json: bool,
    plot_path: str | None,
) -> None:
    """Benchmark runactors against MLflow's own clients, side by side in one process."""
    # MLflow prints a "View run" line per terminated run on a tracking server: not a figure.
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    options = Options(
        rounds=rounds,
        max_workers=max_workers,
        calls=calls,
        repeat=repeat,
        runs=runs,
        steps=steps,
        small_runs=small_runs,
        server_runs=server_runs,
        server_steps=server_steps,
        scale_runs=scale_runs,
    )
    results = []
    if not as_json:
        click.echo(f"machine: {machine()}")
    for name in scenarios or tuple(SCENARIOS):
        result = SCENARIOS[name](options)
        results.append(result)
        if not as_json:
            for line in lines(result):
                click.echo(line)
    if as_json:
        click.echo(json.dumps(to_dict(results), indent=2))
    if plot_path is not None:
        plot(results, plot_path)
        if not as_json:
            click.echo(f"plot: {plot_path}")
