"""Clients across processes: pickling, spawn and fork children, and interpreter exit."""

from __future__ import annotations

import multiprocessing
import pickle
import time
import uuid

import cloudpickle
import pytest
from liveness import processes_with_env
from mlflow.exceptions import MlflowException
from scripts import run_script
from servers import LONG_HTTP_TIMEOUT
from stores import run_data

from client import QueueingClient

pytestmark = pytest.mark.slow  # each test starts processes: spawned, forked, joblib's


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
def test_round_trip_carries_configuration_only(tracking_uri, store, experiment_id, dumps):
    original = QueueingClient(tracking_uri, max_workers=3, retry_timeout=5.0)
    pending = original.create_run(experiment_id)
    original.log_metrics(pending, {"a": 1.0})

    copy = pickle.loads(dumps(original))
    assert copy.tracking_uri == tracking_uri
    assert copy._config == original._config
    assert copy.status().runs == []  # queued operations never travel
    with pytest.raises(MlflowException, match="not created by this client"):
        copy.log_metrics(pending, {"a": 2.0})
    run_id = store.create_run(experiment_id).info.run_id
    copy.log_metrics(run_id, {"b": 1.0})
    copy.close()
    original.close()
    assert run_data(store, run_id)[1] == {"b": 1.0}
    assert run_data(store, pending.resolve())[1] == {"a": 1.0}


def _log_trial(payload: bytes, experiment_id: str, name: str, steps: int) -> None:
    client = cloudpickle.loads(payload)
    run = client.create_run(experiment_id, run_name=name)
    for step in range(steps):
        client.log_metrics(run, {"loss": 1.0 / (step + 1)}, step=step)
    client.set_terminated(run)
    client.close()


