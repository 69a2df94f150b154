"""A client left running: background flushes (``flush_interval``) and bounded memory
(``max_queued``), against real stores and real dead backends."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from scripts import run_script
from servers import free_port

from client import QueueingClient

ROOT = Path(__file__).resolve().parent.parent
# Timing margins are generous: the machine running the tests is shared and loaded.
MARGIN = 8.0


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def history(store: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in store.get_metric_history(run_id, key))


@pytest.fixture
def dead_uri(fail_fast_http: None) -> str:
    """A tracking server on a closed loopback port: every request is refused at once."""
    return f"http://127.0.0.1:{free_port()}"


# -- flush_interval ----------------------------------------------------------------------


def test_background_flushes_deliver_without_a_flush_call(
    executor, tracking_uri, store, experiment_id
):
    client = QueueingClient(tracking_uri, executor=executor, flush_interval=0.3)
    try:
        pending = client.create_run(experiment_id, run_name="service")
        client.log_params(pending, {"lr": 0.1})
        for step in range(5):
            client.log_metrics(pending, {"loss": 1.0 / (step + 1)}, step=step)
        wait_until(pending.done, 30 + MARGIN, "the run created")
        run_id = pending.resolve()
        wait_until(lambda: len(history(store, run_id, "loss")) == 5, 30, "the points stored")
        # And again later: the interval keeps ticking for new work.
        client.log_metrics(pending, {"loss": 0.01}, step=5)
        wait_until(lambda: len(history(store, run_id, "loss")) == 6, 30, "the later point")
        assert store.get_run(run_id).data.params == {"lr": "0.1"}
        assert not any(run.errors for run in client.status().runs)
    finally:
        client.close()


def test_a_full_batch_flushes_before_the_interval(executor, tracking_uri, store, experiment_id):
    run_id = store.create_run(experiment_id).info.run_id
    client = QueueingClient(tracking_uri, executor=executor, flush_interval=3600)
    try:
        for step in range(999):
            client.log_metrics(run_id, {"loss": float(step)}, step=step)
        time.sleep(1.0)
        assert history(store, run_id, "loss") == []  # not a full batch yet: nothing sent
        client.log_metrics(run_id, {"loss": 999.0}, step=999)  # the 1000th metric
        wait_until(lambda: len(history(store, run_id, "loss")) == 1000, 30, "the full batch")
    finally:
        client.close()


def test_a_background_failure_is_in_status_logged_and_raised_by_close(executor, dead_uri, caplog):
    client = QueueingClient(dead_uri, executor=executor, flush_interval=0.2, retry_timeout=0.5)
    run_id = "0" * 32
    with caplog.at_level(logging.WARNING, logger="runactors"):
        client.log_metrics(run_id, {"loss": 1.0}, step=0)
        errors = wait_until(
            lambda: [e for run in client.status().runs for e in run.errors],
            30 + MARGIN,
            "the background failure in status()",
        )
        wait_until(
            lambda: any("background flush failed" in r.getMessage() for r in caplog.records),
            10,
            "the warning",
        )
    assert any("Connection refused" in e or "connect" in e.lower() for e in errors), errors
    with pytest.raises(MlflowException, match=run_id) as info:
        client.close(timeout=30)
    assert "following failures occurred while closing" in info.value.message


def test_a_failure_raised_by_flush_is_not_raised_again_by_close(dead_uri):
    client = QueueingClient(dead_uri, retry_timeout=0.2)
    client.log_metrics("0" * 32, {"loss": 1.0}, step=0)
    with pytest.raises(MlflowException):
        client.flush()
    client.close(timeout=30)  # nothing left that no flush() raised


def test_one_ticker_thread_for_every_client_of_the_process(tracking_uri):
    clients = [QueueingClient(tracking_uri, flush_interval=0.5) for _ in range(5)]
    try:
        for client in clients:
            client.log_metrics("0" * 32, {"x": 1.0})  # opens its session
        tickers = [t for t in threading.enumerate() if t.name == "runactors-ticker"]
        assert len(tickers) == 1
    finally:
        for client in clients:
            client._drop_queued()
            client.close()


def test_no_ticker_thread_until_a_client_has_a_flush_interval(tracking_uri):
    result = run_script(
        f"""
        import threading
        from client import QueueingClient

        def tickers():
            return [t.name for t in threading.enumerate() if t.name == "runactors-ticker"]

        plain = QueueingClient({tracking_uri!r})
        plain.log_metrics("0" * 32, {{"x": 1.0}})  # opens its session: the system starts
        print("plain", len(tickers()))
        plain._drop_queued()
        plain.close()
        timed = QueueingClient({tracking_uri!r}, flush_interval=60)
        timed.log_metrics("0" * 32, {{"x": 1.0}})
        print("timed", len(tickers()))
        timed._drop_queued()
        timed.close()
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "plain 0" in result.stdout and "timed 1" in result.stdout, result.stdout


# -- max_queued --------------------------------------------------------------------------


def test_max_queued_blocks_then_admits_when_a_flush_frees_room(
    executor, tracking_uri, store, experiment_id, lock_store
):
    run_id = store.create_run(experiment_id).info.run_id
    client = QueueingClient(tracking_uri, executor=executor, max_queued=10)
    try:
        client.log_metrics(run_id, {f"m{i}": float(i) for i in range(10)}, step=0)  # full
        outcome: list[Any] = []
        with lock_store(60) as lock:  # the flush the blocked call starts waits on the lock
            blocked = threading.Thread(
                target=lambda: outcome.append(client.log_metrics(run_id, {"late": 1.0}, step=1))
            )
            blocked.start()
            time.sleep(1.0)
            assert blocked.is_alive() and not outcome  # no room yet: the call waits
            lock.release()
        blocked.join(30 + MARGIN)
        assert outcome == [None]  # admitted once the round that held the ten ended
        client.flush()
        metrics = store.get_run(run_id).data.metrics
        assert len(metrics) == 11 and metrics["late"] == 1.0
    finally:
        client.close()


