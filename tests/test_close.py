"""Closing a client: calls racing ``close()``, ``status()`` after it, and dropped clients."""

from __future__ import annotations

import gc
import json
import logging
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from liveness import wait_for_no_run_actors
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from servers import LONG_HTTP_TIMEOUT

from client import QueueingClient

LOGGERS = 4  # threads logging while the main thread closes
# Closes raced: the race window is narrow, so give it several chances (worker processes
# take seconds to start, and the calls racing close() are made in this process either way).
ROUNDS = {"thread": 6, "process": 3}
CALLS_BEFORE_CLOSE = 1500  # points logged (in all threads) before close() starts


def _race_one_close(
    tracking_uri: str, store: MlflowClient, executor: str, run_ids: list[str], round_: int
) -> None:
    client = QueueingClient(tracking_uri, executor=executor)
    for run_id in run_ids:  # register the runs: the threads then take the fast path only
        client.log_metrics(run_id, {"warmup": 0.0}, step=round_)
    returned = [0] * LOGGERS
    raised: list[BaseException | None] = [None] * LOGGERS
    go = threading.Barrier(LOGGERS + 1)

    def log(index: int) -> None:
        run_id, key = run_ids[index % len(run_ids)], f"r{round_}-t{index}"
        go.wait()
        step = 0
        while True:
            try:
                client.log_metrics(run_id, {key: float(step)}, step=step)
            except MlflowException as exc:
                raised[index] = exc
                return
            step += 1
            returned[index] = step

    threads = [threading.Thread(target=log, args=(i,)) for i in range(LOGGERS)]
    for thread in threads:
        thread.start()
    go.wait()
    while sum(returned) < CALLS_BEFORE_CLOSE:
        time.sleep(0.0005)
    client.close(timeout=120)
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive()
    with pytest.raises(MlflowException, match="closed"):
        client.log_metrics(run_ids[0], {"late": 1.0})
    assert all(isinstance(exc, MlflowException) and "closed" in exc.message for exc in raised)
    for index in range(LOGGERS):
        run_id, key = run_ids[index % len(run_ids)], f"r{round_}-t{index}"
        stored = len(store.get_metric_history(run_id, key))
        assert stored == returned[index], (
            f"round {round_}, thread {index}: {returned[index]} calls returned normally, "
            f"{stored} points stored"
        )


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads often, so that a logging thread is preempted mid-call more often."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(previous)


def test_every_call_racing_close_is_delivered_or_raises(
    tracking_uri, store, experiment_id, executor, fast_switching
):
    """Threads log while another thread closes: a call that returns normally is in the store,
    every other call raises ``MlflowException`` (the client is closed)."""
    run_ids = [store.create_run(experiment_id).info.run_id for _ in range(2)]
    for round_ in range(ROUNDS[executor]):
        _race_one_close(tracking_uri, store, executor, run_ids, round_)
    assert wait_for_no_run_actors() == []


def test_new_runs_racing_close_are_delivered_or_raise(tracking_uri, store, experiment_id):
    """``create_run`` racing ``close()``: a returned PendingRunId resolves; the rest raise."""
    client = QueueingClient(tracking_uri)
    created: list[list] = [[] for _ in range(LOGGERS)]  # (pending, its metric was accepted)
    go = threading.Barrier(LOGGERS + 1)

    def create(index: int) -> None:
        go.wait()
        while True:
            try:
                pending = client.create_run(experiment_id)
            except MlflowException as exc:
                assert "closed" in exc.message
                return
            try:
                client.log_metrics(pending, {"a": 1.0})
            except MlflowException as exc:
                assert "closed" in exc.message
                created[index].append((pending, False))
                return
            created[index].append((pending, True))

    threads = [threading.Thread(target=create, args=(i,)) for i in range(LOGGERS)]
    for thread in threads:
        thread.start()
    go.wait()
    while sum(map(len, created)) < 20:
        time.sleep(0.001)
    client.close(timeout=120)
    for thread in threads:
        thread.join(60)
    results = [result for batch in created for result in batch]
    for pending, logged in results:
        history = store.get_metric_history(pending.resolve(timeout=30), "a")
        assert [m.value for m in history] == ([1.0] if logged else [])
    assert len(store.search_runs([experiment_id])) == len(results)


