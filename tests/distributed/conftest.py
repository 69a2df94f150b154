"""Fixtures of the distributed tests: a real ``mlflow server`` on loopback and a local Ray.

Both are session-scoped: the server takes a few seconds to start and Ray several more, so
every test in this folder shares them, each test working in its own experiment.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Ray reads these when it starts its processes: no usage reporting, nothing online.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_PROMPT_ENABLED", "0")

SERVER_START_TIMEOUT = 90.0

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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"


def _stop_group(process: subprocess.Popen[Any]) -> None:
    """Stop the server and every process it started (uvicorn workers): its whole group."""
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; make sure no worker of its group outlives it.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` (SQLite backend, one uvicorn worker); yields its URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    log_path = root / "server.log"
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        # The server's job runner starts several huey consumer processes: not needed here.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--default-artifact-root",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=root,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while not _healthy(uri):
            if process.poll() is not None:
                pytest.fail(
                    f"mlflow server exited with code {process.returncode} before answering "
                    f"{uri}/health:\n{_log_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"mlflow server did not answer {uri}/health within "
                    f"{SERVER_START_TIMEOUT:.0f} s:\n{_log_tail(log_path)}"
                )
            time.sleep(0.25)
        yield uri
    finally:
        _stop_group(process)


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
