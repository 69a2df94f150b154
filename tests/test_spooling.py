"""A live client's spool (``spool_dir``) against a real ``mlflow server`` stopped and restarted.

The backend down is a real server stopped (SIGKILL); it reaches both executors. What the
spool holds is read from ``status()`` and the journal file itself; what is delivered is read
back from the server's store: every run once, every param once, every metric point once.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from actors.spool._files import spool_files
from client import QueueingClient

ROOT = Path(__file__).resolve().parent.parent
STEPS = 30
EXIT_TIMEOUT = 12
KINDS = ("metrics", "params", "tags", "datasets")


def _experiment(uri: str, name: str) -> str:
    return MlflowClient(uri).create_experiment(f"{name}-{time.monotonic_ns()}")


def _log_runs(client: QueueingClient, experiment_id: str, runs: int, first: int = 0) -> list[Any]:
    pendings = []
    for index in range(runs):
        run = client.create_run(experiment_id, run_name=f"trial-{index}", tags={"t": "v"})
        client.log_params(run, {"lr": str(0.1 * (index + 1)), "depth": str(index)})
        for step in range(first, first + STEPS):
            client.log_metrics(run, {"loss": 1.0 / (step + 1), "acc": step / 100}, step=step)
        pendings.append(run)
    return pendings


def _total(status: Any, field: str) -> dict[str, int]:
    return {kind: sum(getattr(run, field)[kind] for run in status.runs) for kind in KINDS}


def _check_store(uri: str, experiment_id: str, runs: int, steps: int, finished: int) -> None:
    store = MlflowClient(uri)
    found = store.search_runs([experiment_id], run_view_type=ViewType.ALL, max_results=1000)
    assert sorted(run.info.run_name for run in found) == sorted(f"trial-{i}" for i in range(runs))
    statuses = sorted(run.info.status for run in found)
    assert statuses.count("FINISHED") == finished, statuses
    for run in found:
        index = int(run.info.run_name.split("-")[1])
        assert run.data.params == {"lr": str(0.1 * (index + 1)), "depth": str(index)}
        assert run.data.tags["t"] == "v"
        for key in ("loss", "acc"):
            history = store.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in history) == list(range(steps)), (key, len(history))


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_outage_spools_then_next_flush_delivers_once(
    mlflow_server: Any, executor: str, tmp_path: Path
) -> None:
    uri = mlflow_server.uri
    experiment_id = _experiment(uri, f"spool-{executor}")
    spool_dir = tmp_path / "spool"
    client = QueueingClient(uri, executor=executor, retry_timeout=1, spool_dir=spool_dir)
    try:
        mlflow_server.stop()
        pendings = _log_runs(client, experiment_id, runs=3)
        client.set_terminated(pendings[0], "FINISHED")
        with pytest.raises(MlflowException, match="spooled to"):
            client.flush()
        status = client.status()
        assert {run.state for run in status.runs} == {"spooled"}, status
        assert _total(status, "queued") == dict.fromkeys(KINDS, 0)  # memory freed
        spooled = _total(status, "spooled")
        assert spooled == {"metrics": 3 * 2 * STEPS, "params": 6, "tags": 3, "datasets": 0}
        assert not any(pending.done() for pending in pendings)
        [journal] = spool_files(spool_dir)
        assert stat.S_IMODE(journal.stat().st_mode) == 0o600
        assert stat.S_IMODE(spool_dir.stat().st_mode) == 0o700

        # Still down: a later round goes behind the spooled calls, never ahead of them.
        for step in range(STEPS, 2 * STEPS):
            client.log_metrics(pendings[1], {"loss": 1.0 / (step + 1), "acc": step / 100}, step)
        with pytest.raises(MlflowException, match="spool"):
            client.flush()
        assert _total(client.status(), "spooled")["metrics"] == spooled["metrics"] + 2 * STEPS
        assert _total(client.status(), "queued") == dict.fromkeys(KINDS, 0)

        mlflow_server.start()
        client.flush()  # re-sends the spool first, by itself
        status = client.status()
        assert _total(status, "spooled") == dict.fromkeys(KINDS, 0), status
        assert {run.state for run in status.runs} <= {"idle", "stopped"}, status
        run_ids = [pending.resolve(timeout=5) for pending in pendings]
        assert len(set(run_ids)) == 3
        assert spool_files(spool_dir) == [journal]  # kept while the client lives
    finally:
        client.close()
    assert spool_files(spool_dir) == []  # empty: deleted at close
    store = MlflowClient(uri)
    found = store.search_runs([experiment_id], run_view_type=ViewType.ALL)
    assert len(found) == 3
    assert len(store.get_metric_history(run_ids[1], "loss")) == 2 * STEPS
    for index in (0, 2):
        assert len(store.get_metric_history(run_ids[index], "loss")) == STEPS
    assert store.get_run(run_ids[0]).info.status == "FINISHED"
    assert store.get_run(run_ids[1]).data.params == {"lr": str(0.1 * 2), "depth": "1"}


def _one_spool_warning(caplog: pytest.LogCaptureFixture, spool_dir: Path) -> None:
    """close() said once, as a warning, where the spool is and how to deliver it."""
    said = [r for r in caplog.records if "runactors replay" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]
    assert said[0].levelno == logging.WARNING
    assert f"runactors replay {spool_dir}" in said[0].getMessage(), said[0].getMessage()


def replay(folder: Path, uri: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.run(
        [sys.executable, "-m", "client._cli", "replay", str(folder), "--tracking-uri", uri],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_close_with_backend_down_spools_and_replay_delivers(
    mlflow_server: Any, executor: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing is lost: close() does not raise; one warning names the spool and the replay."""
    uri = mlflow_server.uri
    experiment_id = _experiment(uri, f"close-{executor}")
    spool_dir = tmp_path / "spool"
    client = QueueingClient(uri, executor=executor, retry_timeout=1, spool_dir=spool_dir)
    mlflow_server.stop()
    pendings = _log_runs(client, experiment_id, runs=2)
    for pending in pendings:
        client.set_terminated(pending, "FINISHED")
    with caplog.at_level(logging.WARNING):
        client.close()  # nothing is lost: what is on disk is not raised
    _one_spool_warning(caplog, spool_dir)
    status = client.status()
    assert _total(status, "spooled")["metrics"] == 2 * 2 * STEPS
    assert {run.state for run in status.runs} == {"spooled"}, status
    for pending in pendings:  # its creation is only on disk: the client closed first
        with pytest.raises(MlflowException, match="spool"):
            pending.resolve(timeout=5)
    assert len(spool_files(spool_dir)) == 1
    mlflow_server.start()
    done = replay(spool_dir, uri)
    assert done.returncode == 0, done.stdout + done.stderr
    assert spool_files(spool_dir) == []
    _check_store(uri, experiment_id, runs=2, steps=STEPS, finished=2)


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_close_raises_only_what_is_lost_not_what_was_spooled_and_delivered(
    mlflow_server: Any, executor: str, tmp_path: Path
) -> None:
    """Background rounds spooled through an outage, then delivered once the server is back:
    close() raises none of those (they are counted in ``retries``), only the run that is
    really lost (its experiment does not exist: a permanent error)."""
    uri = mlflow_server.uri
    experiment_id = _experiment(uri, f"lost-{executor}")
    spool_dir = tmp_path / "spool"
    client = QueueingClient(
        uri, executor=executor, retry_timeout=1, spool_dir=spool_dir, flush_interval=0.3
    )
    try:
        mlflow_server.stop()
        pendings = _log_runs(client, experiment_id, runs=2)
        for pending in pendings:
            client.set_terminated(pending, "FINISHED")
        _wait_for(
            lambda: _total(client.status(), "spooled")["metrics"] == 2 * 2 * STEPS,
            "the background rounds spooled",
        )
        mlflow_server.start()
        _wait_for(
            lambda: _total(client.status(), "spooled") == dict.fromkeys(KINDS, 0),
            "the spool re-sent by background rounds",
        )
        lost = client.create_run("987654321", run_name="lost")  # no such experiment
        client.log_metrics(lost, {"loss": 1.0}, step=0)
        _wait_for(lambda: lost.done(), "the lost run's creation failed in the background")
    except BaseException:
        client.close()
        raise
    with pytest.raises(MlflowException) as raised:
        client.close()
    message = raised.value.message
    assert str(lost) in message and "987654321" in message, message
    assert "spool" not in message, message  # spooled, then delivered: nothing lost
    assert not any(str(pending) in message for pending in pendings), message
    assert all(run.retries > 0 for run in client.status().runs[:2]), client.status()
    _check_store(uri, experiment_id, runs=2, steps=STEPS, finished=2)


