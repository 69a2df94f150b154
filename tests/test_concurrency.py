"""Ordering, thread safety, isolation and lifecycle under concurrency, on a real SQLite store."""

from __future__ import annotations

import threading
import time
from unittest import mock

import pytest
from liveness import wait_for_no_run_actors, wait_for_threads
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from stores import run_data

from actors.runtime import RunActor, get_system
from client import QueueingClient

ORIGINAL_LOG_BATCH = MlflowClient.log_batch


def wait_for_state(client: QueueingClient, state: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while client.status().runs[0].state != state and time.monotonic() < deadline:
        time.sleep(0.005)
    assert client.status().runs[0].state == state


@pytest.fixture
def client(tracking_uri):
    client = QueueingClient(tracking_uri, max_workers=4)
    yield client
    client.close()


def test_overlapping_flushes_of_one_run_keep_call_order(client, store, experiment_id):
    """The first flush's batch is slowed; the second flush must still land after it."""
    calls = []

    def slow_first(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        calls.append([t.value for t in tags])
        if len(calls) == 1:
            time.sleep(1.0)
        return ORIGINAL_LOG_BATCH(self, run_id, metrics, params, tags, **kwargs)

    pending = client.create_run(experiment_id)
    client.flush()
    with mock.patch.object(MlflowClient, "log_batch", slow_first):
        client.set_tags(pending, {"last": "first"})
        client.log_metrics(pending, {"m": 0.0}, step=0)
        first = client.flush(synchronous=False)
        wait_for_state(client, "flushing")  # the first round has taken its snapshot
        client.set_tags(pending, {"last": "second"})
        client.log_metrics(pending, {"m": 1.0}, step=1)
        second = client.flush(synchronous=False)
        client.set_tags(pending, {"last": "third"})
        client.flush(synchronous=True)
        first.await_completion()
        second.await_completion()

    # The slowed first round goes alone; the two flushes made meanwhile wait for it and may
    # share the next round, but nothing overtakes it.
    assert calls[0] == ["first"]
    assert [value for call in calls for value in call] == ["first", "second", "third"]
    assert run_data(store, pending.resolve())[2]["last"] == "third"
    history = store.get_metric_history(pending.resolve(), "m")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.0), (1, 1.0)]


def test_eight_threads_into_four_runs_while_another_thread_flushes(
    tracking_uri, executor, store, experiment_id
):
    client = QueueingClient(tracking_uri, executor=executor, max_workers=2)
    runs = [client.create_run(experiment_id, run_name=f"r{i}") for i in range(4)]
    steps = 150
    stop = threading.Event()
    errors: list[BaseException] = []

    def log(thread: int) -> None:
        try:
            run = runs[thread % 4]
            client.log_params(run, {f"p{thread}": thread})
            for step in range(steps):
                client.log_metrics(run, {f"t{thread}": float(step)}, step=step)
                if step % 50 == 0:
                    client.set_tags(run, {f"t{thread}": str(step)})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def flusher() -> None:
        synchronous = False
        while not stop.is_set():
            client.flush(synchronous=synchronous)
            synchronous = not synchronous
            time.sleep(0.005)

    flushing = threading.Thread(target=flusher)
    flushing.start()
    loggers = [threading.Thread(target=log, args=(i,)) for i in range(8)]
    for thread in loggers:
        thread.start()
    for thread in loggers:
        thread.join()
    stop.set()
    flushing.join()
    client.flush()

    assert errors == []
    for thread in range(8):
        run_id = runs[thread % 4].resolve()
        history = store.get_metric_history(run_id, f"t{thread}")
        assert sorted(m.step for m in history) == list(range(steps))
        params, _, tags = run_data(store, run_id)
        assert params[f"p{thread}"] == str(thread)
        assert tags[f"t{thread}"] == "100"  # the last value set, in call order
    assert {r.state for r in client.status().runs} <= {"idle"}
    assert all(r.errors == [] for r in client.status().runs)
    client.close()


def test_concurrent_create_run_gives_distinct_runs(client, store, experiment_id):
    created: list = []

    def create() -> None:
        for _ in range(25):
            created.append(client.create_run(experiment_id))

    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    client.flush()
    assert len({p.resolve() for p in created}) == 100
    assert len(store.search_runs([experiment_id], max_results=1000)) == 100


@pytest.mark.slow
def test_five_hundred_pending_runs_flush_and_close_back_to_baseline(
    tracking_uri, store, experiment_id
):
    """500 runs, over 30 times the client's actor slots (16): actors are handed from run to
    run many times over, and a thread or actor leaked per run or per hand-over stays behind
    as surely as with 1,500 (checked: with released actors never stopped, the test fails)."""
    get_system()  # the process-wide supervisor is part of the baseline
    baseline = threading.active_count()
    client = QueueingClient(tracking_uri)
    pending = [client.create_run(experiment_id, run_name=f"run-{i}") for i in range(500)]
    for i, run in enumerate(pending):
        client.log_metrics(run, {"i": float(i)})
        if i % 2 == 0:
            client.set_terminated(run)
    client.flush()
    assert all(p.done() for p in pending)
    client.close()
    assert wait_for_threads(baseline) == baseline
    assert wait_for_no_run_actors() == []
    runs = store.search_runs([experiment_id], max_results=2000)
    assert len(runs) == 500
    assert sum(r.info.status == "FINISHED" for r in runs) == 250
    assert {r.data.metrics["i"] for r in runs} == {float(i) for i in range(500)}