# -- status() after close() ----------------------------------------------------------


def test_status_after_close_answers_with_the_final_state(
    tracking_uri, store, experiment_id, executor
):
    client = QueueingClient(tracking_uri, executor=executor)
    finished = client.create_run(experiment_id)
    client.log_params(finished, {"p": 1})
    client.log_metrics(finished, {"a": 1.0, "b": 2.0})
    client.set_terminated(finished)
    open_run = client.create_run(experiment_id)
    client.log_metrics(open_run, {"a": 1.0})
    client.log_metrics("0" * 32, {"a": 1.0})  # no such run: fails at the last flush
    with pytest.raises(MlflowException, match="0" * 32):
        client.close()

    status = client.status()
    assert status.closed
    runs = {run.pending_id or run.run_id: run for run in status.runs}
    assert len(runs) == 3
    assert runs[finished].state == "stopped"
    assert runs[finished].logged == {"metrics": 2, "params": 1, "tags": 0, "datasets": 0}
    assert runs[open_run].state == "closed"
    assert runs[open_run].logged["metrics"] == 1 and runs[open_run].run_id
    failed = runs["0" * 32]
    assert failed.state == "closed" and failed.logged["metrics"] == 0 and failed.errors
    assert all(run.queued == dict.fromkeys(run.queued, 0) for run in status.runs)
    as_dict = json.loads(json.dumps(status.to_dict()))
    assert as_dict["closed"] is True and len(as_dict["runs"]) == 3
    assert client.status().runs == status.runs  # and keeps answering, the same


def test_status_of_a_client_closed_before_any_use(tracking_uri):
    client = QueueingClient(tracking_uri)
    client.close()
    status = client.status()
    assert status.closed and status.runs == []


# -- a client dropped without close() -------------------------------------------------


def _release_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "runactors-release"]


# The call stays in flight for the whole test; at teardown the server's close ends it at once.
@pytest.mark.parametrize("hung_server_timeout", [LONG_HTTP_TIMEOUT])
def test_a_dropped_client_on_a_hung_store_is_released_within_the_exit_timeout(
    hung_server, executor, monkeypatch
):
    """The finalizer's close is bounded by RUNACTORS_EXIT_TIMEOUT, not by the store."""
    monkeypatch.setenv("RUNACTORS_EXIT_TIMEOUT", "1")
    client = QueueingClient(hung_server, executor=executor, retry_timeout=0)
    client.log_metrics("0" * 32, {"a": 1.0})
    client.flush(synchronous=False)  # the store hangs this round for minutes
    session = client._session
    assert session is not None
    del client
    gc.collect()
    deadline = time.monotonic() + 20  # the bound (1 s) plus a wide margin for a loaded machine
    while (not session.closed or _release_threads()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert session.closed, "the dropped client's session was not closed"
    assert _release_threads() == [], "the finalizer's thread is still waiting on the store"


def test_a_dropped_client_logs_what_it_lost(tracking_uri, executor, caplog):
    """A client the garbage collector drops has nobody to raise its failures to: they are
    logged, as the exit handler logs them (a run in an experiment that does not exist)."""
    client = QueueingClient(tracking_uri, executor=executor)
    pending = client.create_run("424242", run_name="lost-run")
    client.log_metrics(pending, {"loss": 1.0}, step=0)
    label = str(pending)
    session = client._session
    assert session is not None
    with caplog.at_level(logging.WARNING):
        del client
        gc.collect()
        deadline = time.monotonic() + 60  # a worker process starts within it, on a loaded machine
        while (not session.closed or _release_threads()) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert session.closed, "the dropped client's session was not closed"
    lost = [r for r in caplog.records if label in r.getMessage()]
    assert lost, [r.getMessage() for r in caplog.records]
    assert all(r.levelno >= logging.WARNING for r in lost)
    assert any("424242" in r.getMessage() for r in lost), [r.getMessage() for r in lost]
