"""Shared fixtures: a real SQLite tracking store per test, and thread accounting."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


@pytest.fixture(scope="session")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, fully migrated MLflow database, made once and copied for each test."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_uri(
    tmp_path: Path, template_db: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """A fresh SQLite store in a temp folder, also made MLflow's default for the test."""
    db = tmp_path / "mlflow.db"
    shutil.copy(template_db, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    if mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture
def experiment_id(tracking_uri: str) -> str:
    return MlflowClient(tracking_uri).create_experiment("runactors-test")


@pytest.fixture
def store(tracking_uri: str) -> MlflowClient:
    """MLflow's own client on the test's store, to read back what was logged."""
    return MlflowClient(tracking_uri)


def run_data(store: MlflowClient, run_id: str) -> tuple[dict, dict, dict]:
    """Params, latest metrics and user tags (without ``mlflow.*``) of a run."""
    data = store.get_run(run_id).data
    tags = {k: v for k, v in data.tags.items() if not k.startswith("mlflow.")}
    return data.params, data.metrics, tags


def wait_for_threads(baseline: int, timeout: float = 30.0) -> int:
    """Wait until at most ``baseline`` threads remain (threads take a moment to exit)."""
    deadline = time.monotonic() + timeout
    while threading.active_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    return threading.active_count()


def run_actor_threads() -> list[str]:
    """Names of the live threads of run actors (Pykka names them after the class)."""
    return [t.name for t in threading.enumerate() if t.name.startswith("RunActor")]


def wait_for_no_run_actors(timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while run_actor_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    return run_actor_threads()


@pytest.fixture(params=["thread", "process"])
def executor(request: pytest.FixtureRequest) -> str:
    """Behavioural tests run on both executors: they must store exactly the same."""
    return str(request.param)
