"""The write-ahead journal (``spool_dir`` + ``journal_interval``): a process that dies at a
random moment under a logging load loses nothing logged more than ``journal_interval``
before its death, and ``runactors replay`` of what it left stores nothing twice.

The child logs to a real SQLite store with background flushes (so that deliveries, their
acknowledgements and the journal's deletes race the death), reporting each point on stdout
with its time once ``log_metrics`` returned; it is SIGKILLed by this test, or calls
``os._exit`` itself. The store is then read back with MLflow's client and its own tables.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from scripts import REPO, script_env

from actors.spool._files import spool_files
from client import QueueingClient

COMMIT_SLACK = 1.0  # seconds a commit may take on a loaded machine (see the test below)
ENV = script_env(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
# The dying children here start no keeper: these tests deliver the journal with `runactors
# replay`, which a keeper delivering it at the same moment would find locked. The keeper's
# own delivery of a dead process's journal is tests/test_keeper.py's.
CHILD_ENV = {**ENV, "RUNACTORS_KEEPER": "0"}

CHILD = """
    import os, sys, time
    from client import QueueingClient

    uri, experiment_id, spool_dir, interval, executor, exit_at = sys.argv[1:7]
    client = QueueingClient(
        uri, executor=executor, spool_dir=spool_dir, journal_interval=float(interval),
        flush_interval=0.05,
    )
    run = client.create_run(experiment_id, run_name="victim", tags={"t": "v"})
    client.log_params(run, {"lr": "0.1"})
    print("ready", flush=True)
    step = 0
    while True:
        client.log_metrics(run, {"loss": 1.0 / (step + 1), "acc": step / 1e6}, step=step)
        print(step, time.time(), flush=True)
        if step == int(exit_at):
            print("exit", time.time(), flush=True)
            os._exit(3)
        step += 1
        if step % 50 == 0:
            time.sleep(0.005)  # a training loop between batches
