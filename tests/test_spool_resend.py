"""Spooled runs are re-sent in parallel (up to ``max_workers``), and a run whose work is on
disk reads ``spooled`` while it waits to be re-sent, not ``waiting`` (an executor worker).

The outage is a proxy answering HTTP 503 in front of a real ``mlflow server``; the same
proxy holds requests to count how many re-sends are in flight at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from holding_proxy import HoldingProxy
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from client import QueueingClient

RUNS = 3
WORKERS = 2  # fewer than the runs: one waits for a re-sending thread
STEPS = 20
HOLD = 60.0  # at most this long held: far more than the re-sends take to arrive together


@pytest.fixture
def proxy(mlflow_server: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[HoldingProxy]:
    # A held request must not time out meanwhile (then be sent again and held twice).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "90")
    made = HoldingProxy(mlflow_server.uri)
    try:
        yield made
    finally:
        made.close()


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


def test_spooled_runs_are_resent_in_parallel_and_read_spooled_while_they_wait(
    proxy: HoldingProxy, mlflow_server: Any, executor: str, tmp_path: Path
) -> None:
    experiment_id = MlflowClient(mlflow_server.uri).create_experiment(
        f"resend-{executor}-{time.monotonic_ns()}"
    )
    client = QueueingClient(
        proxy.uri,
        executor=executor,
        max_workers=WORKERS,
        retry_timeout=1,
        spool_dir=tmp_path / "spool",
    )
    try:
        proxy.down = True
        runs = []
        for index in range(RUNS):
            run = client.create_run(experiment_id, run_name=f"trial-{index}")
            client.log_params(run, {"index": str(index)})
            for step in range(STEPS):
                client.log_metrics(run, {"loss": 1.0 / (step + 1)}, step=step)
            client.set_terminated(run, "FINISHED")
            runs.append(run)
        with pytest.raises(MlflowException, match="spooled to"):
            client.flush()
        assert [run.state for run in client.status().runs] == ["spooled"] * RUNS

        # Still down: a flush re-sends WORKERS runs at once; the other one's work is on disk.
        proxy.hold(RUNS, HOLD)
        operations = client.flush(synchronous=False)
        wait_until(lambda: proxy.held >= 1, "a re-send held")
        states = [run.state for run in client.status().runs]
        assert set(states) <= {"flushing", "spooled"}, states  # never "waiting"
        wait_until(lambda: proxy.held == WORKERS, f"{WORKERS} re-sends held at once")
        status = client.status()
        assert sorted(run.state for run in status.runs) == ["flushing"] * WORKERS + ["spooled"]
        proxy.release()
        with pytest.raises(MlflowException, match="spool"):
            operations.await_completion(timeout=120)
        assert [run.state for run in client.status().runs] == ["spooled"] * RUNS

        # Back: WORKERS re-sends are in flight at once, and all of it lands.
        proxy.down = False
        proxy.hold(WORKERS, HOLD)
        client.flush()
        assert proxy.max_held == WORKERS, proxy.max_held
        status = client.status()
        assert {run.state for run in status.runs} <= {"idle", "stopped"}, status
        assert all(sum(run.spooled.values()) == 0 for run in status.runs), status
        run_ids = [run.resolve(timeout=5) for run in runs]
    finally:
        client.close()
    store = MlflowClient(mlflow_server.uri)
    found = store.search_runs([experiment_id], run_view_type=ViewType.ALL)
    assert sorted(run.info.run_id for run in found) == sorted(run_ids)
    for run in found:
        assert run.info.status == "FINISHED"
        assert run.data.params == {"index": run.info.run_name.split("-")[1]}
        history = store.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(STEPS))