def test_status_answers_while_a_flush_is_blocked(client, experiment_id):
    gate = threading.Event()

    def blocked(self, *args, **kwargs):
        gate.wait(60)
        return ORIGINAL_LOG_BATCH(self, *args, **kwargs)

    pending = client.create_run(experiment_id)
    client.log_metrics(pending, {"a": 1.0})
    with mock.patch.object(MlflowClient, "log_batch", blocked):
        operations = client.flush(synchronous=False)
        wait_for_state(client, "flushing")
        answers = []
        asker = threading.Thread(target=lambda: answers.append(client.status()))
        asker.start()
        asker.join(timeout=10)
        still_blocked = not gate.is_set() and not operations.done()
        gate.set()
        operations.await_completion()
    assert still_blocked and answers, "status() waited for the flush"
    (run,) = answers[0].runs
    assert run.state == "flushing"
    assert run.queued["metrics"] == 1 and run.logged["metrics"] == 0
    assert client.status().runs[0].logged["metrics"] == 1


def test_a_failing_slow_run_neither_delays_nor_fails_a_healthy_one(client, store, experiment_id):
    bad = store.create_run(experiment_id).info.run_id
    good = store.create_run(experiment_id).info.run_id
    gate = threading.Event()

    def bad_is_slow_and_fails(self, run_id, *args, **kwargs):
        if run_id == bad:
            gate.wait(60)
            raise RuntimeError("the store rejected this batch")
        return ORIGINAL_LOG_BATCH(self, run_id, *args, **kwargs)

    client.log_metrics(bad, {"a": 1.0})
    client.log_metrics(good, {"a": 2.0})
    with mock.patch.object(MlflowClient, "log_batch", bad_is_slow_and_fails):
        operations = client.flush(synchronous=False)
        deadline = time.monotonic() + 30
        while not run_data(store, good)[1] and time.monotonic() < deadline:
            time.sleep(0.02)
        good_landed_while_bad_blocked = bool(run_data(store, good)[1]) and not gate.is_set()
        gate.set()
        with pytest.raises(MlflowException) as exc:
            operations.await_completion()
    assert good_landed_while_bad_blocked
    assert f"on the run with ID {bad}" in str(exc.value)
    assert "the store rejected this batch" in str(exc.value)
    assert good not in str(exc.value)
    states = {r.run_id: r for r in client.status().runs}
    assert states[bad].errors and not states[good].errors


def test_a_crashing_run_actor_is_isolated_reported_and_replaced(client, store, experiment_id):
    victim = store.create_run(experiment_id).info.run_id
    bystander = store.create_run(experiment_id).info.run_id
    original = RunActor._on_job_done

    def crash_for_victim(self, result):
        if result.run_id == victim:
            raise RuntimeError("actor bug")
        return original(self, result)

    client.log_metrics(victim, {"a": 1.0})
    client.log_metrics(bystander, {"a": 1.0})
    with mock.patch.object(RunActor, "_on_job_done", crash_for_victim):
        with pytest.raises(MlflowException) as exc:
            client.flush()
    assert "actor bug" in str(exc.value) and victim in str(exc.value)
    assert bystander not in str(exc.value)
    states = {r.run_id: r for r in client.status().runs}
    assert states[victim].state == "crashed"
    assert any("actor bug" in e for e in states[victim].errors)
    assert run_data(store, bystander)[1] == {"a": 1.0}

    # The next flush starts a new actor for the run and delivers what was queued since.
    client.log_metrics(victim, {"b": 2.0})
    client.flush()
    assert run_data(store, victim)[1] == {"a": 1.0, "b": 2.0}


def test_a_planning_fault_loses_nothing(client, store, experiment_id):
    run_id = store.create_run(experiment_id).info.run_id
    client.log_metrics(run_id, {"a": 1.0})
    with (
        mock.patch("actors.runtime._run_actor.plan_snapshot", side_effect=RuntimeError("plan bug")),
        pytest.raises(MlflowException, match="plan bug"),
    ):
        client.flush()
    client.flush()
    assert run_data(store, run_id)[1] == {"a": 1.0}


def test_a_crash_while_creating_settles_the_pending_run_id(client, experiment_id):
    def crash(self, result):
        raise RuntimeError("actor bug")

    pending = client.create_run(experiment_id)
    with (
        mock.patch.object(RunActor, "_on_job_done", crash),
        pytest.raises(MlflowException, match="actor bug"),
    ):
        client.flush()
    with pytest.raises(MlflowException, match="actor bug"):
        pending.resolve(timeout=10)
