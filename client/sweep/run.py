"""The sweep, in the parent process: its parent run, its trials, its outcome."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

import click
from mlflow.exceptions import MlflowException

from client._client import QueueingClient
from client.sweep.messages import TrialSpec
from client.sweep.options import SCORE, SWEEP_TAG, SweepOptions, one_line
from client.sweep.pool import run_trials
from client.sweep.signals import CtrlC, sigint_held
from client.sweep.store import prepare_experiment, resolve_tracking_uri
from client.sweep.summary import SweepSummary

if TYPE_CHECKING:
    from client import PendingRunId
    from client.sweep.view import View


def run_sweep(options: SweepOptions, view: View) -> SweepSummary:
    """Run the sweep described by ``options``, showing its progress in ``view``.

    Raises ``click.ClickException`` for a store that cannot be used or a client that cannot
    be made; a failing trial does not raise. A Ctrl-C raises ``KeyboardInterrupt`` once the
    sweep has stopped: its trials ended (KILLED unless they had finished) and its parent run
    terminated (KILLED, unless every trial had already ended).
    """
    uri = resolve_tracking_uri(options.tracking_uri)
    try:
        # One executor worker per client: each trial process logs one run at a time.
        client = QueueingClient(uri, executor=options.executor, max_workers=1)
    except MlflowException as exc:
        raise click.ClickException(one_line(exc)) from None
    experiment_id = prepare_experiment(uri, options.experiment)
    started = time.monotonic()
    ctrl_c = CtrlC()
    with ctrl_c.installed():
        with sigint_held():  # the client's threads and worker processes inherit the block
            parent, parent_id = _start_parent(client, options, experiment_id)
        workers = min(options.workers, options.trials)
        try:
            if ctrl_c.pressed:
                raise KeyboardInterrupt
            view.note(
                f"sweep: {options.trials} trials x {options.epochs} epochs on {workers} "
                f"spawned worker(s), {options.executor} executor; parent run {parent_id} in "
                f"experiment {options.experiment!r} (ID {experiment_id}) at {uri}"
            )
            specs = trial_specs(options, experiment_id, parent_id)
            trials = run_trials(client, specs, workers, view, ctrl_c)
        except BaseException:
            _end_parent(client, parent, None, "KILLED")
            raise
        board = trials.board
        summary = SweepSummary(
            uri,
            experiment_id,
            parent_id,
            trials.sorted_results(),
            time.monotonic() - started,
            delivery_seconds=board.delivery_seconds,
            startup_seconds=board.startup_seconds,
            startup_points=board.startup_points,
            call_seconds=board.call_seconds,
            workers=board.workers_reporting,
        )
        if ctrl_c.pressed and len(summary.finished) < len(summary.results):
            _end_parent(client, parent, summary, "KILLED")
        else:  # a Ctrl-C after the last trial ended still exits as interrupted, below
            _end_parent(client, parent, summary, "FINISHED" if summary.finished else "FAILED")
    if ctrl_c.pressed:
        raise KeyboardInterrupt
    return summary


def trial_specs(options: SweepOptions, experiment_id: str, parent_id: str) -> list[TrialSpec]:
    """The sweep's trials, numbered from 1, each seeded differently."""
    from client.sweep.data import sample_trials

    return [
        TrialSpec(
            number=number,
            params=params,
            epochs=options.epochs,
            seed=options.seed + number,
            experiment_id=experiment_id,
            parent_run_id=parent_id,
            fail=number == options.fail_trial,
            log_every_batch=options.log_every_batch,
        )
        for number, params in enumerate(sample_trials(options.trials, options.seed), start=1)
    ]


def _start_parent(
    client: QueueingClient, options: SweepOptions, experiment_id: str
) -> tuple[PendingRunId, str]:
    """Create the sweep's parent run and wait for its ID, which every trial's run names."""
    parent = client.create_run(
        experiment_id, tags={SWEEP_TAG: "parent"}, run_name=f"sweep-{time.strftime('%H%M%S')}"
    )
    client.log_params(
        parent,
        {
            "trials": options.trials,
            "epochs": options.epochs,
            "workers": options.workers,
            "executor": options.executor,
            "seed": options.seed,
            "log_every_batch": options.log_every_batch,
            "model": "SGDClassifier",
            "dataset": "digits",
        },
    )
    try:
        client.flush()
        return parent, parent.resolve()
    except MlflowException as exc:
        with contextlib.suppress(MlflowException):
            client.close()
        raise click.ClickException(f"Cannot create the sweep's run: {one_line(exc)}") from None


def _end_parent(
    client: QueueingClient, parent: PendingRunId, summary: SweepSummary | None, status: str
) -> None:
    """Log the sweep's outcome on its parent run, terminate it and close the client."""
    try:
        if summary is not None:
            best = summary.best
            client.log_metrics(
                parent,
                {
                    "trials_finished": len(summary.finished),
                    "trials_failed": len(summary.failures),
                    "metric_points": summary.points,
                    "sweep_seconds": summary.seconds,
                    "delivery_seconds": summary.delivery_seconds,
                    **({f"best_{SCORE}": best.metrics[SCORE]} if best else {}),
                },
            )
            if best is not None and best.run_id is not None:
                client.set_tags(parent, {"best_run_id": best.run_id})
        client.set_terminated(parent, status)
    finally:
        try:
            client.close()
        except MlflowException as exc:
            raise click.ClickException(
                f"Logging the sweep's parent run failed: {one_line(exc)}"
            ) from None