def test_spawned_children_log_with_a_cloudpickled_client(tracking_uri, store, experiment_id):
    client = QueueingClient(tracking_uri)
    payload = cloudpickle.dumps(client)
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        pool.starmap(_log_trial, [(payload, experiment_id, f"trial-{i}", 5) for i in range(4)])
    runs = store.search_runs([experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"trial-{i}" for i in range(4)]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert len(store.get_metric_history(run.info.run_id, "loss")) == 5
    client.close()


def _forked_child(client: QueueingClient, parent_pending, experiment_id: str, out) -> None:
    try:
        try:
            client.log_metrics(parent_pending, {"x": 1.0})
            out.put("parent's PendingRunId was accepted")
            return
        except MlflowException:
            pass
        assert client.status().runs == []  # the parent's queue stayed with the parent
        run = client.create_run(experiment_id, run_name="child")
        client.log_metrics(run, {"child": 1.0})
        client.set_terminated(run)
        client.close()
        out.put(run.resolve())
    except BaseException as exc:
        out.put(f"child failed: {exc!r}")


def test_forked_child_uses_its_own_actors_and_parent_is_unaffected(
    tracking_uri, store, experiment_id, executor
):
    client = QueueingClient(tracking_uri, executor=executor)
    warm = client.create_run(experiment_id, run_name="warm")
    client.flush()  # the parent's actors, executor and DB connections are all live
    pending = client.create_run(experiment_id, run_name="parent")
    client.log_metrics(pending, {"parent": 1.0})  # queued, not flushed, at fork time

    context = multiprocessing.get_context("fork")
    out = context.Queue()
    child = context.Process(target=_forked_child, args=(client, pending, experiment_id, out))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    child_run_id = out.get(timeout=5)
    assert len(child_run_id) == 32, child_run_id

    client.log_metrics(pending, {"after": 2.0})
    client.close()
    runs = {r.info.run_name: r for r in store.search_runs([experiment_id])}
    assert set(runs) == {"warm", "parent", "child"}
    assert runs["child"].info.run_id == child_run_id
    assert runs["child"].data.metrics == {"child": 1.0}
    assert runs["parent"].data.metrics == {"parent": 1.0, "after": 2.0}
    assert len(store.get_metric_history(pending.resolve(), "parent")) == 1  # sent once
    assert warm.done()


@pytest.mark.parametrize("hung_server_timeout", [LONG_HTTP_TIMEOUT])  # the call stays in flight
def test_exit_with_a_hung_store_leaves_no_worker_process(hung_server):
    mark = uuid.uuid4().hex
    result = run_script(
        f"""
        import time
        from client import QueueingClient

        client = QueueingClient({hung_server!r}, executor="process", max_workers=1)
        run = client.create_run("0")
        client.log_metrics(run, {{"m": 1.0}})
        client.flush(synchronous=False)
        deadline = time.monotonic() + 60
        while client.status().runs[0].worker is None and time.monotonic() < deadline:
            time.sleep(0.01)
        print("workers", *client._session._executor.worker_pids(), flush=True)
        """,
        timeout=90,
        RUNACTORS_EXIT_TIMEOUT="2",
        RUNACTORS_TEST_MARK=mark,
    )
    assert result.returncode == 0, result.stderr
    pids = [int(pid) for pid in result.stdout.split("workers", 1)[1].split()]
    assert len(pids) == 1
    # The worker was killed at exit, and no fresh one was started for the job it had.
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        assert processes_with_env(f"RUNACTORS_TEST_MARK={mark}") == set()
        time.sleep(0.05)


def test_process_that_never_flushed_delivers_at_exit(tracking_uri, store, experiment_id, executor):
    result = run_script(
        f"""
        from client import QueueingClient
        client = QueueingClient({tracking_uri!r}, executor={executor!r})
        run = client.create_run({experiment_id!r}, run_name="exit")
        for step in range(10):
            client.log_metrics(run, {{"m": float(step)}}, step=step)
        client.set_terminated(run)
        """
    )
    assert result.returncode == 0, result.stderr
    (run,) = store.search_runs([experiment_id])
    assert run.info.run_name == "exit" and run.info.status == "FINISHED"
    assert len(store.get_metric_history(run.info.run_id, "m")) == 10


def test_asynchronous_flush_in_flight_at_exit_completes(tracking_uri, store, experiment_id):
    result = run_script(
        f"""
        import time
        from unittest import mock
        from mlflow.tracking import MlflowClient
        from client import QueueingClient

        original = MlflowClient.log_batch
        def slow(self, *args, **kwargs):
            time.sleep(2)
            return original(self, *args, **kwargs)
        mock.patch.object(MlflowClient, "log_batch", slow).start()

        client = QueueingClient({tracking_uri!r})
        run = client.create_run({experiment_id!r}, run_name="inflight")
        client.log_params(run, {{"p": 1}})
        client.flush(synchronous=False)
        print("leaving", flush=True)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "leaving" in result.stdout
    (run,) = store.search_runs([experiment_id])
    assert run.data.params == {"p": "1"}


def test_exit_is_bounded_even_when_the_store_hangs(tracking_uri, store, experiment_id):
    result = run_script(
        f"""
        import time
        from unittest import mock
        from mlflow.tracking import MlflowClient
        from client import QueueingClient

        mock.patch.object(MlflowClient, "log_batch", lambda *a, **k: time.sleep(3600)).start()
        client = QueueingClient({tracking_uri!r})
        client.log_params({store.create_run(experiment_id).info.run_id!r}, {{"p": 1}})
        client.flush(synchronous=False)
        """,
        timeout=90,
        RUNACTORS_EXIT_TIMEOUT="2",
    )
    assert result.returncode == 0, result.stderr


def _hammer(payload: bytes, experiment_id: str, worker: int) -> int:
    client = cloudpickle.loads(payload)
    runs = [client.create_run(experiment_id, run_name=f"w{worker}-r{i}") for i in range(3)]
    for step in range(200):
        for run in runs:
            client.log_metrics(run, {"m": float(step)}, step=step)
        if step % 20 == 0:
            client.flush(synchronous=False)
    for run in runs:
        client.set_terminated(run)
    client.close()
    return worker


def test_four_processes_writing_one_sqlite_file_lose_nothing(tracking_uri, store, experiment_id):
    payload = cloudpickle.dumps(QueueingClient(tracking_uri))
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        assert sorted(pool.starmap(_hammer, [(payload, experiment_id, w) for w in range(4)])) == [
            0,
            1,
            2,
            3,
        ]
    runs = store.search_runs([experiment_id], max_results=100)
    assert len(runs) == 12
    for run in runs:
        assert run.info.status == "FINISHED"
        steps = [m.step for m in store.get_metric_history(run.info.run_id, "m")]
        assert sorted(steps) == list(range(200))


def test_joblib_loky_workers_log_trials(tracking_uri, store, experiment_id):
    joblib = pytest.importorskip("joblib")
    client = QueueingClient(tracking_uri)
    joblib.Parallel(n_jobs=2, backend="loky")(
        joblib.delayed(_log_trial)(cloudpickle.dumps(client), experiment_id, f"loky-{i}", 4)
        for i in range(4)
    )
    runs = store.search_runs([experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"loky-{i}" for i in range(4)]
    assert all(len(store.get_metric_history(r.info.run_id, "loss")) == 4 for r in runs)
    client.close()


def test_fork_children_log_their_own_runs_while_the_parent_keeps_working(
    tracking_uri, store, experiment_id
):
    client = QueueingClient(tracking_uri)
    parent_run = client.create_run(experiment_id, run_name="parent")
    client.flush()
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    children = [
        context.Process(target=_forked_child, args=(client, parent_run, experiment_id, out))
        for _ in range(3)
    ]
    for child in children:
        child.start()
    for step in range(100):  # the parent logs while its children do
        client.log_metrics(parent_run, {"p": float(step)}, step=step)
        if step % 10 == 0:
            client.flush(synchronous=False)
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    child_ids = {out.get(timeout=5) for _ in children}
    client.close()
    assert all(len(run_id) == 32 for run_id in child_ids), child_ids
    runs = store.search_runs([experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["child", "child", "child", "parent"]
    assert sorted(m.step for m in store.get_metric_history(parent_run.resolve(), "p")) == list(
        range(100)
    )
