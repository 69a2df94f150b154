"""Tracking URIs are checked and made absolute when a client is made, never at the first flush."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import shutil
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from client import QueueingClient

BAD_URIS = [
    ("foo://bar", "no store for the scheme 'foo'"),
    ("localhost:5000", "no store for the scheme 'localhost'"),
    ("http://", "needs a host"),
    ("https:///x", "needs a host"),
    ("http://127.0.0.1:port", "Port"),
    ("sqlite://", "in-memory"),
    ("sqlite:///:memory:", "in-memory"),
    ("sqlitex:///mlflow.db", "database engine"),
    ("postgresql://user@host:port/db", "invalid literal"),
    ("", "empty"),
    ("  ", "empty"),
    ("sqlite:///mlflow.db\n", "whitespace"),
    ("file:", "needs a folder"),
]


@pytest.mark.parametrize(("uri", "reason"), BAD_URIS)
def test_a_bad_tracking_uri_raises_at_the_constructor_naming_it(uri, reason):
    started = time.monotonic()
    with pytest.raises(MlflowException) as exc:
        QueueingClient(uri)
    assert time.monotonic() - started < 10  # checked, never connected to
    assert exc.value.error_code == "INVALID_PARAMETER_VALUE"
    assert repr(uri) in exc.value.message and reason in exc.value.message
    assert "model registry" not in exc.value.message.lower()


def test_a_bad_tracking_uri_from_mlflow_raises_too_and_says_where_it_came_from(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "foo://bar")
    mlflow.set_tracking_uri(None)
    with pytest.raises(MlflowException, match=r"'foo://bar'.*MLFLOW_TRACKING_URI"):
        QueueingClient()


def _good_uris(folder: Path) -> list[tuple[str, str]]:
    """(URI given, URI the client uses) with ``folder`` as the current folder."""
    return [
        (f"sqlite:///{folder}/abs.db", f"sqlite:///{folder}/abs.db"),
        ("sqlite:///rel.db", f"sqlite:///{folder}/rel.db"),
        ("sqlite:///sub/rel.db?timeout=5", f"sqlite:///{folder}/sub/rel.db?timeout=5"),
        (f"{folder}/mlruns", f"{folder}/mlruns"),
        ("mlruns", f"{folder}/mlruns"),
        (f"file://{folder}/mlruns", f"file://{folder}/mlruns"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),  # nothing listens: not contacted
        ("https://mlflow.example.com/prefix", "https://mlflow.example.com/prefix"),
        ("databricks", "databricks"),
        ("databricks://profile", "databricks://profile"),
        ("postgresql://user@localhost/mlflow", "postgresql://user@localhost/mlflow"),
    ]


def test_good_tracking_uris_are_accepted_without_touching_the_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for given, used in _good_uris(tmp_path):
        client = QueueingClient(given)
        assert client.tracking_uri == used, given
        client.close()
    assert list(tmp_path.iterdir()) == []  # no database or folder created


def test_none_follows_mlflow_and_a_relative_env_uri_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel.db")
    mlflow.set_tracking_uri(None)
    assert QueueingClient().tracking_uri == f"sqlite:///{tmp_path}/rel.db"


def _log_from_another_folder(folder: str, payload: bytes, run_id: str) -> None:
    os.chdir(folder)
    client = pickle.loads(payload)
    client.log_metrics(run_id, {"from_child": 1.0})
    client.close()


@pytest.mark.slow
@pytest.mark.parametrize("source", ["argument", "MLFLOW_TRACKING_URI"])
def test_a_relative_sqlite_uri_reaches_the_same_file_from_a_process_in_another_folder(
    tmp_path, template_db, monkeypatch, source
):
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    shutil.copy(template_db, here / "rel.db")
    monkeypatch.chdir(here)
    mlflow.set_tracking_uri(None)
    if source == "argument":
        client = QueueingClient("sqlite:///rel.db")
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel.db")
        client = QueueingClient()
    store = MlflowClient(f"sqlite:///{here}/rel.db")
    run_id = store.create_run(store.create_experiment("rel")).info.run_id

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the child has only the copy
    child = multiprocessing.get_context("spawn").Process(
        target=_log_from_another_folder, args=(str(elsewhere), pickle.dumps(client), run_id)
    )
    child.start()
    child.join(120)
    assert child.exitcode == 0
    client.close()
    assert store.get_run(run_id).data.metrics == {"from_child": 1.0}
    assert list(elsewhere.iterdir()) == []  # no second database made there