def test_max_queued_raises_past_retry_timeout_and_queues_nothing_of_the_call(executor, hung_server):
    client = QueueingClient(hung_server, executor=executor, max_queued=4, retry_timeout=1)
    run_id = "0" * 32
    try:
        client.log_metrics(run_id, {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0})
        start = time.monotonic()
        with pytest.raises(MlflowException, match="max_queued=4") as info:
            client.log_metrics(run_id, {"e": 5.0, "f": 6.0})
        waited = time.monotonic() - start
        assert 0.9 <= waited < 1 + MARGIN
        assert "Nothing of this call was queued" in info.value.message
        [run] = client.status().runs
        assert sum(run.queued.values()) == 4  # the first call's, in flight; none of the second
    finally:
        client._drop_queued()
        with pytest.raises(MlflowException):  # the round on the hung server did not finish
            client.close(timeout=0.5)


def test_a_call_larger_than_max_queued_raises_at_once(tracking_uri):
    client = QueueingClient(tracking_uri, max_queued=2)
    try:
        with pytest.raises(MlflowException, match="more than max_queued=2"):
            client.log_metrics("0" * 32, {"a": 1.0, "b": 2.0, "c": 3.0})
        assert sum(client.status().runs[0].queued.values()) == 0
    finally:
        client.close()


MILLION_CALLS = textwrap.dedent(
    """
    import json, sys, time
    from client import QueueingClient

    def rss_mb():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024

    uri, calls, max_queued, retry_timeout = sys.argv[1], *map(float, sys.argv[2:])
    client = QueueingClient(uri, max_queued=int(max_queued), retry_timeout=retry_timeout)
    run = "0" * 32
    client.log_metrics(run, {"warm-up": 1.0})
    try:  # a first flush loads what sending needs (MLflow's REST client): not the queue's
        client.flush()
    except Exception:
        pass
    before = rss_mb()
    longest, refused = 0.0, 0
    for step in range(int(calls)):
        start = time.perf_counter()
        try:
            client.log_metrics(run, {"loss": 0.5}, step=step)
        except Exception:
            refused += 1
        longest = max(longest, time.perf_counter() - start)
    after = rss_mb()
    print(json.dumps({"before_mb": before, "after_mb": after, "longest_s": longest,
                      "refused": refused, "status": client.status().runs[0].queued}),
          flush=True)  # os._exit below flushes nothing
    client._drop_queued()
    import os
    os._exit(0)  # the backend is dead: no exit flush to wait for
    """
)


@pytest.mark.slow
def test_a_million_calls_against_a_dead_backend_stay_bounded_in_memory(dead_uri, tmp_path):
    script = tmp_path / "million.py"
    script.write_text(MILLION_CALLS)
    # A failing round takes retry_timeout, so a dead backend frees max_queued entities per
    # retry_timeout: short, so that the million calls end within a minute or two.
    retry_timeout = 0.1
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(script), dead_uri, "1000000", "20000", str(retry_timeout)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    print("million calls:", figures)
    assert figures["after_mb"] - figures["before_mb"] < 60, figures
    assert figures["longest_s"] < retry_timeout + 5, figures
    assert sum(figures["status"].values()) <= 20000, figures


# -- bad inputs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"flush_interval": 0}, "Invalid flush_interval 0"),
        ({"flush_interval": -1.0}, "Invalid flush_interval -1.0"),
        ({"flush_interval": float("nan")}, "Invalid flush_interval nan"),
        ({"flush_interval": float("inf")}, "Invalid flush_interval inf"),
        ({"flush_interval": "5"}, "Invalid flush_interval '5'"),
        ({"flush_interval": True}, "Invalid flush_interval True"),
        ({"max_queued": 0}, "Invalid max_queued 0"),
        ({"max_queued": -5}, "Invalid max_queued -5"),
        ({"max_queued": 2.5}, "Invalid max_queued 2.5"),
        ({"max_queued": "100"}, "Invalid max_queued '100'"),
        ({"max_queued": True}, "Invalid max_queued True"),
    ],
)
def test_bad_service_options_are_refused_at_the_constructor(tracking_uri, kwargs, message):
    with pytest.raises(MlflowException, match=message.replace("(", r"\(")) as info:
        QueueingClient(tracking_uri, **kwargs)
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"


def _forked_service(tracking_uri: str, run_id: str) -> None:
    # In the child: the parent's ticker thread does not exist here; a new one must time this.
    client = QueueingClient(tracking_uri, flush_interval=0.2)
    client.log_metrics(run_id, {"child": 1.0}, step=0)
    store = MlflowClient(tracking_uri)
    deadline = time.monotonic() + 30 + MARGIN
    while not store.get_run(run_id).data.metrics and time.monotonic() < deadline:
        time.sleep(0.05)
    ok = bool(store.get_run(run_id).data.metrics)
    client.close()
    os._exit(0 if ok else 1)


def test_a_forked_child_gets_its_own_ticker(tracking_uri, store, experiment_id):
    import multiprocessing

    parent = QueueingClient(tracking_uri, flush_interval=3600)
    parent.log_metrics("0" * 32, {"x": 1.0})  # the parent's system and ticker are running
    run_id = store.create_run(experiment_id).info.run_id
    child = multiprocessing.get_context("fork").Process(
        target=_forked_service, args=(tracking_uri, run_id)
    )
    child.start()
    child.join(60 + MARGIN)
    try:
        assert child.exitcode == 0  # delivered by a background flush in the child
    finally:
        parent._drop_queued()
        parent.close()