def _wait_for(condition: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


EXIT_SCRIPT = textwrap.dedent(
    """
    import sys
    import time
    from client import QueueingClient

    uri, experiment_id, spool_dir = sys.argv[1:4]
    # retry_timeout far past the exit bound: exit must stop retrying and spool instead.
    client = QueueingClient(uri, retry_timeout=300, spool_dir=spool_dir)
    for index in range(2):
        run = client.create_run(experiment_id, run_name=f"trial-{index}", tags={"t": "v"})
        client.log_params(run, {"lr": str(0.1 * (index + 1)), "depth": str(index)})
        for step in range(int(sys.argv[4])):
            client.log_metrics(run, {"loss": 1.0 / (step + 1), "acc": step / 100}, step=step)
        client.set_terminated(run, "FINISHED")
    client.flush(synchronous=False)
    print(time.time(), flush=True)  # the exit begins: what the test bounds
    """
)


def test_exit_with_backend_down_leaves_a_journal_replay_delivers(
    mlflow_server: Any, tmp_path: Path
) -> None:
    uri = mlflow_server.uri
    experiment_id = _experiment(uri, "exit")
    spool_dir = tmp_path / "spool"
    mlflow_server.stop()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "RUNACTORS_EXIT_TIMEOUT": str(EXIT_TIMEOUT),
    }
    done = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, uri, experiment_id, str(spool_dir), str(STEPS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    exiting = time.time() - float(done.stdout.split()[-1])  # not the start-up, which load stretches
    assert done.returncode == 0, done.stderr
    assert exiting < EXIT_TIMEOUT + 8, exiting  # the exit bound, a margin for the interpreter's end
    assert len(spool_files(spool_dir)) == 1, done.stderr
    mlflow_server.start()
    delivered = replay(spool_dir, uri)
    assert delivered.returncode == 0, delivered.stdout + delivered.stderr
    assert spool_files(spool_dir) == []
    try:
        _check_store(uri, experiment_id, runs=2, steps=STEPS, finished=2)
    except AssertionError as exc:
        outputs = f"{done.stderr}\n{delivered.stdout}{delivered.stderr}"
        raise AssertionError(f"{exc}\n{outputs}") from None


def test_permanent_error_is_reported_not_spooled(tracking_uri: str, tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    client = QueueingClient(tracking_uri, retry_timeout=1, spool_dir=spool_dir)
    try:
        client.log_params("0" * 32, {"p": "1"})  # no such run: a permanent error
        with pytest.raises(MlflowException, match="Failed to perform") as raised:
            client.flush()
        assert "spool" not in str(raised.value)
        [run] = client.status().runs
        assert run.state == "idle"
        assert run.spooled == dict.fromkeys(KINDS, 0)
        assert run.errors
    finally:
        client.close()
    assert not spool_dir.exists() or spool_files(spool_dir) == []


@pytest.mark.parametrize("bad", [123, b"/tmp/x", ""])
def test_bad_spool_dir_types_raise_at_the_constructor(bad: Any, tracking_uri: str) -> None:
    with pytest.raises(MlflowException, match="Invalid spool_dir"):
        QueueingClient(tracking_uri, spool_dir=bad)


def test_spool_dir_that_is_a_file_raises_at_the_constructor(
    tracking_uri: str, tmp_path: Path
) -> None:
    path = tmp_path / "a-file"
    path.write_text("")
    with pytest.raises(MlflowException, match="not a folder"):
        QueueingClient(tracking_uri, spool_dir=path)


def test_a_spool_dir_that_cannot_be_used_raises_at_the_constructor_naming_it(
    tracking_uri: str, tmp_path: Path
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    bad = {
        f"/proc/runactors-nope-{os.getpid()}": "No such file or directory",
        str(a_file / "spool"): "Not a directory",
    }
    for path, os_error in bad.items():
        with pytest.raises(MlflowException) as raised:
            QueueingClient(tracking_uri, spool_dir=path)
        assert raised.value.error_code == "INVALID_PARAMETER_VALUE"
        assert path in raised.value.message and os_error in raised.value.message
    # (a read-only folder is not tried: the tests run as root, whom chmod does not stop)
    good = tmp_path / "a" / "b" / "spool"
    client = QueueingClient(tracking_uri, spool_dir=good)
    client.close()
    assert good.is_dir() and stat.S_IMODE(good.stat().st_mode) == 0o700
    assert list(good.iterdir()) == []  # the folder is checked; no journal is made eagerly


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_bounded_close_stops_retrying_and_spools_what_is_in_flight(
    mlflow_server: Any, executor: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """retry_timeout far past close's bound: the rounds still retrying are stopped (a thread
    at its next retry, a worker process at once) and spooled, within the bound."""
    uri = mlflow_server.uri
    experiment_id = _experiment(uri, f"bounded-{executor}")
    spool_dir = tmp_path / "spool"
    client = QueueingClient(uri, executor=executor, retry_timeout=300, spool_dir=spool_dir)
    mlflow_server.stop()
    pendings = _log_runs(client, experiment_id, runs=2)
    for pending in pendings:
        client.set_terminated(pending, "FINISHED")
    client.flush(synchronous=False)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        client.close(timeout=EXIT_TIMEOUT)  # everything is spooled: nothing to raise
    took = time.monotonic() - started
    _one_spool_warning(caplog, spool_dir)
    assert took < EXIT_TIMEOUT + 10, took  # the bound, a generous margin for the load
    assert _total(client.status(), "spooled")["metrics"] == 2 * 2 * STEPS
    mlflow_server.start()
    done = replay(spool_dir, uri)
    assert done.returncode == 0, done.stdout + done.stderr
    _check_store(uri, experiment_id, runs=2, steps=STEPS, finished=2)


def test_locked_sqlite_store_spools_then_delivers_once(
    tracking_uri: str, experiment_id: str, executor: str, lock_store: Any, tmp_path: Path
) -> None:
    """A local store locked by another connection (a real second writer) past
    retry_timeout: spooled; once it is free, the next flush delivers every run once."""
    spool_dir = tmp_path / "spool"
    client = QueueingClient(tracking_uri, executor=executor, retry_timeout=1, spool_dir=spool_dir)
    try:
        with lock_store(300):
            pendings = _log_runs(client, experiment_id, runs=2)
            client.set_terminated(pendings[0], "FINISHED")
            with pytest.raises(MlflowException, match="spooled to"):
                client.flush()
            assert {run.state for run in client.status().runs} == {"spooled"}
            assert not any(pending.done() for pending in pendings)
        client.flush()
        assert _total(client.status(), "spooled") == dict.fromkeys(KINDS, 0)
        assert all(pending.done() for pending in pendings)
    finally:
        client.close()
    assert spool_files(spool_dir) == []
    _check_store(tracking_uri, experiment_id, runs=2, steps=STEPS, finished=1)
