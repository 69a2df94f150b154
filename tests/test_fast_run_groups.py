"""Groups of whole runs (``actors.executors._process_groups``): the short runs a pool thread
finds queued are stored in one transaction. A group shows ``retrying`` in ``status()`` while
its store is locked, as a run's own job does; a worker process killed in the middle of a
group loses no run and stores none twice; with a write-ahead journal, what a group stored
leaves the journal as a job's calls do.

Each test holds the client's one pool thread with a job of its own (its ``on_state`` waits)
while the runs' jobs queue behind it, so that the thread then takes them as one group.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from actors.delivery._jobs import Job, JobResult
from actors.spool._files import spool_files
from client import QueueingClient

TIMEOUT = 60.0
RUNS = 6


def _wait_until(condition: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _executor(client: QueueingClient) -> Any:
    return client._get_session().executor()


@contextmanager
def _pool_held(client: QueueingClient) -> Iterator[None]:
    """The client's pool thread busy with a job of no run (its ``on_state`` waits) until the
    block ends, when ``RUNS`` jobs are queued behind it."""
    release, started, done = threading.Event(), threading.Event(), threading.Event()

    def on_state(state: str, worker: str | None, detail: str | None = None) -> None:
        started.set()
        release.wait(TIMEOUT)

    def on_done(result: JobResult) -> None:
        done.set()

    executor = _executor(client)
    blocker = Job(client.tracking_uri, "0" * 32, [], retry_timeout=1.0)
    executor.submit(blocker, on_state, on_done)
    try:
        assert started.wait(TIMEOUT), "the pool thread never took the blocking job"
        yield
        _wait_until(lambda: len(executor._threads._queue) == RUNS, "the runs' jobs queued")
    finally:
        release.set()
    assert done.wait(TIMEOUT)


def _warm_up(client: QueueingClient, store: MlflowClient) -> None:
    """A run elsewhere, so that the pool's thread or worker has opened the store (MLflow
    waits 20 s on a locked file there) before the test locks it."""
    client.create_run(store.create_experiment("warm-up"), run_name="warm-up")
    client.flush()


def _sweep(client: QueueingClient, experiment_id: str) -> list[Any]:
    """``RUNS`` short runs, created, logged and ended, flushed in the background."""
    runs = []
    for i in range(RUNS):
        run = client.create_run(experiment_id, run_name=f"r{i}")
        client.log_params(run, {"i": str(i)})
        client.log_metrics(run, {"loss": i / 2, "acc": 1.0}, step=i)
        client.set_terminated(run)
        runs.append(run)
    client.flush(synchronous=False)
    return runs


def _assert_stored_once(store: MlflowClient, experiment_id: str) -> None:
    stored = store.search_runs([experiment_id])
    assert sorted(r.info.run_name for r in stored) == [f"r{i}" for i in range(RUNS)]
    for run in stored:
        i = int(run.info.run_name[1:])
        assert run.info.status == "FINISHED"
        assert run.data.params == {"i": str(i)}
        assert run.data.metrics == {"loss": i / 2, "acc": 1.0}
        for key in ("loss", "acc"):
            assert len(store.get_metric_history(run.info.run_id, key)) == 1


@pytest.mark.slow
def test_a_group_shows_retrying_while_its_store_is_locked(
    tracking_uri, experiment_id, store, executor, lock_store, sqlite_busy_timeout
):
    client = QueueingClient(tracking_uri, executor=executor, max_workers=1, retry_timeout=60)
    try:
        _warm_up(client, store)
        with lock_store() as lock:
            with _pool_held(client):
                runs = _sweep(client, experiment_id)
            # The group's transaction waits 1 s for the lock, fails, and is retried.
            states = lambda: {s.state for s in client.status().runs[1:]}  # noqa: E731
            _wait_until(lambda: states() == {"retrying"}, "the group's runs retrying", 15)
            retried = client.status().runs[1:]
            lock.release()
        client.flush()
        statuses = client.status().runs[1:]  # the warm-up's aside
    finally:
        client.close()
    assert all(s.retries >= 1 and "locked" in (s.last_retry_error or "") for s in retried)
    assert [s.sql_fast_path for s in statuses] == ["on"] * len(runs)
    _assert_stored_once(store, experiment_id)


@pytest.mark.slow
def test_a_worker_killed_in_the_middle_of_a_group_loses_no_run_and_stores_none_twice(
    tracking_uri, experiment_id, store, lock_store, monkeypatch
):
    monkeypatch.setenv("RUNACTORS_SQLITE_BUSY_TIMEOUT", "30")  # the group waits in the lock
    client = QueueingClient(tracking_uri, executor="process", max_workers=1, retry_timeout=60)
    try:
        _warm_up(client, store)
        with lock_store() as lock:
            with _pool_held(client):
                _sweep(client, experiment_id)
            # The group is sent: each of its runs names the worker storing it.
            workers = lambda: {s.worker for s in client.status().runs[1:]}  # noqa: E731
            _wait_until(lambda: None not in workers(), "the group in a worker")
            (pid,) = _executor(client).worker_pids()
            time.sleep(0.2)  # into its transaction, waiting for the lock
            os.kill(pid, signal.SIGKILL)
            _wait_until(lambda: pid not in _executor(client).worker_pids(), "the worker gone")
            lock.release()
        client.flush()
        statuses = client.status().runs[1:]  # the warm-up's aside
    finally:
        client.close()
    assert [s.errors for s in statuses] == [[]] * RUNS
    _assert_stored_once(store, experiment_id)


@pytest.mark.slow
def test_a_group_stored_with_a_journal_leaves_the_journal(
    tracking_uri, experiment_id, store, executor, tmp_path: Path, monkeypatch
):
    monkeypatch.setenv("RUNACTORS_KEEPER", "0")
    spool = tmp_path / "spool"
    client = QueueingClient(
        tracking_uri, executor=executor, max_workers=1, spool_dir=str(spool), journal_interval=0
    )
    try:
        # Created first: with a journal, the spooler sends each creation on its own.
        runs = [client.create_run(experiment_id, run_name=f"r{i}") for i in range(RUNS)]
        client.flush()
        with _pool_held(client):
            for i, run in enumerate(runs):
                client.log_params(run, {"i": str(i)})
                client.log_metrics(run, {"loss": i / 2, "acc": 1.0}, step=i)
                client.set_terminated(run)
            client.flush(synchronous=False)
        client.flush()
        statuses = client.status().runs
    finally:
        client.close()
    assert [(s.errors, s.sql_fast_path) for s in statuses] == [([], "on")] * RUNS
    assert spool_files(spool) == []  # every call acknowledged: the journal was deleted
    _assert_stored_once(store, experiment_id)


@pytest.mark.slow
def test_a_group_that_outlasts_its_retries_does_not_wait_as_long_again_for_each_run(
    tracking_uri, experiment_id, store, executor, lock_store, monkeypatch
):
    monkeypatch.setenv("RUNACTORS_SQLITE_BUSY_TIMEOUT", "0.05")
    retry_timeout = 2.0
    client = QueueingClient(
        tracking_uri, executor=executor, max_workers=1, retry_timeout=retry_timeout
    )
    try:
        _warm_up(client, store)
        with lock_store():
            with _pool_held(client):
                _sweep(client, experiment_id)
            started = time.monotonic()
            client.flush()  # once every round has ended (failed: the creations too)
            took = time.monotonic() - started
        statuses = client.status().runs[1:]  # the warm-up's aside
    finally:
        with pytest.raises(MlflowException, match="past retry_timeout"):
            client.close()
    # The group retries for retry_timeout; its runs, one by one after it, only for what is
    # left of theirs (not the whole retry_timeout again each: 2 s + 6 x 2 s).
    assert took < 3 * retry_timeout, took
    assert all("past retry_timeout" in s.errors[0] for s in statuses)
    assert store.search_runs([experiment_id]) == []
