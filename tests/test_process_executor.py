"""The process executor: same store contents as the thread executor, dead workers, clean stop."""

from __future__ import annotations

import multiprocessing
import os
import queue
import re
import signal
import sys
import time

import mlflow
import numpy as np
import pytest
from liveness import alive
from mlflow.entities import DatasetInput, InputTag
from mlflow.exceptions import MlflowException
from servers import LONG_HTTP_TIMEOUT
from stores import run_data

from client import QueueingClient

pytestmark = pytest.mark.slow  # every test starts worker processes


def workload(client: QueueingClient, experiment_id: str) -> list:
    """A bit of everything: names, tags on creation, params, tags, metric histories on
    several steps, a dataset on inputs and metrics, statuses and end times."""
    dataset = mlflow.data.from_numpy(np.arange(12).reshape(6, 2), name="digits-mini")
    entity = DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", "train")])
    runs = []
    for i in range(5):
        run = client.create_run(
            experiment_id, start_time=1000 + i, tags={"trial": i}, run_name=f"t{i}"
        )
        client.log_params(run, {"alpha": 0.1 * i, "layers": i + 1, "name": f"model-{i}"})
        client.set_tags(run, {"phase": "train"})
        client.log_inputs(run, [entity])
        for step in range(30):
            client.log_metrics(run, {"loss": 1.0 / (step + 1 + i), "acc": step / 30}, step=step)
        client.log_metrics(run, {"val": 0.5 + i}, step=30, dataset=dataset)
        client.set_tags(run, {"phase": "done"})
        client.set_terminated(run, status="FAILED" if i == 3 else "FINISHED", end_time=5000 + i)
        runs.append(run)
    return runs