"""


def _die(
    tmp_path: Path, uri: str, experiment_id: str, executor: str, interval: float, how: str
) -> tuple[dict[int, float], float]:
    """Run the child until it dies; the points it reported (step: time) and its death."""
    spool_dir = tmp_path / "spool"
    exit_at = random.randint(1000, 6000) if how == "exit" else 10**9
    with open(tmp_path / "stderr", "w+") as stderr:
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(CHILD),
                uri,
                experiment_id,
                str(spool_dir),
                str(interval),
                executor,
                str(exit_at),
            ],
            env=CHILD_ENV,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        assert child.stdout is not None
        logged: dict[int, float] = {}
        death = None
        try:
            assert child.stdout.readline() == "ready\n"
            lifetime = random.uniform(0.3, 1.2)  # the run's creation and deliveries race it
            began = time.time()
            for line in child.stdout:  # until the child dies: the last line may be cut
                fields = line.split()
                if not line.endswith("\n") or len(fields) != 2:
                    break
                if fields[0] == "exit":
                    death = float(fields[1])
                    continue
                logged[int(fields[0])] = float(fields[1])
                if how == "kill" and time.time() - began >= lifetime:
                    death = time.time()
                    os.kill(child.pid, signal.SIGKILL)
                    # What the child reported before it died, still in the pipe: logged too.
                    for rest in child.stdout:
                        fields = rest.split()
                        if rest.endswith("\n") and len(fields) == 2 and fields[0].isdigit():
                            logged[int(fields[0])] = float(fields[1])
                    break
            child.wait(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        stderr.seek(0)
        errors = stderr.read()
    expected = -signal.SIGKILL if how == "kill" else 3
    assert child.returncode == expected, errors[-3000:]
    assert death is not None and len(logged) > 10, (len(logged), errors[-3000:])
    return logged, death


def _replay(folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "client._cli", "replay", str(folder)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _stored(uri: str, experiment_id: str) -> tuple[str, list[int]]:
    """The one run of the experiment and its ``loss`` steps, each point stored once."""
    runs = MlflowClient(uri).search_runs([experiment_id], run_view_type=ViewType.ALL)
    assert len(runs) == 1, [run.info.run_id for run in runs]  # created once
    run = runs[0]
    assert run.data.params == {"lr": "0.1"} and run.data.tags["t"] == "v"
    db = sqlite3.connect(uri.removeprefix("sqlite:///"))
    try:
        rows = db.execute(
            "SELECT key, step, COUNT(*) FROM metrics WHERE run_uuid = ? GROUP BY key, step",
            (run.info.run_id,),
        ).fetchall()
    finally:
        db.close()
    assert all(count == 1 for _, _, count in rows), [r for r in rows if r[2] != 1][:5]
    steps = sorted(step for key, step, _ in rows if key == "loss")
    assert steps == sorted(step for key, step, _ in rows if key == "acc")
    return run.info.run_id, steps


@pytest.mark.slow
@pytest.mark.parametrize(
    ("how", "interval"), [("kill", 0.05), ("exit", 0.05), ("kill", 0.0)], ids=str
)
def test_a_death_loses_nothing_journaled_and_replay_stores_nothing_twice(
    tmp_path: Path, tracking_uri: str, experiment_id: str, executor: str, how: str, interval: float
) -> None:
    logged, death = _die(tmp_path, tracking_uri, experiment_id, executor, interval, how)
    done = _replay(tmp_path / "spool")
    assert done.returncode == 0, done.stdout + done.stderr
    assert spool_files(tmp_path / "spool") == []
    _, steps = _stored(tracking_uri, experiment_id)
    # Logged more than journal_interval before the death: on disk, hence in the store. The
    # window is the interval plus one commit (an fsync), which a loaded machine stretches:
    # on the 2-core development machine at load 10, commits were seen to take 0.4 s.
    due = sorted(step for step, at in logged.items() if at < death - interval - COMMIT_SLACK)
    missing = sorted(set(due) - set(steps))
    assert not missing, (len(missing), missing[:10], len(due), len(steps))
    if interval == 0:  # every point the child reported
        assert set(logged) <= set(steps)
    # Nothing the child did not log; a point reported logged after the death cannot be.
    assert set(steps) <= set(range(max(logged) + 2))


def _journal_calls(spool_dir: Path) -> int:
    """Calls in the (one) journal file of ``spool_dir``, read as another process would."""
    (path,) = spool_files(spool_dir)
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM calls").fetchone()[0])
    finally:
        db.close()


def _eventually(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Whether ``condition`` holds within ``timeout`` seconds (polled every 20 ms)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_the_journal_fills_within_the_interval_and_empties_as_the_store_acknowledges(
    tmp_path: Path, tracking_uri: str, experiment_id: str, executor: str
) -> None:
    spool_dir = tmp_path / "spool"
    client = QueueingClient(
        tracking_uri, executor=executor, spool_dir=spool_dir, journal_interval=0.05
    )
    try:
        run = client.create_run(experiment_id, run_name="healthy")
        for step in range(500):
            client.log_metrics(run, {"loss": 1.0 / (step + 1)}, step=step)
        # On disk within a few intervals (a loaded machine may delay a commit), nothing
        # delivered yet.
        assert _eventually(lambda: bool(spool_files(spool_dir)) and _journal_calls(spool_dir) >= 1)
        for chunk in range(3):
            for step in range(500 * (chunk + 1), 500 * (chunk + 2)):
                client.log_metrics(run, {"loss": 1.0 / (step + 1)}, step=step)
            client.flush()
            # The acknowledgements' deletes are committed at the next interval.
            assert _eventually(lambda: _journal_calls(spool_dir) == 0)
        run_id = run.resolve()
    finally:
        client.close()
    assert spool_files(spool_dir) == []  # empty: deleted at close
    assert len(MlflowClient(tracking_uri).get_metric_history(run_id, "loss")) == 2000


def test_the_journal_with_an_interval_of_zero_holds_each_call_when_it_returns(
    tmp_path: Path, tracking_uri: str, experiment_id: str
) -> None:
    spool_dir = tmp_path / "spool"
    with QueueingClient(tracking_uri, spool_dir=spool_dir, journal_interval=0) as client:
        run = client.create_run(experiment_id)
        client.log_metrics(run, {"loss": 1.0}, step=0)
        assert _journal_calls(spool_dir) == 1  # no wait: on disk before the call returned
        client.set_terminated(run)
        assert _journal_calls(spool_dir) == 2


@pytest.mark.parametrize("bad", [-0.1, -1, float("inf"), float("nan"), "0.2", True])
def test_a_bad_journal_interval_raises_naming_it(tracking_uri: str, bad: object) -> None:
    with pytest.raises(MlflowException, match="Invalid journal_interval") as raised:
        QueueingClient(tracking_uri, journal_interval=bad)  # type: ignore[arg-type]
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"


@pytest.mark.slow  # runs `runactors replay` as a process
def test_a_journal_replayed_after_its_calls_were_delivered_stores_nothing_twice(
    tmp_path: Path, tracking_uri: str, experiment_id: str, executor: str
) -> None:
    """The state a death leaves between a delivery and the commit that deletes its rows:
    with journal_interval=0 every call is on disk before it returns, and the deletes of what
    the flush delivered wait for the next commit; a copy of the journal taken then holds
    every call, delivered, with the run's ID. Replaying it sends them all again."""
    import shutil

    spool_dir, copy = tmp_path / "spool", tmp_path / "copy"
    with QueueingClient(
        tracking_uri, executor=executor, spool_dir=spool_dir, journal_interval=0
    ) as client:
        run = client.create_run(experiment_id, run_name="twice", tags={"t": "v"})
        client.log_params(run, {"lr": "0.1"})
        client.set_tags(run, {"phase": "train"})
        for step in range(30):
            client.log_metrics(run, {"loss": 1.0 / (step + 1), "acc": step / 100}, step=step)
        client.set_terminated(run, "FINISHED")
        client.flush()
        assert _journal_calls(spool_dir) >= 32  # delivered, not yet deleted
        shutil.copytree(spool_dir, copy)
    done = _replay(copy)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "delivered" in done.stdout
    run_id, steps = _stored(tracking_uri, experiment_id)  # one run, each point once
    assert steps == list(range(30))
    stored = MlflowClient(tracking_uri).get_run(run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.tags["phase"] == "train" and stored.data.params == {"lr": "0.1"}
    db = sqlite3.connect(tracking_uri.removeprefix("sqlite:///"))
    try:
        for table in ("params", "tags", "latest_metrics"):
            rows = db.execute(f"SELECT key, COUNT(*) FROM {table} GROUP BY key").fetchall()
            assert all(count == 1 for _, count in rows), (table, rows)
    finally:
        db.close()
