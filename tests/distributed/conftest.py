"""Fixtures of the distributed tests: a real ``mlflow server`` on loopback (PostgreSQL behind it)
and a local Ray.

Both are session-scoped: the server takes a few seconds to start and Ray several more, so
every test in this folder shares them, each test working in its own experiment.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# ``tests/`` is on sys.path: pytest imported ``tests/conftest.py`` (a parent folder's conftest)
# first, from its own folder.
from servers import MlflowServer

# Ray reads these when it starts its processes: no usage reporting, nothing online.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_PROMPT_ENABLED", "0")

# What the processes that log through the client (Ray workers) run with: one HTTP attempt
# per call and a bounded wait, so that a broken server fails a test in seconds instead of
# MLflow's own minutes of retries. The client still retries transient failures itself
# (``retry_timeout``), so these never make a healthy run fail.
FAIL_FAST_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
}


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` (one uvicorn worker) backed by a throwaway PostgreSQL 15
    database, the shape of a real deployment; SQLite where the PostgreSQL binaries are
    missing. Yields its URI: every Ray worker and trial logs to it.

    The server of ``tests/conftest.py`` (``servers.MlflowServer``), here for the whole session.
    """
    import postgres

    database = None if postgres.missing_binaries() else postgres.PostgresServer()
    try:
        if database is not None:
            database.start()
        server = MlflowServer(
            tmp_path_factory.mktemp("mlflow-server"),
            backend_store_uri=None if database is None else database.uri,
        )
        try:
            server.start()
            yield server.uri
        finally:
            server.stop(signal.SIGTERM)
    finally:
        if database is not None:
            database.stop()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """A local Ray with 2 CPUs (this machine's cores), no dashboard, quiet; yields ``ray``."""
    ray = pytest.importorskip("ray")
    here = Path(__file__).resolve().parent
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        ignore_reinit_error=True,
        log_to_driver=False,
        object_store_memory=200 * 1024 * 1024,
        runtime_env={
            "env_vars": {
                **FAIL_FAST_ENV,
                # The workers import the test module to run its functions, as the driver
                # did; ``client`` and ``actors`` come from the installed distribution.
                "PYTHONPATH": os.pathsep.join(
                    p for p in (str(here), os.environ.get("PYTHONPATH", "")) if p
                ),
            }
        },
    )
    try:
        yield ray
    finally:
        ray.shutdown()
