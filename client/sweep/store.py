"""The up-front checks of the tracking store: done before any trial, failing in one line."""

from __future__ import annotations

import contextlib
import os
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from actors import create_sqlite_store
from client import _tracking_uri as tracking_uris
from client.sweep.options import DEFAULT_DB, one_line

# How long the up-front check waits for a tracking server before calling it unreachable.
CHECK_TIMEOUT_SECONDS = "5"


def resolve_tracking_uri(uri: str | None) -> str:
    """The store every process logs to: ``sqlite:///mlflow.db`` in the current folder by
    default, else ``uri`` checked as a client checks it, with any relative SQLite path made
    absolute, so that worker processes (and the ``mlflow ui`` command in the summary) find
    the same file whatever their folder. Raises ``click.UsageError``."""
    if uri is None or not uri.strip():
        return f"sqlite:///{Path(os.getcwd(), DEFAULT_DB)}"
    try:
        return tracking_uris.resolve_tracking_uri(uri.strip())
    except MlflowException as exc:
        raise click.UsageError(exc.message) from None


def _prepare_sqlite_folder(uri: str) -> None:
    """Create the SQLite file's folder (as MLflow would), failing with a clear message."""
    path = tracking_uris.sqlite_path(uri)
    if path is None:
        return
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.ClickException(
            f"Cannot use the SQLite store {path}: cannot create its folder {folder} "
            f"({exc.strerror or exc})."
        ) from None
    if not os.access(folder, os.W_OK):
        raise click.ClickException(
            f"Cannot use the SQLite store {path}: its folder {folder} is not writable."
        )


@contextlib.contextmanager
def _fail_fast_http() -> Iterator[None]:
    """Within the block, MLflow's HTTP calls are made once, with a short timeout."""
    settings = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": CHECK_TIMEOUT_SECONDS,
    }
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def prepare_experiment(uri: str, name: str) -> str:
    """Check that the store answers, then get or create the experiment; return its ID.

    Done up front, failing fast, so that a wrong URI ends in one line instead of a sweep
    whose every run fails. Raises ``click.ClickException``.
    """
    from mlflow.tracking import MlflowClient

    _prepare_sqlite_folder(uri)
    try:
        # A new SQLite store whole or not at all: a Ctrl-C now must not leave a broken one.
        create_sqlite_store(uri)
        with _fail_fast_http():
            store = MlflowClient(tracking_uri=uri)
            store.search_experiments(max_results=1)
            return _get_or_create_experiment(store, name)
    except click.ClickException:
        raise
    except Exception as exc:
        raise click.ClickException(
            f"Cannot use the tracking store {uri}: {one_line(exc)}"
        ) from None


def _get_or_create_experiment(store: Any, name: str) -> str:
    experiment = store.get_experiment_by_name(name)
    if experiment is None:
        try:
            return str(store.create_experiment(name))
        except MlflowException as exc:
            if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            experiment = store.get_experiment_by_name(name)  # created meanwhile
    if experiment.lifecycle_stage != "active":
        raise click.ClickException(
            f"The experiment {name!r} is deleted: restore it or choose another --experiment."
        )
    return str(experiment.experiment_id)


def ui_command(uri: str) -> str:
    """How to look at the sweep: the server itself, or ``mlflow ui`` on the store."""
    if uri.lower().startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)}"
