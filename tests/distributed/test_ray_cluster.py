"""A sweep on a real two-node Ray cluster that loses a node mid-sweep.

Node ``a`` (``ray start --head``) and node ``b`` (``ray start --address ...``) run on this
machine, on loopback, one CPU each (``ray_nodes.TwoNodeRay``). A driver process
(``cluster_sweep.py``) runs a sweep of 2 trials as Ray tasks, one softly pinned to each node,
each logging through a pickled ``QueueingClient`` into the session's ``mlflow server``
(PostgreSQL behind it). Once node ``b``'s attempt has flushed part of its points and queued
more, the test SIGKILLs node ``b``'s raylet: the attempt's worker dies with it, and Ray retries
the trial on the head. The store must then hold exactly one FINISHED run with all its points per
trial, and the dead attempt's run ended KILLED by its client's keeper, with every point it logged.

Two trials, not more: every Ray worker that runs one imports MLflow (seconds of CPU), and one
per node shows all of it. ``TRIALS`` may be raised (odd trials go to node ``b``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from ray_nodes import NODE_IP, TwoNodeRay, running

pytest.importorskip("ray")
if not sys.platform.startswith("linux"):
    pytest.skip("the cluster finds its processes in /proc", allow_module_level=True)

pytestmark = pytest.mark.slow

TRIALS, STEPS = 2, 6
# What an attempt on node b logs before its node dies: FLUSHED points delivered, QUEUED more
# only queued in its process's memory.
FLUSHED, QUEUED = 3, 2
DRIVER = Path(__file__).with_name("cluster_sweep.py")
# The Ray processes' MLflow HTTP settings, as conftest.py's FAIL_FAST_ENV (a test module never
# imports a conftest): one attempt per call and a bounded wait; the client retries itself.
FAIL_FAST_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
}


def loss_at(trial: int, step: int) -> float:
    return 1.0 / (trial + 1) / (step + 1)


def history(store: MlflowClient, run_id: str) -> dict[int, float]:
    points = store.get_metric_history(run_id, "loss")
    by_step = {m.step: m.value for m in points}
    assert len(by_step) == len(points), [(m.step, m.value) for m in points]  # none twice
    return by_step


@pytest.fixture
def two_nodes() -> Any:
    """A two-node Ray cluster, stopped at teardown whatever the test did: no Ray process of
    it may be left (found by its marker, not by name: other tests may run Ray)."""
    cluster = TwoNodeRay(extra_env=FAIL_FAST_ENV, num_cpus=1)
    try:
        cluster.start()
        yield cluster
    finally:
        left = cluster.stop()
        assert left == [], f"Ray processes left after SIGKILL: {left}"


def wait_for_markers(
    marker_dir: Path, trials: list[int], driver: subprocess.Popen[bytes], log: Path
) -> dict[int, dict[str, Any]]:
    """The markers of node b's attempts, once all are written (they then wait to die)."""
    deadline = time.monotonic() + 120
    while True:
        paths = {trial: marker_dir / f"trial-{trial}.json" for trial in trials}
        if all(path.exists() for path in paths.values()):
            return {trial: json.loads(path.read_text()) for trial, path in paths.items()}
        assert driver.poll() is None, f"driver ended early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no markers in 120 s:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def test_node_death_mid_sweep_leaves_one_finished_run_per_trial(
    mlflow_server: str, two_nodes: TwoNodeRay, tmp_path: Path
) -> None:
    store = MlflowClient(mlflow_server)
    experiment_id = store.create_experiment(f"ray-cluster-{uuid.uuid4().hex[:8]}")
    marker_dir = tmp_path / "markers"
    marker_dir.mkdir()
    log = tmp_path / "driver.log"
    on_b = [trial for trial in range(TRIALS) if trial % 2]
    command = [sys.executable, str(DRIVER), two_nodes.gcs_address, NODE_IP, mlflow_server]
    command += [experiment_id, str(tmp_path / "spool"), str(marker_dir)]
    command += [str(n) for n in (TRIALS, STEPS, FLUSHED, QUEUED)]
    with open(log, "wb") as out:
        driver = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=two_nodes.env, cwd=tmp_path
        )
    started = time.monotonic()
    try:
        markers = wait_for_markers(marker_dir, on_b, driver, log)
        marked = time.monotonic()
        processes, rss, pss = two_nodes.memory_mb()

        # Node b dies: its raylet is SIGKILLed; its workers (the attempts) go with it.
        os.kill(two_nodes.raylet_pid("b"), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while any(running(m["pid"]) for m in markers.values()):
            assert time.monotonic() < deadline, "node b's workers outlived its raylet by 30 s"
            time.sleep(0.05)
        gone = time.monotonic()
        code = driver.wait(timeout=150)
        print(
            f"Ray cluster before the kill: {processes} processes, RSS {rss:.0f} MiB, "
            f"PSS {pss:.0f} MiB; node b's attempts waiting {marked - started:.1f} s after "
            f"the driver started, their workers gone {gone - marked:.1f} s after the kill, "
            f"the sweep done {time.monotonic() - gone:.1f} s later"
        )
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    output = log.read_text()
    assert code == 0, output[-3000:]
    results = {r["trial"]: r for r in json.loads(output.strip().splitlines()[-1])}

    # Every trial completed; the last attempts all ran on the head, node b being gone.
    assert sorted(results) == list(range(TRIALS))
    assert {r["node"] for r in results.values()} == {"a"}

    runs = store.search_runs([experiment_id], max_results=100)
    by_trial: dict[int, list[Any]] = {}
    for run in runs:
        by_trial.setdefault(int(run.data.tags["sweep.trial"]), []).append(run)
    assert sorted(by_trial) == list(range(TRIALS))
    finished = RunStatus.to_string(RunStatus.FINISHED)
    for trial, trial_runs in by_trial.items():
        # Exactly one FINISHED run per trial, the last attempt's, with all its points.
        done = [run for run in trial_runs if run.info.status == finished]
        assert len(done) == 1, [(run.info.run_id, run.info.status) for run in trial_runs]
        run = done[0]
        assert run.info.run_id == results[trial]["run_id"]
        assert run.info.end_time is not None
        assert run.data.tags["ray.node"] == "a"
        assert run.data.params == {"trial": str(trial), "lr": str(0.1 * (trial + 1))}
        assert history(store, run.info.run_id) == pytest.approx(
            {step: loss_at(trial, step) for step in range(STEPS)}
        )

        # What an attempt that died with its node left: its run, and nothing else.
        dead = [r for r in trial_runs if r is not run]
        if trial not in on_b:
            assert dead == []
            continue
        assert [r.info.run_id for r in dead] == [markers[trial]["run_id"]]
        died = dead[0]
        assert died.data.tags["ray.node"] == "b"
        assert died.data.tags["ray.pid"] == str(markers[trial]["pid"])
        assert died.data.params == run.data.params
        # The worker quick-exits when its raylet dies (no exit handler runs), but its
        # client's keeper process outlives it: it delivers the journal (the QUEUED points,
        # on disk since each call returned) and ends the run KILLED with an end time.
        died = _ended(store, died.info.run_id, timeout=20)
        assert died.info.status == RunStatus.to_string(RunStatus.KILLED)
        assert died.info.end_time is not None
        expected_steps = range(FLUSHED + QUEUED)
        assert history(store, died.info.run_id) == pytest.approx(
            {step: loss_at(trial, step) for step in expected_steps}
        )
    assert len(runs) == TRIALS + len(on_b)


def _ended(store: Any, run_id: str, timeout: float) -> Any:
    """The run once it is no longer RUNNING (the keeper ends it), or as it is at ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        run = store.get_run(run_id)
        if run.info.status != "RUNNING" or time.monotonic() > deadline:
            return run
        time.sleep(0.2)
