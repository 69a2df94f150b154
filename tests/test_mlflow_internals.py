"""What runactors does with MLflow's private names: a release that renames one the SQL fast
path needs turns the fast path off with one warning (``import client`` and logging keep
working), and a forked child never uses the connections of MLflow's engines it inherited."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from scripts import REPO

pytestmark = pytest.mark.slow  # each test runs a fork or a program of its own


TIMEOUT = 180

# Loaded by every interpreter started with this folder first on PYTHONPATH (the client's,
# the worker template's): an MLflow that renamed a private function the fast path imports
# (its own stores, imported first, have it under the new name).
SITECUSTOMIZE = """
import mlflow.store.tracking.sqlalchemy_store
import mlflow.utils.validation as validation
validation._validate_batch_log_data_renamed = validation._validate_batch_log_data
del validation._validate_batch_log_data
"""


def test_a_renamed_private_mlflow_name_turns_the_fast_path_off_with_one_warning(
    tmp_path: Path, tracking_uri: str, store: MlflowClient, experiment_id: str, executor: str
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    script = textwrap.dedent(
        f"""
        import client
        from client import QueueingClient

        c = QueueingClient({tracking_uri!r}, executor={executor!r}, max_workers=1)
        run = c.create_run({experiment_id!r}, run_name="renamed")
        for step in range(3):
            c.log_metrics(run, {{"loss": 1.0 / (step + 1)}}, step=step)
        c.flush()
        c.log_metrics(run, {{"loss": 0.1}}, step=3)
        c.flush()
        print(run.resolve())
        c.close()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(site), REPO])},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("SQL fast path off") == 1, done.stderr
    run_id = done.stdout.split()[-1]
    history = store.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]


PATCHED_FIRST = """
import sys
from mlflow.tracking import MlflowClient

calls = []
original = MlflowClient.log_batch
def counted(self, *args, **kwargs):  # a program's own patch, made before runactors' first use
    calls.append(1)
    return original(self, *args, **kwargs)
MlflowClient.log_batch = counted

from client import QueueingClient

uri, experiment_id = sys.argv[1:3]
with QueueingClient(uri, executor="thread") as c:
    run = c.create_run(experiment_id, run_name="patched")  # a whole run: create, batch, end
    c.log_metrics(run, {"loss": 0.5}, step=0)
    c.set_terminated(run)
    c.flush()
    long = c.create_run(experiment_id, run_name="metrics")
    c.flush()
    c.log_metrics(long, {"loss": 0.25}, step=1)  # a metrics-only round of a known run
    c.flush()
    print(len(calls), c.status().runs[1].sql_fast_path)
"""


def test_a_patch_made_before_the_fast_paths_first_use_is_honoured(
    tracking_uri: str, store: MlflowClient, experiment_id: str
) -> None:
    """The fast path stands in for MLflow's own log_batch only: one the program patched
    before runactors' first flush is called for every batch (it was taken for MLflow's, the
    fast path being imported on first use, after the patch; whole runs then failed on it)."""
    done = subprocess.run(
        [sys.executable, "-c", PATCHED_FIRST, tracking_uri, experiment_id],
        env={**os.environ, "PYTHONPATH": REPO},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["2", "off"], done.stdout + done.stderr[-2000:]
    runs = store.search_runs([experiment_id], order_by=["attributes.start_time ASC"])
    assert [r.data.metrics.get("loss") for r in runs] == [0.5, 0.25]
    assert runs[0].info.status == "FINISHED"


# A fault of the whole-run writer itself (a bug, an MLflow it does not know), in every
# interpreter of the test's program, worker processes included.
BROKEN_WHOLE_RUNS = """
import actors.delivery._fast_runs as fast_runs

def whole_run(run_id, calls):
    raise RuntimeError("a bug in the whole-run writer")

fast_runs.whole_run = whole_run
"""


def test_a_fault_of_the_whole_run_writer_sends_the_run_through_mlflows_calls(
    tmp_path: Path, tracking_uri: str, store: MlflowClient, experiment_id: str, executor: str
) -> None:
    """It stored nothing, so the run's calls go through MLflow's API, with one warning (they
    all failed as 'the store was unavailable past retry_timeout', without a retry)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BROKEN_WHOLE_RUNS)
    script = textwrap.dedent(
        f"""
        from client import QueueingClient

        with QueueingClient({tracking_uri!r}, executor={executor!r}, max_workers=1) as c:
            run = c.create_run({experiment_id!r}, run_name="broken")
            c.log_params(run, {{"lr": 0.1}})
            c.log_metrics(run, {{"loss": 0.5}}, step=0)
            c.set_terminated(run)
            c.flush()
            print(run.resolve(), c.status().runs[0].sql_fast_path)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(site), REPO])},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = done.stdout.split()[0]  # its metrics then took the metrics path: "on"
    assert done.stderr.count("SQL fast path for whole runs failed") == 1, done.stderr[-3000:]
    run = store.get_run(run_id)
    assert (run.info.status, run.info.run_name) == ("FINISHED", "broken")
    assert run.data.params == {"lr": "0.1"} and run.data.metrics == {"loss": 0.5}


FORK = """
import json, os, sys
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.tracking import MlflowClient
from client import QueueingClient

uri, experiment_id = sys.argv[1], sys.argv[2]
client = QueueingClient(uri)  # the thread executor: its clients share MLflow's engine
run = client.create_run(experiment_id)
client.log_metrics(run, {"parent": 1.0}, step=0)
client.flush()
engine = SqlAlchemyStore._engine_map[uri]
pooled = engine.pool.checkedin()
connections = [engine.connect() for _ in range(pooled)]  # every pooled one, marked
for conn in connections:
    conn.info["owner"] = os.getpid()
for conn in connections:
    conn.close()

pid = os.fork()
if pid == 0:
    try:
        engine = SqlAlchemyStore._engine_map[uri]
        with engine.connect() as conn:
            inherited = conn.info.get("owner")
        child = QueueingClient(uri)
        child.log_metrics(run.resolve(), {"child": 2.0}, step=0)
        child.flush()
        child.close()
        MlflowClient(uri).log_metric(run.resolve(), "child_direct", 3.0)
        print(json.dumps({"inherited": inherited, "pool": engine.pool.checkedin()}), flush=True)
        code = 0
    except BaseException as exc:
        print(json.dumps({"error": repr(exc)}), flush=True)
        code = 1
    os._exit(code)
_, status = os.waitpid(pid, 0)
client.log_metrics(run, {"parent": 4.0}, step=1)
client.flush()
with engine.connect() as conn:
    still_ours = conn.info.get("owner") == os.getpid()
client.close()
print(json.dumps({"status": status, "pooled": pooled, "still_ours": still_ours,
                  "run": run.resolve()}), flush=True)
"""


def test_a_forked_child_opens_its_own_connections_and_both_write(
    tracking_uri: str, store: MlflowClient, experiment_id: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", FORK, tracking_uri, experiment_id],
        env={**os.environ, "PYTHONPATH": REPO},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    child, parent = (json.loads(line) for line in done.stdout.splitlines()[-2:])
    assert "error" not in child, child
    assert parent["pooled"] >= 1  # the parent had a pooled connection to inherit
    assert child["inherited"] is None, "the child used the parent's pooled connection"
    assert parent["status"] == 0 and parent["still_ours"]  # the parent's pool is intact
    metrics = store.get_run(parent["run"]).data.metrics
    assert metrics == {"parent": 4.0, "child": 2.0, "child_direct": 3.0}
