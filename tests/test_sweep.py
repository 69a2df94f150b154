"""``runactors sweep`` end to end: real trials in spawned workers, read back from the store."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from client._cli import main
from client._sweep import DEFAULT_EXPERIMENT, SWEEP_TAG, TRIAL_TAG, resolve_tracking_uri

EXPECTED_METRICS = ("train_accuracy", "val_accuracy", "val_loss")


def sweep(*args: str) -> Result:
    """Invoke ``runactors sweep ARGS`` in this process."""
    return CliRunner().invoke(main, ["sweep", *args])


def store_copy(tmp_path: Path, template_db: Path) -> str:
    """A fresh, already migrated SQLite store in ``tmp_path`` (saves the schema creation)."""
    db = tmp_path / "m.db"
    shutil.copy(template_db, db)
    return f"sqlite:///{db}"


def sweep_runs(uri: str) -> tuple[Run, list[Run]]:
    """The sweep's parent run and its child runs, in trial order."""
    store = MlflowClient(uri)
    experiment = store.get_experiment_by_name(DEFAULT_EXPERIMENT)
    assert experiment is not None
    runs = store.search_runs([experiment.experiment_id])
    parents = [run for run in runs if run.data.tags.get(SWEEP_TAG) == "parent"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, sorted(children, key=lambda run: int(run.data.tags[TRIAL_TAG]))


def history_length(uri: str, run: Run, key: str) -> int:
    return len(MlflowClient(uri).get_metric_history(run.info.run_id, key))


def assert_complete_trial(uri: str, run: Run, epochs: int) -> None:
    """A FINISHED trial with its params, both dataset inputs and every epoch's metrics."""
    assert run.info.status == "FINISHED"
    assert {"loss", "alpha", "learning_rate", "eta0", "epochs", "seed"} <= set(run.data.params)
    assert run.data.params["epochs"] == str(epochs)
    names = {item.dataset.name for item in run.inputs.dataset_inputs}
    assert names == {"digits-train", "digits-val"}
    for key in EXPECTED_METRICS:
        history = MlflowClient(uri).get_metric_history(run.info.run_id, key)
        assert sorted(metric.step for metric in history) == list(range(epochs))


@pytest.mark.slow
def test_sweep_logs_every_trial_as_a_child_run(tmp_path: Path, template_db: Path) -> None:
    uri = store_copy(tmp_path, template_db)
    result = sweep("--trials", "3", "--epochs", "2", "--workers", "2", "--tracking-uri", uri)

    assert result.exit_code == 0, result.output
    parent, children = sweep_runs(uri)
    assert len(children) == 3
    for run in children:
        assert_complete_trial(uri, run, epochs=2)
        assert run.info.run_name == f"trial-{run.data.tags[TRIAL_TAG]}"
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_finished"] == 3
    assert parent.data.metrics["metric_points"] == 3 * 2 * len(EXPECTED_METRICS)

    best = max(children, key=lambda run: run.data.metrics["val_accuracy"])
    assert f"best trial: trial {best.data.tags[TRIAL_TAG]} " in result.stdout
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert "metric points logged: 18 " in result.stdout
    assert "failures: 0" in result.stdout
    assert f"mlflow ui --backend-store-uri {uri}" in result.stdout
    assert "epoch 2" in result.stdout  # progress lines


@pytest.mark.slow
def test_a_failing_trial_ends_failed_and_the_others_carry_on(
    tmp_path: Path, template_db: Path
) -> None:
    uri = store_copy(tmp_path, template_db)
    result = sweep(
        *("--trials", "3", "--epochs", "3", "--workers", "2", "--tracking-uri", uri),
        *("--fail-trial", "2"),
    )

    assert result.exit_code == 0, result.output
    parent, children = sweep_runs(uri)
    failed = children[1]
    assert failed.info.status == "FAILED"
    assert history_length(uri, failed, "val_accuracy") == 1  # it failed at its second epoch
    for run in (children[0], children[2]):
        assert_complete_trial(uri, run, epochs=3)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_failed"] == 1
    assert "trial 2/3 FAILED" in result.stdout
    assert "failures: 1" in result.stdout
    assert "RuntimeError: forced failure of trial 2" in result.stdout


@pytest.mark.slow
def test_the_command_creates_mlflow_db_in_the_current_folder(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    completed = subprocess.run(
        [sys.executable, "-m", "client._cli", "sweep", "--trials", "2", "--epochs", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "Traceback" not in completed.stderr
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert (tmp_path / "mlflow.db").is_file()
    _, children = sweep_runs(uri)
    assert len(children) == 2
    for run in children:
        assert_complete_trial(uri, run, epochs=2)
    assert f"mlflow ui --backend-store-uri {uri}" in completed.stdout


@pytest.mark.slow
def test_ctrl_c_ends_every_run_killed_and_exits(tmp_path: Path, template_db: Path) -> None:
    uri = store_copy(tmp_path, template_db)
    command = [sys.executable, "-m", "client._cli", "sweep", "--trials", "4", "--epochs"]
    process = subprocess.Popen(
        [*command, "1000000", "--tracking-uri", uri],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # Ctrl-C reaches the whole process group, workers included
    )
    try:
        assert process.stdout is not None
        while " epoch " not in process.stdout.readline():  # a trial is training
            assert process.poll() is None
        os.killpg(process.pid, signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)

    assert process.returncode != 0
    assert "Aborted!" in stderr
    assert "Traceback" not in stderr
    assert "interrupted: stopping the running trials" in stdout
    parent, children = sweep_runs(uri)
    assert children
    assert {run.info.status for run in [parent, *children]} == {"KILLED"}


def test_the_console_script_runs_the_same_command() -> None:
    script = shutil.which("runactors")
    if script is None:
        pytest.skip("the runactors console script is not installed")
    completed = subprocess.run(
        [script, "sweep", "--help"], capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 0, completed.stderr
    assert "--trials" in completed.stdout
    assert "--fail-trial" not in completed.stdout  # hidden


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trials", "0"], "Invalid value for '--trials'"),
        (["--epochs", "-1"], "Invalid value for '--epochs'"),
        (["--workers", "0"], "Invalid value for '--workers'"),
        (["--tracking-uri", "nonsense://x"], "no store for the scheme 'nonsense'"),
        (["--tracking-uri", "http://127.0.0.1:1"], "Cannot use the tracking store"),
        (["--tracking-uri", "sqlite:////proc/nope/m.db"], "cannot create its folder /proc/nope"),
        (["--tracking-uri", "sqlite://"], "in-memory SQLite store"),
    ],
)
def test_user_mistakes_end_in_one_line(args: list[str], message: str) -> None:
    saved = dict(os.environ)
    result = sweep(*args)

    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception  # not a crash
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert dict(os.environ) == saved  # the fail-fast HTTP settings were put back


def test_relative_sqlite_paths_are_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_tracking_uri("sqlite:///a/m.db") == f"sqlite:///{tmp_path / 'a' / 'm.db'}"
    assert resolve_tracking_uri("sqlite:////x/m.db?timeout=5") == "sqlite:////x/m.db?timeout=5"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