def stored(store, experiment_id: str) -> dict:
    out = {}
    for run in store.search_runs([experiment_id]):
        info, data = run.info, run.data
        histories = {
            key: [
                (m.step, m.value, m.timestamp) for m in store.get_metric_history(info.run_id, key)
            ]
            for key in data.metrics
        }
        out[info.run_name] = {
            "status": info.status,
            "start": info.start_time,
            "end": info.end_time,
            "params": data.params,
            "tags": {k: v for k, v in data.tags.items() if not k.startswith("mlflow.")},
            "histories": {k: sorted(v) for k, v in histories.items()},
            "datasets": [(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs],
        }
    return out


def test_process_executor_stores_exactly_what_the_thread_executor_stores(tracking_uri, store):
    results = {}
    for executor in ("thread", "process"):
        experiment_id = store.create_experiment(f"same-{executor}")
        client = QueueingClient(tracking_uri, executor=executor, max_workers=2)
        runs = workload(client, experiment_id)
        client.close()
        assert all(r.done() for r in runs)
        results[executor] = stored(store, experiment_id)
    # Timestamps come from the caller's clock; compare everything else exactly.
    for name in results["thread"]:
        for key in results["thread"][name]["histories"]:
            for executor in results:
                results[executor][name]["histories"][key] = [
                    (step, value) for step, value, _ in results[executor][name]["histories"][key]
                ]
    assert results["process"] == results["thread"]
    assert len(results["thread"]) == 5
    assert results["thread"]["t3"]["status"] == "FAILED"
    assert len(results["thread"]["t0"]["histories"]["loss"]) == 30


def worker_pid(worker: str) -> int:
    match = re.search(r"pid (\d+)", worker)
    assert match, worker
    return int(match.group(1))


def test_a_worker_killed_mid_flush_costs_nothing(tracking_uri, store, experiment_id):
    client = QueueingClient(tracking_uri, executor="process", max_workers=2)
    big, small = client.create_run(experiment_id), client.create_run(experiment_id)
    client.flush()  # both runs exist; the workers are up
    for step in range(20_000):
        client.log_metrics(big, {"m": float(step)}, step=step)
    client.log_metrics(small, {"m": 1.0})
    operations = client.flush(synchronous=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = {r.pending_id: r for r in client.status().runs}
        if status[big].state == "flushing" and status[big].worker:
            break
        time.sleep(0.002)
    victim = worker_pid(status[big].worker)
    os.kill(victim, signal.SIGKILL)
    operations.await_completion()  # the job resumed on a fresh worker

    history = store.get_metric_history(big.resolve(), "m")
    assert sorted(m.step for m in history) == list(range(20_000))  # nothing lost or doubled
    assert store.get_run(small.resolve()).data.metrics == {"m": 1.0}
    executor = client._session._executor
    assert victim not in executor.worker_pids()
    # The pool recovered for the next flush.
    client.log_metrics(small, {"m": 2.0}, step=1)
    client.flush()
    assert len(store.get_metric_history(small.resolve(), "m")) == 2
    client.close()


def test_workers_are_stopped_by_close(tracking_uri, experiment_id):
    client = QueueingClient(tracking_uri, executor="process", max_workers=2)
    for i in range(4):
        client.log_metrics(client.create_run(experiment_id), {"m": float(i)})
    client.flush()
    pids = client._session._executor.worker_pids()
    assert 1 <= len(pids) <= 2
    client.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_status_shows_which_worker_runs_which_run(tracking_uri, experiment_id):
    client = QueueingClient(tracking_uri, executor="process", max_workers=1)
    run = client.create_run(experiment_id)
    client.flush()
    for step in range(5_000):
        client.log_metrics(run, {"m": float(step)}, step=step)
    operations = client.flush(synchronous=False)
    seen = set()
    while not operations.done():
        seen.add(client.status().runs[0].worker)
        time.sleep(0.001)
    operations.await_completion()
    workers = {w for w in seen if w}
    assert workers and all("worker-0[pid " in w for w in workers)
    assert client.status().runs[0].worker is None  # idle again
    client.close()


# -- faults of the process executor, real ones: SIGKILL, a locked store, a hung server -------

TIMEOUT = 60.0  # bounds every wait, so that a regression fails instead of hanging


class Unpicklable(float):
    """A metric value that passes validation but cannot be sent to a worker process."""

    def __reduce__(self):
        raise TypeError("this value refuses to be pickled")


def wait_until(predicate, timeout: float = TIMEOUT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def run_status(client: QueueingClient, run):
    return next(r for r in client.status().runs if r.pending_id == run or r.run_id == run)


def executor_of(client: QueueingClient):
    return client._session._executor


def close_quietly(client: QueueingClient, timeout: float = 30) -> None:
    try:
        client.close(timeout=timeout)
    except MlflowException:
        pass


def test_a_job_that_cannot_be_sent_fails_alone_and_the_pool_stays_whole(
    tracking_uri, store, experiment_id
):
    # One pool thread: if a job that cannot be pickled killed it, nothing would flush again.
    client = QueueingClient(tracking_uri, executor="process", max_workers=1)
    try:
        bad = client.create_run(experiment_id, run_name="bad")
        client.log_params(bad, {"p": 1})
        client.log_metrics(bad, {"m": Unpicklable(1.0)})
        client.set_terminated(bad)
        with pytest.raises(MlflowException, match="cannot be pickled") as failure:
            client.flush(synchronous=False).await_completion(TIMEOUT)
        assert "this value refuses to be pickled" in str(failure.value)
        # Only the batch that could not be sent failed: the run was created and terminated.
        assert store.get_run(bad.resolve()).info.status == "FINISHED"

        good = client.create_run(experiment_id, run_name="good")
        client.log_metrics(good, {"m": 2.0})
        client.flush(synchronous=False).await_completion(TIMEOUT)
        assert store.get_run(good.resolve()).data.metrics == {"m": 2.0}
        assert [t.is_alive() for t in executor_of(client)._threads.threads()] == [True]
    finally:
        close_quietly(client)


def test_a_worker_that_cannot_start_fails_its_job_and_leaks_nothing(
    tracking_uri, store, experiment_id, monkeypatch
):
    fds = set(os.listdir("/proc/self/fd"))
    # The session starts the worker template at the client's first use: the bad interpreter
    # must be in place before it, so that neither the template nor a worker can start.
    with monkeypatch.context() as patch:
        patch.setattr(sys, "executable", "/nonexistent/python")
        client = QueueingClient(tracking_uri, executor="process", max_workers=1)
        try:
            run = client.create_run(experiment_id)
            client.log_metrics(run, {"m": 1.0})
            with pytest.raises(MlflowException, match="could not start a worker process"):
                client.flush(synchronous=False).await_completion(TIMEOUT)
        except BaseException:
            close_quietly(client)
            raise
    try:
        assert set(os.listdir("/proc/self/fd")) <= fds  # both ends of its socketpair closed
        # The pool is whole: the next flush starts a worker and delivers.
        other = client.create_run(experiment_id)
        client.log_metrics(other, {"m": 2.0})
        client.flush(synchronous=False).await_completion(TIMEOUT)
        assert store.get_run(other.resolve()).data.metrics == {"m": 2.0}
    finally:
        close_quietly(client)


def test_a_pool_thread_survives_any_fault_of_a_job(tracking_uri):
    from actors.delivery._jobs import Job, JobResult
    from actors.executors._executor import JobPool

    class Faulty(JobPool[str]):
        def _open(self, index: int) -> str:
            return "state"

        def _perform(self, state: str, job: Job, on_state) -> JobResult:
            if job.label == "boom":
                raise MemoryError("out of memory while encoding the job")
            return JobResult(run_id=job.run_id)

    pool = Faulty(1, "faulty")
    results: queue.SimpleQueue = queue.SimpleQueue()
    try:
        pool.submit(Job(tracking_uri, "r1", [], 1.0, "boom"), lambda *a: None, results.put)
        pool.submit(Job(tracking_uri, "r2", [], 1.0, "fine"), lambda *a: None, results.put)
        first, second = results.get(timeout=30), results.get(timeout=30)
    finally:
        pool.shutdown(30)
    assert first.run_id == "r1" and "MemoryError" in first.errors[0]
    assert second.run_id == "r2" and second.errors == []


def test_a_fork_child_does_not_hold_close(tracking_uri, experiment_id):
    lifetime = 30.0
    client = QueueingClient(tracking_uri, executor="process", max_workers=2)
    run = client.create_run(experiment_id)
    client.log_metrics(run, {"m": 1.0})
    client.flush(synchronous=False).await_completion(TIMEOUT)
    pids = executor_of(client).worker_pids()
    assert pids
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(lifetime,))
    child.start()
    try:
        started = time.monotonic()
        client.close()
        elapsed = time.monotonic() - started
        assert child.is_alive()
        # Without the fix close() waited for the child to exit: the workers never saw EOF.
        assert elapsed < lifetime / 2, f"close() took {elapsed:.1f} s"
        assert [pid for pid in pids if alive(pid)] == []
    finally:
        child.kill()
        child.join(30)


@pytest.mark.parametrize("hung_server_timeout", [LONG_HTTP_TIMEOUT])  # the call stays in flight
def _children() -> dict[int, set[int]]:
    """Live (not zombie) processes by parent PID, from /proc."""
    found: dict[int, set[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if state != "Z":
            found.setdefault(int(ppid), set()).add(int(entry))
    return found


def worker_processes() -> set[int]:
    """This process's worker templates and the workers they forked."""
    children = _children()
    templates = set()
    for pid in children.get(os.getpid(), set()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"actors.executors._template" in f.read():
                    templates.add(pid)
        except OSError:
            continue
    return templates.union(*(children.get(t, set()) for t in templates))


def test_close_with_a_hung_store_leaves_no_worker_behind(hung_server):
    before = worker_processes()
    client = QueueingClient(hung_server, executor="process", max_workers=1)
    run = client.create_run("0")
    client.log_metrics(run, {"m": 1.0})
    client.flush(synchronous=False)
    wait_until(lambda: run_status(client, run).worker is not None, what="a worker on the job")
    pids = executor_of(client).worker_pids()
    assert len(pids) == 1 and set(pids) <= worker_processes()
    started = time.monotonic()
    with pytest.raises(MlflowException, match="closing before the last flush completed"):
        client.close(timeout=2)
    assert time.monotonic() - started < 30
    assert [pid for pid in pids if alive(pid)] == []
    # A pool thread that took the killed worker for a dead one would start another now.
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        assert worker_processes() - before == set()
        time.sleep(0.05)


@pytest.mark.slow
def test_retrying_returns_to_flushing_once_the_call_succeeds(
    tracking_uri, store, experiment_id, executor, lock_store, sqlite_busy_timeout
):
    client = QueueingClient(tracking_uri, executor=executor, max_workers=1, retry_timeout=120)
    try:
        run = client.create_run(experiment_id)
        client.flush(synchronous=False).await_completion(TIMEOUT)
        steps = 40_000  # 40 batches: the ones after the retried one take a while
        for step in range(steps):
            client.log_metrics(run, {"m": float(step)}, step=step)
        with lock_store():
            operations = client.flush(synchronous=False)
            # The fast path waits its busy timeout (1 s here) for the lock, then the call
            # fails and is retried.
            wait_until(lambda: run_status(client, run).state == "retrying", what="retrying")
        states = []  # the lock is gone: the retried batch lands, then the others follow
        while not operations.done():
            states.append(run_status(client, run).state)
            time.sleep(0.002)
        operations.await_completion(TIMEOUT)
        assert "flushing" in states, sorted(set(states))
        assert len(store.get_metric_history(run.resolve(), "m")) == steps
        assert run_status(client, run).errors == []
    finally:
        close_quietly(client)


def test_status_answers_within_50_ms_while_a_flush_is_blocked(
    tracking_uri, experiment_id, executor, lock_store
):
    client = QueueingClient(tracking_uri, executor=executor, max_workers=2)
    try:
        runs = [client.create_run(experiment_id) for _ in range(3)]
        client.flush(synchronous=False).await_completion(TIMEOUT)
        for run in runs:
            client.log_metrics(run, {"m": 1.0})
        with lock_store():
            operations = client.flush(synchronous=False)
            wait_until(
                lambda: any(r.state == "flushing" and r.worker for r in client.status().runs),
                what="a blocked flush",
            )
            durations = []
            for _ in range(21):
                started = time.perf_counter()
                status = client.status()
                durations.append(time.perf_counter() - started)
                assert len(status.runs) == 3
            assert not operations.done()
        operations.await_completion(TIMEOUT)
        # The median, so that one scheduler hiccup on a loaded machine does not decide.
        assert sorted(durations)[10] < 0.05, durations
        assert max(durations) < 1.0, durations
    finally:
        close_quietly(client)


def test_overlapping_flushes_keep_call_order_in_worker_processes(
    tracking_uri, store, experiment_id, lock_store
):
    client = QueueingClient(tracking_uri, executor="process", max_workers=4)
    try:
        run = client.create_run(experiment_id)
        client.flush(synchronous=False).await_completion(TIMEOUT)
        with lock_store():  # the first round blocks in a worker
            client.set_tags(run, {"last": "first"})
            client.log_metrics(run, {"m": 0.0}, step=0)
            first = client.flush(synchronous=False)
            wait_until(lambda: run_status(client, run).state == "flushing", what="round 1")
            client.set_tags(run, {"last": "second"})
            client.log_metrics(run, {"m": 1.0}, step=1)
            second = client.flush(synchronous=False)
            client.set_tags(run, {"last": "third"})
            third = client.flush(synchronous=False)
            time.sleep(0.5)  # the later rounds would overtake now if they could
        for operations in (first, second, third):
            operations.await_completion(TIMEOUT)
        assert run_data(store, run.resolve())[2]["last"] == "third"
        history = store.get_metric_history(run.resolve(), "m")
        assert sorted((m.step, m.value) for m in history) == [(0, 0.0), (1, 1.0)]
    finally:
        close_quietly(client)


def test_a_slow_or_failing_run_never_delays_a_healthy_one(tracking_uri, store, experiment_id):
    client = QueueingClient(tracking_uri, executor="process", max_workers=2)
    try:
        big, healthy = client.create_run(experiment_id), client.create_run(experiment_id)
        for _ in range(5):  # both workers up, so that no spawn is measured below
            client.flush(synchronous=False).await_completion(TIMEOUT)
            if len(executor_of(client).worker_pids()) == 2:
                break
            client.log_metrics(big, {"w": 0.0})
            client.log_metrics(healthy, {"w": 0.0})
        for step in range(60_000):
            client.log_metrics(big, {"m": float(step)}, step=step)
        missing = "0" * 32  # a run ID string of no run: its calls fail at flush
        client.log_metrics(missing, {"m": 1.0})
        logged = run_status(client, healthy).logged["metrics"]
        client.log_metrics(healthy, {"m": 1.0})
        operations = client.flush(synchronous=False)

        def healthy_done() -> bool:
            status = run_status(client, healthy)
            return status.state == "idle" and status.logged["metrics"] == logged + 1

        wait_until(healthy_done, what="the healthy run's flush")
        assert run_status(client, big).state in ("waiting", "flushing", "retrying")
        assert store.get_run(healthy.resolve()).data.metrics["m"] == 1.0
        with pytest.raises(MlflowException) as failure:
            operations.await_completion(TIMEOUT)
        assert missing in str(failure.value)
        assert str(healthy.resolve()) not in str(failure.value)
        assert str(big.resolve()) not in str(failure.value)
        assert len(store.get_metric_history(big.resolve(), "m")) == 60_000
    finally:
        close_quietly(client)


def test_a_worker_killed_during_create_run_fails_that_creation_only(
    tracking_uri, store, experiment_id, lock_store
):
    client = QueueingClient(tracking_uri, executor="process", max_workers=1)
    try:
        run = client.create_run(experiment_id, run_name="doomed")
        client.log_metrics(run, {"m": 1.0})
        with lock_store():  # create_run blocks in the worker
            operations = client.flush(synchronous=False)
            wait_until(lambda: run_status(client, run).worker is not None, what="create_run")
            os.kill(worker_pid(run_status(client, run).worker), signal.SIGKILL)
            wait_until(operations.done, what="the failed flush")
        with pytest.raises(MlflowException, match="died during create_run"):
            operations.await_completion(TIMEOUT)
        with pytest.raises(MlflowException):
            run.resolve(TIMEOUT)
        assert store.search_runs([experiment_id]) == []  # not resent
        after = client.create_run(experiment_id, run_name="after")
        client.flush(synchronous=False).await_completion(TIMEOUT)
        assert store.get_run(after.resolve()).info.run_name == "after"
    finally:
        close_quietly(client)


def test_a_job_whose_worker_dies_twice_fails_and_the_pool_recovers(
    tracking_uri, store, experiment_id, lock_store
):
    client = QueueingClient(tracking_uri, executor="process", max_workers=1)
    try:
        run = client.create_run(experiment_id)
        client.flush(synchronous=False).await_completion(TIMEOUT)
        client.log_metrics(run, {"m": 1.0})
        victims: list[int] = []
        with lock_store():  # the job's first call blocks in whichever worker
            operations = client.flush(synchronous=False)
            for _ in range(2):
                wait_until(
                    lambda: (
                        (w := run_status(client, run).worker) is not None
                        and worker_pid(w) not in victims
                    ),
                    what="a (fresh) worker on the job",
                )
                victims.append(worker_pid(run_status(client, run).worker))
                os.kill(victims[-1], signal.SIGKILL)
            wait_until(operations.done, what="the failed flush")
        with pytest.raises(MlflowException, match="died twice"):
            operations.await_completion(TIMEOUT)
        assert store.get_run(run.resolve()).data.metrics == {}
        client.log_metrics(run, {"m": 2.0})
        client.flush(synchronous=False).await_completion(TIMEOUT)
        assert store.get_run(run.resolve()).data.metrics == {"m": 2.0}
        assert not set(victims) & set(executor_of(client).worker_pids())
    finally:
        close_quietly(client)


def test_a_worker_killed_between_jobs_is_replaced(tracking_uri, store, experiment_id):
    client = QueueingClient(tracking_uri, executor="process", max_workers=1)
    try:
        run = client.create_run(experiment_id)
        client.log_metrics(run, {"m": 1.0}, step=0)
        client.flush(synchronous=False).await_completion(TIMEOUT)
        (victim,) = executor_of(client).worker_pids()
        os.kill(victim, signal.SIGKILL)
        client.log_metrics(run, {"m": 2.0}, step=1)
        client.flush(synchronous=False).await_completion(TIMEOUT)
        history = store.get_metric_history(run.resolve(), "m")
        assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (1, 2.0)]
        pids = executor_of(client).worker_pids()
        assert len(pids) == 1 and victim not in pids
        assert run_status(client, run).errors == []
    finally:
        close_quietly(client)
