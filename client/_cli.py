"""The ``runactors`` command line."""

from __future__ import annotations

import click


@click.group()
@click.version_option(package_name="runactors")
def main() -> None:
    """runactors: fast, safe MLflow tracking through per-run actors."""


@main.command()
@click.option(
    "--trials",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Trials (one MLflow run each) drawn from the hyperparameter grid.",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Training epochs per trial; metrics are logged at every epoch.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Worker processes (spawned) that run the trials.",
)
@click.option(
    "--executor",
    type=click.Choice(["thread", "process"]),
    default="thread",
    show_default=True,
    help="The QueueingClient executor that performs the tracking calls.",
)
@click.option(
    "--tracking-uri",
    envvar="MLFLOW_TRACKING_URI",
    show_envvar=True,
    default=None,
    help="Tracking store or server.  [default: sqlite:///mlflow.db in the current folder]",
)
@click.option(
    "--experiment",
    default="runactors-sweep",
    show_default=True,
    help="Experiment of the sweep's runs; created if missing.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the hyperparameter sample and the trials' training.",
)
@click.option(
    "--fail-trial",
    type=click.IntRange(min=1),
    default=None,
    hidden=True,
    envvar="RUNACTORS_SWEEP_FAIL_TRIAL",
    help="Make this trial (1-based) raise during training, to see a FAILED run.",
)
def sweep(
    trials: int,
    epochs: int,
    workers: int,
    executor: str,
    tracking_uri: str | None,
    experiment: str,
    seed: int,
    fail_trial: int | None,
) -> None:
    """Run a hyperparameter sweep: one MLflow run per trial, under one parent run.

    Each trial trains a scikit-learn SGDClassifier epoch by epoch on the bundled digits
    dataset in a spawned worker process, and logs its params, dataset inputs, per-epoch
    metrics and final status through its copy of a QueueingClient. Exits with status 1
    if no trial finished. Ctrl-C stops the running trials at their next epoch (again: at
    once), ends their runs and the parent run as KILLED and exits with status 130.
    """
    # Imported here so that `runactors --help` does not pay for MLflow and scikit-learn.
    from client import _sweep

    if not experiment.strip():
        raise click.BadParameter("must not be empty", param_hint="--experiment")
    if fail_trial is not None and fail_trial > trials:
        raise click.BadParameter(
            f"{fail_trial} is beyond --trials {trials}", param_hint="'--fail-trial'"
        )
    options = _sweep.SweepOptions(
        trials=trials,
        epochs=epochs,
        workers=workers,
        executor="process" if executor == "process" else "thread",
        tracking_uri=tracking_uri,
        experiment=experiment,
        seed=seed,
        fail_trial=fail_trial,
    )
    try:
        summary = _sweep.run_sweep(options, click.echo)
        for line in _sweep.summary_lines(summary):
            click.echo(line)
    except KeyboardInterrupt:
        # As click reports it, but with the conventional status of a SIGINT (128 + 2).
        click.echo("Aborted!", err=True)
        raise click.exceptions.Exit(130) from None
    if not summary.finished:
        raise click.ClickException("no trial finished; see the failures above.")


from client.bench import bench  # noqa: E402  (the group above must exist first)

main.add_command(bench)
from client._replay import replay  # noqa: E402

main.add_command(replay)


if __name__ == "__main__":
    main()
